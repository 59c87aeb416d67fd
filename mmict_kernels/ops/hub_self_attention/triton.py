"""Triton backend of :func:`mmict_kernels.ops.hub_self_attention` as torch.library custom ops.

``mmict::hub_self_attention_triton`` (forward: out, lse) and
``mmict::hub_self_attention_triton_backward`` (dq, dk, dv). The BLIP-2 objective mask is
computed inside the kernels of :mod:`mmict_kernels.ops._triton_attention` from the row index,
the key index, ``num_query_tokens`` and the per-sample key count ``num_query_tokens +
text_lengths[b]``; no (L x L) mask exists, and key blocks a query block cannot see (text keys
for query rows, query keys for text rows under "unimodal", keys after the block's last row
under "multimodal_causal") are skipped, as are the query blocks in the backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _triton_attention as TA
from .reference import MASK_ALIASES

_OP = "mmict::hub_self_attention_triton"
_MASK_MODES = {"bidirectional": TA.MASK_NONE, "unimodal": TA.MASK_UNIMODAL, "multimodal_causal": TA.MASK_MM_CAUSAL}


def _mask_mode(mask: str) -> int:
    mask = MASK_ALIASES.get(mask, mask)
    if mask not in _MASK_MODES:
        raise ValueError(f"mask: expected one of {tuple(_MASK_MODES)}, got {mask!r}")
    return _MASK_MODES[mask]


def _keys(num_query_tokens: int, text_lengths: Optional[torch.Tensor]) -> tuple[int, Optional[torch.Tensor]]:
    """Key layout and per-sample valid key counts: the queries, then the valid text tokens."""
    if text_lengths is None:
        return TA.KEYS_DENSE, None
    return TA.KEYS_DENSE_LENS, (text_lengths.to(torch.int32) + num_query_tokens).contiguous()


@torch.library.custom_op(_OP, mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_lengths: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    num_query_tokens: int,
    mask: str,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout, key_len = _keys(num_query_tokens, text_lengths)
    return TA.attention_forward(
        q, k, v, key_layout=layout, key_start=None, key_len=key_len, mask_mode=_mask_mode(mask),
        num_query_tokens=num_query_tokens, scale=scale, dropout_p=dropout_p, seed=seed,
    )  # fmt: skip


@_forward_op.register_fake
def _(q, k, v, text_lengths, seed, num_query_tokens, mask, scale, dropout_p):
    batch, seq_len, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_len), dtype=torch.float32)


@torch.library.custom_op(_OP + "_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    text_lengths: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    num_query_tokens: int,
    mask: str,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout, key_len = _keys(num_query_tokens, text_lengths)
    return TA.attention_backward(
        dout, q, k, v, out, lse, key_layout=layout, key_start=None, key_len=key_len, mask_mode=_mask_mode(mask),
        num_query_tokens=num_query_tokens, scale=scale, dropout_p=dropout_p, seed=seed,
    )  # fmt: skip


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, text_lengths, seed, num_query_tokens, mask, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, text_lengths, seed, num_query_tokens, mask, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, text_lengths, seed)
    ctx.num_query_tokens, ctx.mask, ctx.scale, ctx.dropout_p = num_query_tokens, mask, scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, text_lengths, seed = ctx.saved_tensors
    dq, dk, dv = _backward_op(
        dout, q, k, v, out, lse, text_lengths, seed, ctx.num_query_tokens, ctx.mask, ctx.scale, ctx.dropout_p
    )
    return dq, dk, dv, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def hub_self_attention_triton(q, k, v, num_query_tokens, text_lengths, mask, scale, dropout_p):
    """Backend entry (inputs validated by the front-end): returns (out, lse)."""
    TA.check_head_dim(q.shape[-1])
    _mask_mode(mask)  # fail here, not inside the custom op
    seed = TA.draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    return _forward_op(q, k, v, text_lengths, seed, int(num_query_tokens), MASK_ALIASES.get(mask, mask), float(scale), float(dropout_p))


def hub_self_attention_dropout_mask(seed: torch.Tensor, q: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The keep-mask (bool, (B, H, L, L)) that the kernels use for ``seed``; pass it to
    ``hub_self_attention_reference(dropout_mask=...)``. The seed of a call:
    ``torch.manual_seed(s); seed = draw_dropout_seed(q.device)``."""
    batch, seq_len, heads, _ = q.shape
    return TA.dropout_keep_mask(seed, batch, heads, seq_len, seq_len, seq_len, dropout_p)


draw_dropout_seed = TA.draw_dropout_seed

__all__ = ["hub_self_attention_triton", "hub_self_attention_dropout_mask", "draw_dropout_seed"]
