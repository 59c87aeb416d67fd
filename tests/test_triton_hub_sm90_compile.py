"""Compile the shared M-Hub attention kernels for Hopper (sm_90) without a GPU.

The CPU interpreter runs the kernels' Python semantics but not Triton's compiler: type errors
that only appear when compiling (e.g. an int argument equal to 1 specialized to a constant on
one side of a runtime ``if``), unsupported ops, or register spills would first show on a GPU.
Here ``triton.compile`` builds PTX and a cubin with the ptxas bundled in Triton's wheel, in a
subprocess without TRITON_INTERPRET, and ``cuobjdump`` reports the stack (spill) size.
It runs the Triton version installed here, which may differ from the GPU machine's.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# (dtype, head dim, key layout, mask mode, dropout, Lq, num_query_tokens, int args specialized
# to 1), with the tiles the launchers choose for 64 samples x 12 heads on a CPU device.
CASES = [
    ("bf16", 64, 2, 0, True, 32, 0, ()),  # cross-attention, packed video frames, training
    ("fp16", 64, 1, 1, True, 64, 32, ()),  # self-attention ITC, 32 queries + 32 text, training
    ("fp32", 128, 1, 2, False, 9, 1, ("nq", "num_heads")),  # ITG, IEEE float32 dots, nq = H = 1
]
MAX_STACK_BYTES = 64  # a few spilled scalars at most; spilled tiles (seen with large float32 tiles) are kilobytes


def _triton_nvidia_tools() -> str | None:
    try:
        import triton
        import triton.backends.compiler  # GPUTarget, used by the subprocess
    except Exception:
        return None
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return bin_dir if os.path.exists(os.path.join(bin_dir, "ptxas")) else None


@pytest.mark.skipif(_triton_nvidia_tools() is None, reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("kernel ")]
    assert len(lines) == 4 * len(CASES) + 1, proc.stdout
    for line in lines:
        stack = int(line.split("STACK:")[1].split()[0])
        assert stack <= MAX_STACK_BYTES, f"register spills on sm_90: {line}"


def _compile_all() -> None:  # runs in the subprocess
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmict_kernels.ops import _triton_attention as TA

    bin_dir = _triton_nvidia_tools()
    target = GPUTarget("cuda", 90, 32)
    pointer = {"Q": "T", "K": "T", "V": "T", "O": "T", "DO": "T", "DK": "T", "DV": "T", "DQ": "T",
               "LSE": "*fp32", "DELTA": "*fp32", "KEY_START": "*i32", "KEY_LEN": "*i32", "BLOCK_TABLE": "*i32",
               "SEED": "*i64", "KEEP": "*i8"}  # fmt: skip
    floats = {"scale", "scale_log2", "dropout_p"}

    def compile_one(kernel, dtype, constexprs, ones=(), num_warps=4, num_stages=2):
        signature, constants = {}, dict(constexprs)
        for index, name in enumerate(kernel.arg_names):
            if kernel.params[index].is_constexpr or name in ones:
                signature[name] = "constexpr"
                constants.setdefault(name, 1)
            elif name in pointer:
                signature[name] = "*" + dtype if pointer[name] == "T" else pointer[name]
            else:
                signature[name] = "fp32" if name in floats else "i32"
        compiled = triton.compile(
            ASTSource(kernel, signature, constants), target=target, options={"num_warps": num_warps, "num_stages": num_stages}
        )
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mmict_sm90_{os.getpid()}.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        os.remove(path)
        regs = next((line.strip().split()[:2] for line in usage.splitlines() if "REG:" in line), ["?", "?"])
        tiles = f"{constexprs.get('BLOCK_M')}x{constexprs.get('BLOCK_N')} warps={num_warps}"
        print("kernel", kernel.fn.__name__, dtype, constexprs.get("HEAD_DIM"), tiles, *regs, flush=True)

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype, head_dim, layout, mask, dropout, seq_len_q, nq, ones in CASES:
        align = nq if mask != TA.MASK_NONE else 0
        tiles = TA._tiles(seq_len_q, 64 * 12, head_dim, torch_dtype[dtype], torch.device("cpu"), align)
        common = dict(KEY_LAYOUT=layout, MASK_MODE=mask, HAS_DROPOUT=dropout, HEAD_DIM=head_dim, BLOCK_M=tiles.block_m,
                      BLOCK_N=tiles.block_n, DOT_PRECISION=TA._dot_precision(torch_dtype[dtype], torch.device("cuda")))  # fmt: skip
        launch = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        compile_one(TA._attn_fwd_kernel, dtype, common, ones, **launch)
        compile_one(TA._attn_bwd_dq_kernel, dtype, common, ones, **launch)
        compile_one(TA._attn_bwd_dkdv_kernel, dtype, dict(common, BLOCK_B=64), ones, **launch)
        compile_one(TA._attn_bwd_delta_kernel, dtype, dict(HEAD_DIM=head_dim, BLOCK_M=tiles.block_m))
    compile_one(TA._dropout_mask_kernel, "fp32", dict(BLOCK_M=16, BLOCK_N=64))


if __name__ == "__main__":
    _compile_all()
