"""Triton backend of :func:`mmict_kernels.ops.hub_cross_attention` as torch.library custom ops.

``mmict::hub_cross_attention_triton`` (forward: out, lse) and
``mmict::hub_cross_attention_triton_backward`` (dq, dk, dv) are opaque to ``torch.compile``
(fake implementations give the shapes) and differentiable through ``register_autograd``.
The kernels live in :mod:`mmict_kernels.ops._triton_attention`.

Dropout: the wrapper draws a Philox seed from torch's default generator (a 1-element tensor,
so ``torch.manual_seed`` reproduces a step and nothing syncs) and the backward reuses it;
:func:`hub_cross_attention_dropout_mask` returns the keep-mask of a seed for tests.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _triton_attention as TA

_OP = "mmict::hub_cross_attention_triton"


def _layout(cu_seqlens_k: Optional[torch.Tensor], seqlens_k: Optional[torch.Tensor]) -> int:
    if cu_seqlens_k is not None:
        return TA.KEYS_PACKED
    return TA.KEYS_DENSE if seqlens_k is None else TA.KEYS_DENSE_LENS


@torch.library.custom_op(_OP, mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor],
    seqlens_k: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return TA.attention_forward(
        q, k, v, key_layout=_layout(cu_seqlens_k, seqlens_k), key_start=cu_seqlens_k, key_len=seqlens_k,
        mask_mode=TA.MASK_NONE, num_query_tokens=0, scale=scale, dropout_p=dropout_p, seed=seed,
    )  # fmt: skip


@_forward_op.register_fake
def _(q, k, v, cu_seqlens_k, seqlens_k, seed, scale, dropout_p):
    batch, seq_len_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_len_q), dtype=torch.float32)


@torch.library.custom_op(_OP + "_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_k: Optional[torch.Tensor],
    seqlens_k: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return TA.attention_backward(
        dout, q, k, v, out, lse, key_layout=_layout(cu_seqlens_k, seqlens_k), key_start=cu_seqlens_k, key_len=seqlens_k,
        mask_mode=TA.MASK_NONE, num_query_tokens=0, scale=scale, dropout_p=dropout_p, seed=seed,
    )  # fmt: skip


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_k, seqlens_k, seed, scale, dropout_p):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_k, seqlens_k, seed, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_k, seqlens_k, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_k, seqlens_k, seed = ctx.saved_tensors
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, cu_seqlens_k, seqlens_k, seed, ctx.scale, ctx.dropout_p)
    return dq, dk, dv, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def hub_cross_attention_triton(q, k, v, cu_seqlens_k, seqlens_k, scale, dropout_p):
    """Backend entry (inputs validated by the front-end): returns (out, lse)."""
    TA.check_head_dim(q.shape[-1])
    seed = TA.draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    return _forward_op(q, k, v, cu_seqlens_k, seqlens_k, seed, float(scale), float(dropout_p))


def hub_cross_attention_dropout_mask(
    seed: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cu_seqlens_k: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """The keep-mask (bool, (B, H, Lq, Lk)) that the kernels use for ``seed``.

    Lk is the reference's padded width: ``k.shape[1]`` for dense keys, the longest sample for
    packed ones (one host sync). Pass it to ``hub_cross_attention_reference(dropout_mask=...)``.
    To get the seed of a call: ``torch.manual_seed(s); seed = draw_dropout_seed(q.device)``.
    """
    batch, seq_len_q, heads, _ = q.shape
    if cu_seqlens_k is None:
        seq_len_k = drop_stride = k.shape[1]
    else:
        lengths = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        seq_len_k = int(lengths.max()) if batch > 0 else 0
        drop_stride = k.shape[0]
    return TA.dropout_keep_mask(seed, batch, heads, seq_len_q, seq_len_k, drop_stride, dropout_p)


draw_dropout_seed = TA.draw_dropout_seed

__all__ = ["hub_cross_attention_triton", "hub_cross_attention_dropout_mask", "draw_dropout_seed"]
