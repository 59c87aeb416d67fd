"""PyTorch reference of M-Hub cross-attention: the readable definition and the test oracle."""

from __future__ import annotations

import torch

from .._reference import masked_attention


def unpack_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (total, H, D) + cu_seqlens (B+1,) -> padded (B, max_len, H, D) and lengths (B,).

    One device sync (the longest sample sets the padded width).
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch = lengths.numel()
    max_len = int(lengths.max()) if batch > 0 else 0
    positions = torch.arange(max_len, device=x.device)
    index = cu_seqlens[:-1, None].long() + positions[None, :]
    valid = positions[None, :] < lengths[:, None]
    index = torch.where(valid, index, torch.zeros_like(index))  # padded slots read row 0, then get masked
    if x.shape[0] == 0:
        padded = x.new_zeros(batch, max_len, *x.shape[1:])
    else:
        padded = x[index.reshape(-1)].reshape(batch, max_len, *x.shape[1:])
    return padded, lengths


def key_padding_mask(seqlens_k: torch.Tensor, len_k: int) -> torch.Tensor:
    """(B,) valid key counts -> bool (B, 1, 1, Lk): key j of sample b is visible when j < seqlens_k[b]."""
    key_pos = torch.arange(len_k, device=seqlens_k.device)
    return (key_pos[None, :] < seqlens_k[:, None].long())[:, None, None, :]


def hub_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    seqlens_k: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments as :func:`mmict_kernels.ops.hub_cross_attention`; returns (out, lse).

    Every query of sample b attends to all valid image tokens of sample b (no causal mask).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens_k is not None:
        k, seqlens_k = unpack_varlen(k, cu_seqlens_k)
        v, _ = unpack_varlen(v, cu_seqlens_k)
    mask = None if seqlens_k is None else key_padding_mask(seqlens_k, k.shape[1])
    return masked_attention(q, k, v, mask, scale, dropout_p, dropout_mask)
