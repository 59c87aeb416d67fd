"""Triton backend of :func:`mmict_kernels.ops.hub_self_attention` as torch.library custom ops.

``mmict::hub_self_attention_triton_fwd`` (out, lse) and ``mmict::hub_self_attention_triton_bwd``
(dq, dk, dv). The BLIP-2 objective mask is computed inside the kernels of
:mod:`mmict_kernels.ops.hub_attention_triton` from the row index, the key index,
``num_query_tokens`` and the per-sample key count ``num_query_tokens + text_lengths[b]``; no
(L x L) mask exists, and key blocks a query block cannot see (text keys for query rows, query
keys for text rows under "unimodal", keys after the block's last row under "multimodal_causal")
are skipped, as are the query blocks in the backward.
"""

from __future__ import annotations

import torch

from .. import hub_attention_triton as HA
from .. import triton_toolkit as tk
from .reference import canonical_mask

_MASK_MODES = {"bidirectional": HA.MASK_NONE, "unimodal": HA.MASK_UNIMODAL, "multimodal_causal": HA.MASK_MM_CAUSAL}


def _keys(num_query_tokens: int, text_lengths: torch.Tensor | None, mask: str) -> HA.Keys:
    """Key layout and per-sample valid key counts (the queries, then the valid text tokens), and the mask mode."""
    mask_mode = _MASK_MODES[canonical_mask(mask)]
    if text_lengths is None:
        return HA.Keys(HA.KEYS_DENSE, mask_mode=mask_mode, num_query_tokens=num_query_tokens)
    length = (text_lengths.to(torch.int32) + num_query_tokens).contiguous()
    return HA.Keys(HA.KEYS_DENSE_LENS, length=length, mask_mode=mask_mode, num_query_tokens=num_query_tokens)


@torch.library.custom_op("mmict::hub_self_attention_triton_fwd", mutates_args=())
def hub_self_attention_triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_lengths: torch.Tensor | None, seed: torch.Tensor | None,
    num_query_tokens: int, mask: str, scale: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    keys = _keys(num_query_tokens, text_lengths, mask)
    return HA.attention_forward(q, k, v, keys, scale=scale, dropout_p=dropout_p, seed=seed)


@hub_self_attention_triton_fwd.register_fake
def _(q, k, v, text_lengths, seed, num_query_tokens, mask, scale, dropout_p):
    return HA.fake_forward(q)


@torch.library.custom_op("mmict::hub_self_attention_triton_bwd", mutates_args=())
def hub_self_attention_triton_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    text_lengths: torch.Tensor | None, seed: torch.Tensor | None, num_query_tokens: int, mask: str, scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    keys = _keys(num_query_tokens, text_lengths, mask)
    return HA.attention_backward(dout, q, k, v, out, lse, keys, scale=scale, dropout_p=dropout_p, seed=seed)


@hub_self_attention_triton_bwd.register_fake
def _(dout, q, k, v, out, lse, text_lengths, seed, num_query_tokens, mask, scale, dropout_p):
    return HA.fake_backward(q, k, v)


HA.register_attention_autograd(hub_self_attention_triton_fwd, hub_self_attention_triton_bwd, num_tensors=5)


def hub_self_attention_triton(q, k, v, num_query_tokens, text_lengths, mask, scale, dropout_p):
    """Backend entry (inputs validated by the front-end): returns (out, lse)."""
    tk.check_attention_inputs("hub_self_attention", q)
    mask = canonical_mask(mask)  # fail here, not inside the custom op
    seed = tk.draw_seed(q.device) if dropout_p > 0.0 else None
    return hub_self_attention_triton_fwd(q, k, v, text_lengths, seed, int(num_query_tokens), mask, float(scale), float(dropout_p))


def hub_self_attention_dropout_mask(seed: torch.Tensor, q: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The keep-mask (bool, (B, H, L, L)) that the kernels use for ``seed``; pass it to
    ``hub_self_attention_reference(dropout_mask=...)``. The seed of a call:
    ``torch.manual_seed(s); seed = triton_toolkit.draw_seed(q.device)``."""
    batch, seq_len, heads, _ = q.shape
    return HA.dropout_keep_mask(seed, batch, heads, seq_len, seq_len, seq_len, dropout_p)


__all__ = ["hub_self_attention_triton", "hub_self_attention_dropout_mask"]
