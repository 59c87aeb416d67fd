"""Tiny Triton kernels with the faults the GPU-readiness checks exist to catch, and a runner.

Run as a script in a fresh process (``@triton.jit`` reads ``TRITON_INTERPRET`` at import time):

    TRITON_INTERPRET=1 python tiny_kernels.py interpret      # Triton's CPU interpreter
    python tiny_kernels.py compile --arch 90 [--arch 80]     # the compile-only harness

Each prints one JSON object: per kernel, what happened (its outputs, or the compile error, or the
compiled record and the launch problems the harness found).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

SCALE = 0.5  # a plain module-level float: the interpreter reads it, Triton's compiler refuses it
SCALE_C = tl.constexpr(0.5)  # the way a kernel may read a module-level constant


@triton.jit
def scale_by_plain_global(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * SCALE, mask=offs < n)


@triton.jit
def scale_by_constexpr_global(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * SCALE_C, mask=offs < n)


@triton.jit
def big_accumulator(A, B, C, BLOCK: tl.constexpr, K: tl.constexpr):
    """A BLOCK x BLOCK float32 accumulator held by one warp: far more than 255 registers per thread."""
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, K)
    a = tl.load(A + offs[:, None] * K + offs_k[None, :])
    b = tl.load(B + offs_k[:, None] * BLOCK + offs[None, :])
    acc = tl.dot(a, b)
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def pipelined_matmul(A, B, C, n_k, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """A software-pipelined matmul whose stages need more shared memory than one SM has."""
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(0, n_k, BLOCK_K):
        a = tl.load(A + offs[:, None] * n_k + (k + offs_k)[None, :])
        b = tl.load(B + (k + offs_k)[:, None] * BLOCK + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def read_one_past_the_end(X, Y, n, BLOCK: tl.constexpr):
    """Reads x[i + 1] without a mask: the last element reads past the tensor."""
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs + 1), mask=offs < n)


def interpret() -> dict:
    x = torch.arange(8, dtype=torch.float32)
    y = torch.empty_like(x)
    scale_by_plain_global[(1,)](x, y, 8, BLOCK=8)
    return {"scale_by_plain_global": {"ok": True, "y": y.tolist()}}


def compile_for(arches: list[int]) -> dict:
    """Launch every kernel under the harness for the first arch; the two small ones also for the
    others, in the same process (each target must get its own compiled kernel)."""
    from mmict_kernels.testing.compile_only import compile_only

    out: dict = {}
    x = torch.arange(64, dtype=torch.float32)
    y = torch.empty_like(x)
    h = torch.randn(256, 256, dtype=torch.float16)
    launches = {
        "scale_by_plain_global": lambda: scale_by_plain_global[(4,)](x, y, 64, BLOCK=16),
        "scale_by_constexpr_global": lambda: scale_by_constexpr_global[(4,)](x, y, 64, BLOCK=16),
        "grid_too_tall": lambda: scale_by_constexpr_global[(1, 70000)](x, y, 64, BLOCK=16),
        "big_accumulator": lambda: big_accumulator[(1,)](h, h, y, BLOCK=128, K=64, num_warps=1),
        "pipelined_matmul": lambda: pipelined_matmul[(1,)](h, h, y, 256, BLOCK=256, BLOCK_K=128, num_warps=8, num_stages=4),
    }
    for i, arch in enumerate(arches):
        with compile_only(arch=arch) as log:
            for name, launch in launches.items():
                if i > 0 and name in ("big_accumulator", "pipelined_matmul"):
                    continue
                with log.run(name):
                    launch()
                out[f"{name}@{arch}"] = {
                    "errors": [m for s, m in log.errors if s == name],
                    "records": [
                        {**r.__dict__, "grid": list(r.grid), "launch_problems": r.launch_problems()}
                        for r in log.records
                        if r.scenario == name
                    ],
                }
        out[f"launches@{arch}"] = log.launches
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("interpret", "compile"))
    p.add_argument("--arch", type=int, action="append")
    args = p.parse_args(argv)
    result = interpret() if args.mode == "interpret" else compile_for(args.arch or [90])
    print("RESULT " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
