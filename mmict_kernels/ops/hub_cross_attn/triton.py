"""Triton backend of :func:`mmict_kernels.ops.hub_cross_attention` as torch.library custom ops.

``mmict::hub_cross_attention_triton_fwd`` (out, lse) and ``mmict::hub_cross_attention_triton_bwd``
(dq, dk, dv) are opaque to ``torch.compile`` (their fakes give the shapes) and differentiable
through ``register_autograd``. The kernels are the shared M-Hub kernels of
:mod:`mmict_kernels.ops.hub_attention_triton` with no mask mode (every valid image token).

Dropout: the entry point draws a Philox seed from torch's default generator (a 1-element
tensor, so ``torch.manual_seed`` reproduces a step and nothing syncs) and the backward reuses
it; :func:`hub_cross_attention_dropout_mask` returns the keep-mask of a seed for tests.
"""

from __future__ import annotations

import torch

from .. import hub_attention_triton as HA
from .. import triton_toolkit as tk


def _layout(cu_seqlens_k: torch.Tensor | None, seqlens_k: torch.Tensor | None):
    if cu_seqlens_k is not None:
        return HA.KEYS_PACKED
    return HA.KEYS_DENSE if seqlens_k is None else HA.KEYS_DENSE_LENS


def _keys(cu_seqlens_k, seqlens_k) -> HA.Keys:
    return HA.Keys(_layout(cu_seqlens_k, seqlens_k), start=cu_seqlens_k, length=seqlens_k)


@torch.library.custom_op("mmict::hub_cross_attention_triton_fwd", mutates_args=())
def hub_cross_attention_triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor | None, seqlens_k: torch.Tensor | None,
    seed: torch.Tensor | None, scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return HA.attention_forward(q, k, v, _keys(cu_seqlens_k, seqlens_k), scale=scale, dropout_p=dropout_p, seed=seed)


@hub_cross_attention_triton_fwd.register_fake
def _(q, k, v, cu_seqlens_k, seqlens_k, seed, scale, dropout_p):
    return HA.fake_forward(q)


@torch.library.custom_op("mmict::hub_cross_attention_triton_bwd", mutates_args=())
def hub_cross_attention_triton_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None, seqlens_k: torch.Tensor | None, seed: torch.Tensor | None,
    scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    keys = _keys(cu_seqlens_k, seqlens_k)
    return HA.attention_backward(dout, q, k, v, out, lse, keys, scale=scale, dropout_p=dropout_p, seed=seed)


@hub_cross_attention_triton_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_k, seqlens_k, seed, scale, dropout_p):
    return HA.fake_backward(q, k, v)


HA.register_attention_autograd(hub_cross_attention_triton_fwd, hub_cross_attention_triton_bwd, num_tensors=6)


def hub_cross_attention_triton(q, k, v, cu_seqlens_k, seqlens_k, scale, dropout_p):
    """Backend entry (inputs validated by the front-end): returns (out, lse)."""
    tk.check_attention_inputs("hub_cross_attention", q)
    seed = tk.draw_seed(q.device) if dropout_p > 0.0 else None
    return hub_cross_attention_triton_fwd(q, k, v, cu_seqlens_k, seqlens_k, seed, float(scale), float(dropout_p))


def hub_cross_attention_dropout_mask(
    seed: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cu_seqlens_k: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """The keep-mask (bool, (B, H, Lq, Lk)) that the kernels use for ``seed``.

    Lk is the reference's padded width: ``k.shape[1]`` for dense keys, the longest sample for
    packed ones (one host sync: a testing helper). Pass it to
    ``hub_cross_attention_reference(dropout_mask=...)``. The seed of a call:
    ``torch.manual_seed(s); seed = triton_toolkit.draw_seed(q.device)``.
    """
    batch, seq_len_q, heads, _ = q.shape
    if cu_seqlens_k is None:
        seq_len_k = drop_stride = k.shape[1]
    else:
        lengths = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        seq_len_k = int(lengths.max()) if batch > 0 else 0
        drop_stride = k.shape[0]
    return HA.dropout_keep_mask(seed, batch, heads, seq_len_q, seq_len_k, drop_stride, dropout_p)


__all__ = ["hub_cross_attention_triton", "hub_cross_attention_dropout_mask"]
