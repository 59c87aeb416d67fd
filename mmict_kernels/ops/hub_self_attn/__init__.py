"""M-Hub self-attention over [learned queries ; text] with the objective's mask computed in-kernel.

Files: ``reference.py`` (PyTorch oracle, the mask definitions), ``sdpa.py`` (the ``torch``
backend: torch's SDPA kernels), ``triton.py`` (Triton kernels and their torch.library custom
ops). There is no CUDA C++ kernel for this op (``backend="cuda"`` explains so); ``auto`` uses
Triton on GPUs.
"""

from __future__ import annotations

import torch

from ... import backends
from .. import checks as C
from .reference import MASK_ALIASES, MASK_MODES, canonical_mask, hub_self_attention_reference, self_attention_mask

OP = "hub_self_attention"

# torch: SDPA's fused CPU kernel (sdpa.py); reference.py stays the readable definition and the oracle.
backends.register(OP, "torch", __name__ + ".sdpa", "hub_self_attention_sdpa", backends.REFERENCE)
backends.register(OP, "triton", __name__ + ".triton", "hub_self_attention_triton", backends.TRITON_ATTENTION)


def hub_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_query_tokens: int,
    text_lengths: torch.Tensor | None = None,
    mask: str = "bidirectional",
    softmax_scale: float | None = None,
    backend: str = "auto",
    *,
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Self-attention over M-Hub's [queries ; text] sequence, masked by objective.

    Args:
        q, k, v: (B, L, H, D) with L = num_query_tokens + T (T text slots, right-padded).
        num_query_tokens: number of learned query tokens at the front (0 <= Nq <= L).
        text_lengths: int32 (B,) valid text tokens per sample, in [0, T]; the rest is padding
            and is never attended to. Default: all T valid.
        mask: "bidirectional" (ITM / InstructBLIP), "unimodal" (ITC: queries see queries, text
            sees text) or "multimodal_causal" (ITG: queries see queries, text sees all queries and
            earlier text). Aliases "itm", "itc", "itg". The mask is never materialized by the kernels.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: "auto", "triton" or "torch" ("cuda" has no kernel for this op).
        dropout_p: attention-probability dropout (pass 0.0 in eval).
        return_lse: also return the log-sum-exp, (B, H, L) float32 (not differentiated).

    Returns:
        out (B, L, H, D) in q's dtype (and lse). Padded text rows attend like text rows (as in
        transformers); a row that sees no key gives zeros.
    """
    q, k, v = C.autocast_inputs(q, k, v)
    C.check_tensor("q", q, ndim=4, dtypes=C.FLOAT_DTYPES)
    batch, seq_len, heads, head_dim = q.shape
    C.check_head_dim("q", head_dim)
    for name, t in (("k", k), ("v", v)):
        C.check_tensor(name, t, ndim=4)
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} (same as q: B, L, H, D), got {tuple(t.shape)}")
    C.check_same_dtype_device("q", q, k=k, v=v)
    C.check_last_dim_contiguous(q=q, k=k, v=v)
    if not isinstance(num_query_tokens, int) or isinstance(num_query_tokens, bool):
        raise TypeError(f"num_query_tokens: expected an int, got {type(num_query_tokens).__name__}")
    if not 0 <= num_query_tokens <= seq_len:
        raise ValueError(f"num_query_tokens: expected 0 <= num_query_tokens <= L = {seq_len}, got {num_query_tokens}")
    mask = canonical_mask(mask)
    scale = C.check_softmax_scale(softmax_scale, head_dim)
    dropout_p = C.check_dropout(dropout_p)
    C.check_backend_name(backend)
    if text_lengths is not None:
        C.check_index_tensor("text_lengths", text_lengths, shape=(batch,), dtypes=(torch.int32, torch.int64), device=q.device)
        text_lengths = text_lengths.to(torch.int32).contiguous()
        if C.value_checks_enabled(q):
            C.check_range(
                "text_lengths", text_lengths, 0, seq_len - num_query_tokens, "valid text lengths (L - num_query_tokens = T)"
            )

    _, impl = backends.resolve(OP, backend, device_type=q.device.type, dtype=q.dtype, head_dim=head_dim, dropout=dropout_p > 0)
    out, lse = impl(q, k, v, num_query_tokens, text_lengths, mask, scale, dropout_p)
    return (out, lse) if return_lse else out


__all__ = [
    "hub_self_attention",
    "hub_self_attention_reference",
    "self_attention_mask",
    "canonical_mask",
    "MASK_MODES",
    "MASK_ALIASES",
]
