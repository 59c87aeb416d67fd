"""What every Triton kernel of mmict_kernels shares: constants, dots and casts, tiles, device facts.

One home for each convention, so the kernel families (M-Hub attention, prefix attention, the
fused epilogues) read alike:

- **Constants** are ``tl.constexpr`` module globals, used by name inside kernels: Triton's
  compiler rejects any other global (the CPU interpreter accepts them, which is how a kernel
  can pass every interpreter test and still not compile).
- **Dots and casts**: :func:`dot` and :func:`cast` are ``tl.dot`` and ``.to(dtype)`` plus the
  two workarounds Triton's CPU interpreter needs for bfloat16 (it stores bfloat16 as uint16):
  ``tl.dot`` there multiplies the raw bit patterns, so bfloat16 operands are widened to float32
  first (exact products, float32 accumulation: what a bfloat16 MMA gives); and float32 ->
  bfloat16 casts truncate there (a GPU rounds to nearest even), so the bits are rounded first.
  Both are compiled out (``INTERPRETING`` is a constexpr) for the GPU. :func:`dot_precision`:
  float32 inputs use IEEE float32 dots, never TF32, so they meet the float32 oracle.
- **Support set**: the dtypes and head dims come from :data:`mmict_kernels.backends.TRITON_ATTENTION`
  (the registry's facts); :func:`check_attention_inputs` is the kernels' own check.
- **Tiles**: each kernel family has its heuristic, all return :class:`Tiles`; tests shrink tiles
  through the one hook :func:`force_tiles` (so tiny shapes cross many blocks in the interpreter).
- **Device facts**: :func:`num_sms`, :func:`capability` and :func:`targets_gpu` take the GPU branch for CUDA tensors
  and for CPU tensors under the compile-only harness (:func:`mmict_kernels.backends.simulate_gpu`).
- **Arguments**: :func:`strides` and :func:`pointer_or` (an unused pointer argument).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .. import backends

# ---------------------------------------------------------------------------------------
# Constants (tl.constexpr so the compiler accepts them inside kernels; .value on the host)
# ---------------------------------------------------------------------------------------
LOG2E = tl.constexpr(math.log2(math.e))  # softmax runs in base 2: exp2 is the hardware instruction
LN2 = tl.constexpr(math.log(2.0))  # base-2 log-sum-exp -> natural log
INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))  # exact GELU: x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))  # the normal density's constant (GELU backward)
INTERPRETING = tl.constexpr(backends.triton_interpret())  # fixed at import, as @triton.jit's own choice is


# ---------------------------------------------------------------------------------------
# Dots and casts
# ---------------------------------------------------------------------------------------
@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)`` with float32 accumulation (``acc=None`` starts from zero)."""
    if INTERPRETING:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """float32 -> ``dtype`` rounding to nearest even (as the GPU does), also in the interpreter."""
    if INTERPRETING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dropout_seed(SEED, HAS_DROPOUT: tl.constexpr):
    """The Philox seed, read from the 1-element int64 tensor SEED (0, never used, without dropout)."""
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    return seed


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot: IEEE for float32 (no silent TF32), the MMA for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------
# Support set (the registry's facts)
# ---------------------------------------------------------------------------------------
def check_attention_inputs(op: str, q: torch.Tensor) -> None:
    """The Triton attention kernels' own check of dtype and head dim (the registry refuses earlier)."""
    caps = backends.TRITON_ATTENTION
    if q.dtype not in caps.dtypes:
        names = sorted(str(d).replace("torch.", "") for d in caps.dtypes)
        raise TypeError(f"q: the Triton {op} supports dtypes {names}, got {str(q.dtype).replace('torch.', '')}")
    if q.shape[-1] not in caps.head_dims:
        raise ValueError(
            f"q: the Triton {op} supports head dims {sorted(caps.head_dims)}, got {q.shape[-1]}; use backend='torch'"
        )


# ---------------------------------------------------------------------------------------
# Tiles and the test hook
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int = 4
    num_stages: int = 2

    def launch(self) -> dict:
        """The launch options of these tiles (``kernel[grid](..., **tiles.launch())``)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


_FORCED: Tiles | None = None


@contextlib.contextmanager
def force_tiles(block_m: int, block_n: int, num_warps: int | None = None, num_stages: int | None = None) -> Iterator[None]:
    """Tests: every attention kernel launched inside the block uses these tiles.

    At shapes small enough for the CPU interpreter, 16 x 16 tiles still cross many blocks
    (block skipping, partial tiles, packed block tables). ``num_warps``/``num_stages`` default
    to what the heuristic chose.
    """
    global _FORCED
    previous, _FORCED = _FORCED, Tiles(block_m, block_n, num_warps or 0, num_stages or 0)
    try:
        yield
    finally:
        _FORCED = previous


def apply_forced(tiles: Tiles) -> Tiles:
    """``tiles`` with a :func:`force_tiles` override applied (each heuristic ends with this)."""
    if _FORCED is None:
        return tiles
    return Tiles(
        _FORCED.block_m,
        _FORCED.block_n,
        _FORCED.num_warps or tiles.num_warps,
        _FORCED.num_stages or tiles.num_stages,
    )


# ---------------------------------------------------------------------------------------
# Device facts
# ---------------------------------------------------------------------------------------
INTERPRETER_SMS = 4  # the CPU interpreter runs programs one by one: a few "SMs" keep grids small


def targets_gpu(device: torch.device) -> bool:
    """Whether launches on ``device`` are GPU launches (CUDA, or CPU under the compile-only harness)."""
    return device.type == "cuda" or (device.type == "cpu" and backends.simulated_gpu() is not None)


@functools.cache
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability launches on ``device`` compile for (the simulated GPU's in the harness); None
    in the CPU interpreter."""
    simulated = backends.simulated_gpu()
    if device.type == "cpu" and simulated is not None:
        return tuple(simulated.capability)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors the grid should fill (the simulated GPU's in the harness)."""
    simulated = backends.simulated_gpu()
    if device.type == "cpu" and simulated is not None:
        return simulated.num_sms
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def strides(t: torch.Tensor, dims: int = 3) -> tuple[int, ...]:
    """The first ``dims`` strides of ``t`` (the kernels take (batch, row, head) strides; the head dim is contiguous)."""
    return tuple(t.stride(i) for i in range(dims))


def pointer_or(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A tensor to pass as a pointer argument. An unused one (None) becomes ``like``, which the
    kernel never reads (its constexpr branch is compiled out), so no allocation or launch happens
    per call; an empty one (no valid address) becomes a 1-element placeholder."""
    if t is None:
        return like
    if t.numel() == 0:
        return torch.zeros(1, dtype=t.dtype, device=t.device)
    return t


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh Philox seed from torch's default generator of ``device`` (1-element int64 tensor):
    ``torch.manual_seed`` reproduces it, and nothing syncs or recompiles per step."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


__all__ = [
    "LOG2E",
    "LN2",
    "INV_SQRT2",
    "INV_SQRT_2PI",
    "INTERPRETING",
    "dot",
    "cast",
    "dot_precision",
    "check_attention_inputs",
    "Tiles",
    "force_tiles",
    "apply_forced",
    "targets_gpu",
    "capability",
    "num_sms",
    "strides",
    "pointer_or",
    "draw_seed",
    "cdiv",
]
