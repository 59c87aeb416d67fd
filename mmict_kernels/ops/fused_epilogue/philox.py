"""Triton's ``tl.rand`` re-computed in plain PyTorch: the dropout keep-mask of the fused epilogues.

The Triton kernels draw element ``i`` (row-major index into the contiguous input) as
``tl.rand(seed, i)`` with an int32 offset: Philox-4x32 with 10 rounds, counter
``(i, 0, 0, 0)``, key ``(seed & 0xffffffff, seed >> 32)``, first output word mapped to a
float32 in [0, 1). An element is kept when that number is ``>= dropout_p``.

Doing the same integer arithmetic here (in int64, which holds every 32-bit product once
split into 16-bit halves) gives the very same mask on any device, so

- the ``torch`` backend drops exactly what the ``triton`` backend drops for a seed, and
- tests compare a kernel against the reference with the *same* mask, exactly.

The int32-offset path of ``tl.rand`` has been the same in every Triton 2.x/3.x release
(64-bit offsets changed between releases, so the kernels never use them; inputs are limited
to fewer than 2**31 elements).
"""

from __future__ import annotations

import torch

PHILOX_ROUNDS = 10
_KEY_A = 0x9E3779B9  # key increments (golden ratio, sqrt(3) - 1)
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53  # round multipliers
_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF
# tl.rand's uint32 -> float32 scale: the largest value with (2**31 - 1) * scale < 1 in float32.
_UNIFORM_SCALE = 4.6566127342e-10
MAX_ELEMENTS = 2**31 - 1  # int32 offsets


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` in [0, 2**32).

    a * b can need 64 unsigned bits, which int64 cannot hold; a * (16-bit half of b) fits.
    """
    low_part = a * (b & 0xFFFF)  # < 2**48
    high_part = a * (b >> 16)  # < 2**48; the product is low_part + high_part * 2**16
    middle = low_part + ((high_part & 0xFFFF) << 16)  # < 2**49
    return (high_part >> 16) + (middle >> 32), middle & _MASK32


def philox_uniform(seed: int | torch.Tensor, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``tl.rand(seed, arange(numel))`` as a float32 tensor of shape (numel,).

    seed: a Python int or a one-element int64 tensor in [0, 2**63) (a tensor seed stays on its
    device: no host sync, so this traces under ``torch.compile``).
    """
    if numel > MAX_ELEMENTS:
        raise ValueError(f"numel: the dropout stream uses int32 offsets, so at most {MAX_ELEMENTS} elements, got {numel}")
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        seed = torch.tensor(int(seed), dtype=torch.int64, device=device)
    key0 = seed & _MASK32
    key1 = (seed >> 32) & _MASK32
    c0 = torch.arange(numel, dtype=torch.int64, device=device)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ key0, lo_b, hi_a ^ c3 ^ key1, lo_a
        key0 = (key0 + _KEY_A) & _MASK32
        key1 = (key1 + _KEY_B) & _MASK32
    # uint32 -> int32 bit pattern -> fold negatives (~x) -> float32 in [0, 1), as tl.rand does.
    as_int32 = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    folded = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=device)


def dropout_keep_mask(
    seed: int | torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dropout_p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The boolean keep-mask (True = kept) the fused-epilogue kernels use for ``seed`` and ``shape``.

    Element ``i`` of the row-major flattened ``shape`` is kept when ``tl.rand(seed, i) >= dropout_p``
    (both sides in float32). Kept values are scaled by ``1 / (1 - dropout_p)``.
    """
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    uniform = philox_uniform(seed, numel, device)
    threshold = torch.tensor(float(dropout_p), dtype=torch.float32, device=uniform.device)
    return (uniform >= threshold).reshape(shape)


__all__ = ["dropout_keep_mask", "philox_uniform", "MAX_ELEMENTS"]
