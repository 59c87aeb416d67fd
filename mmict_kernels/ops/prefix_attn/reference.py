"""PyTorch reference of demo-prefix attention.

The readable (and memory-hungry) way: gather every row's group prefix, concatenate it in
front of the row's own keys, repeat K/V heads for grouped-query attention, build the full
mask, and run plain attention. The kernels do none of these copies.
"""

from __future__ import annotations

import torch

from .._reference import masked_attention


def prefix_attention_mask(
    len_q: int,
    len_prefix: int,
    len_k: int,
    prefix_ids: torch.Tensor,
    prefix_lengths: torch.Tensor | None,
    seqlens_k: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """Boolean (B, 1, Lq, Lp + Lk) mask over [group prefix ; own keys].

    Prefix key j is visible iff j < prefix_lengths[group] (right-padded prefixes).
    Own key j is visible iff it is one of the row's last seqlens_k[b] keys (left padding, as
    in transformers generation) and, when causal, j <= i + (Lk - Lq) (queries are the last Lq
    positions of the row's own sequence: bottom-right aligned, so decode steps work).
    """
    device = prefix_ids.device
    batch = prefix_ids.shape[0]
    i = torch.arange(len_q, device=device)[:, None]
    jp = torch.arange(len_prefix, device=device)
    jk = torch.arange(len_k, device=device)[None, :]
    if prefix_lengths is None:
        prefix_visible = torch.ones(batch, len_prefix, dtype=torch.bool, device=device)
    else:
        prefix_visible = jp[None, :] < prefix_lengths.long()[prefix_ids][:, None]  # (B, Lp)
    own_visible = torch.ones(batch, 1, len_k, dtype=torch.bool, device=device)
    if seqlens_k is not None:
        own_visible = (jk >= len_k - seqlens_k.long()[:, None])[:, None, :]  # (B, 1, Lk)
    if causal:
        own_visible = own_visible & (jk <= i + (len_k - len_q))[None]  # (B, Lq, Lk)
    own_visible = own_visible.expand(batch, len_q, len_k)
    prefix_visible = prefix_visible[:, None, :].expand(batch, len_q, len_prefix)
    return torch.cat([prefix_visible, own_visible], dim=-1)[:, None]


def prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_ids: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    prefix_lengths: torch.Tensor | None = None,
    seqlens_k: torch.Tensor | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments as :func:`mmict_kernels.ops.prefix_attention`; returns (out, lse).

    Gradients reach ``prefix_k``/``prefix_v`` through the gather, summed over the rows of each
    group by autograd (``deterministic`` has no effect here).
    """
    batch, len_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    if prefix_ids is None:
        prefix_ids = torch.zeros(batch, dtype=torch.long, device=q.device)
    prefix_ids = prefix_ids.long()
    keys = torch.cat([prefix_k[prefix_ids], k], dim=1)  # (B, Lp + Lk, Hkv, D): the copies the kernels avoid
    values = torch.cat([prefix_v[prefix_ids], v], dim=1)
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=2)
        values = values.repeat_interleave(heads // kv_heads, dim=2)
    mask = prefix_attention_mask(len_q, prefix_k.shape[1], k.shape[1], prefix_ids, prefix_lengths, seqlens_k, causal)
    return masked_attention(q, keys, values, mask, scale)
