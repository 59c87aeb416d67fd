"""Dropout masks of the torch paths: drawn from a seed, and kept for backward packed on a CPU.

Both torch-path dropouts (attention probabilities in ``_sdpa.py``, the hidden states in
``fused_epilogue/recompute.py``) draw their mask with ``torch.rand`` from a private generator
seeded by an int, so the same seed gives the same mask again. For backward:

- on a CPU the mask is kept packed 8 to a byte (:mod:`._bitmask`): unpacking costs ~1/10 of
  drawing it again, torch's CPU generator being single-threaded;
- elsewhere (the torch backend on a GPU) nothing is kept and the seed draws it again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._bitmask import pack_bool, unpack_bool

SEED_HIGH = 2**62  # seeds drawn when none is given lie in [0, 2**62)


def draw_seed() -> int:
    """A seed from torch's default CPU generator: ``torch.manual_seed`` reproduces it, and activation
    checkpointing (which restores that generator for the recomputation) draws the same one. A CPU
    tensor, so reading it never waits for a GPU."""
    return int(torch.randint(0, SEED_HIGH, (), dtype=torch.int64))


def _uniform(seed: int, shape, device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device)


def keep_mask_from_seed(seed: int, shape, dropout_p: float, device) -> torch.Tensor:
    """The boolean keep-mask (True = kept, probability ``1 - dropout_p``) that ``seed`` gives on ``device``."""
    return _uniform(seed, shape, device) >= dropout_p


def drop_mask_from_seed(seed: int, shape, dropout_p: float, device) -> torch.Tensor:
    """The complement of :func:`keep_mask_from_seed` from the same draws (what ``masked_fill_`` wants)."""
    return _uniform(seed, shape, device) < dropout_p


def mask_to_save(mask: torch.Tensor) -> torch.Tensor | None:
    """What backward keeps of ``mask``: packed on a CPU, nothing elsewhere (the seed draws it again)."""
    return pack_bool(mask) if mask.device.type == "cpu" else None


def saved_mask(saved: torch.Tensor | None, shape, draw_again: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The mask :func:`mask_to_save` kept (of ``shape``), or ``draw_again()`` where nothing was kept."""
    return unpack_bool(saved, shape) if saved is not None else draw_again()


__all__ = ["SEED_HIGH", "draw_seed", "drop_mask_from_seed", "keep_mask_from_seed", "mask_to_save", "saved_mask"]
