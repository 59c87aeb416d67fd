"""The ``torch`` backend of ops.hub_cross_attention: torch's fused SDPA CPU kernel (see ``ops/_sdpa.py``).

Dense K/V with per-sample lengths become a key-padding mask; packed (varlen) K/V are laid out
dense first (one gather, padded to the longest sample). The reference (``reference.py``) stays the
readable definition and the test oracle.
"""

from __future__ import annotations

import torch

from .._sdpa import attention


def _dense_from_packed(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (total, H, D) + offsets (B + 1,) -> (B, longest, H, D) and lengths (B,).

    One host read (the longest sample sets the width); when all samples are equally long the
    result is a view of ``x``. ``index_select`` (not advanced indexing):
    its backward is ``index_add``, which sums the padded slots' zero gradients into row 0 cheaply.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = lengths.numel()
    longest = int(lengths.max()) if batch > 0 else 0
    if x.shape[0] == 0 or longest == 0:
        return x.new_zeros(batch, longest, *x.shape[1:]), lengths
    if x.shape[0] == batch * longest:  # every sample equally long (e.g. one 257-token image each): a view, no gather
        return x.unflatten(0, (batch, longest)), lengths
    positions = torch.arange(longest, device=x.device)
    index = cu_seqlens[:-1, None].long() + positions[None, :]
    index = torch.where(positions[None, :] < lengths[:, None], index, torch.zeros_like(index))  # padding reads row 0
    return x.index_select(0, index.reshape(-1)).reshape(batch, longest, *x.shape[1:]), lengths


def hub_cross_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    seqlens_k: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments as the reference (inputs already checked); returns (out, lse)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens_k is not None:
        k, seqlens_k = _dense_from_packed(k, cu_seqlens_k)
        v, _ = _dense_from_packed(v, cu_seqlens_k)
    mask = None
    if seqlens_k is not None:
        key_pos = torch.arange(k.shape[1], device=q.device)
        mask = (key_pos[None, :] < seqlens_k[:, None].long())[:, None, None, :]  # (B, 1, 1, Lk)
    return attention(q, k, v, mask, scale, dropout_p)
