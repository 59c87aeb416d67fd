"""The ``torch`` backend of ops.hub_cross_attention: torch's fused SDPA CPU kernel (see ``ops/_sdpa.py``).

Dense K/V with per-sample lengths become a key-padding mask; packed (varlen) K/V are laid out
dense first (one gather, padded to the longest sample). The reference (``reference.py``) stays the
readable definition and the test oracle.
"""

from __future__ import annotations

import torch

from .._sdpa import attention
from .reference import key_padding_mask


def _dense_from_packed(cu_seqlens: torch.Tensor, *xs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Packed (total, H, D) tensors sharing offsets (B + 1,) -> each as (B, longest, H, D), and lengths (B,).

    One host read (the longest sample sets the width) and one gather index for all of ``xs`` (K and
    V); when all samples are equally long each result is a view of its input. ``index_select`` (not
    advanced indexing): its backward is ``index_add``, which sums the padded slots' zero gradients
    into row 0 cheaply.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch, total = lengths.numel(), xs[0].shape[0]
    longest = int(lengths.max()) if batch > 0 else 0
    if total == 0 or longest == 0:
        return tuple(x.new_zeros(batch, longest, *x.shape[1:]) for x in xs), lengths
    if total == batch * longest:  # every sample equally long (e.g. one 257-token image each): views, no gather
        return tuple(x.unflatten(0, (batch, longest)) for x in xs), lengths
    positions = torch.arange(longest, device=xs[0].device)
    index = cu_seqlens[:-1, None].long() + positions[None, :]
    index = torch.where(positions[None, :] < lengths[:, None], index, torch.zeros_like(index)).reshape(-1)  # padding reads row 0
    return tuple(x.index_select(0, index).reshape(batch, longest, *x.shape[1:]) for x in xs), lengths


def hub_cross_attention_sdpa(q, k, v, cu_seqlens_k, seqlens_k, scale, dropout_p):
    """Backend entry (inputs validated by the front-end, as the Triton and CUDA entries): returns (out, lse)."""
    if cu_seqlens_k is not None:
        (k, v), seqlens_k = _dense_from_packed(cu_seqlens_k, k, v)
    mask = None if seqlens_k is None else key_padding_mask(seqlens_k, k.shape[1])
    return attention(q, k, v, mask, scale, dropout_p)
