"""The readable PyTorch core shared by the three ops' references (the test oracle).

It materializes the (Lq x Lk) scores and an explicit boolean mask: that is what
the kernels avoid, and what makes this the oracle. Precision follows
FlashAttention's reference: the two matmuls run in the input dtype, the softmax
in float32 (float64 for float64 inputs), and the probabilities are cast back to
the input dtype before the second matmul.
"""

from __future__ import annotations

import torch


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, masked) v.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); mask: bool, broadcastable to (B, H, Lq, Lk),
    True where a query may attend to a key (None: everything).
    dropout_mask: optional bool keep-mask broadcastable to (B, H, Lq, Lk); when given it is
    used instead of drawing one (kernels export theirs so tests can compare exactly).
    Returns out (B, Lq, H, D) in q's dtype and lse (B, H, Lq) in float32 (float64 for
    float64 inputs); a row with no visible key gives out = 0 and lse = -inf.
    """
    acc = softmax_dtype(q.dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).to(acc) * softmax_scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # Row max without NaN for empty rows: a row that sees nothing uses 0, so exp(-inf - 0) = 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalized = torch.exp(scores - row_max)
    row_sum = unnormalized.sum(dim=-1, keepdim=True)
    probs = unnormalized / row_sum.clamp_min(torch.finfo(acc).tiny)
    with torch.no_grad():
        lse = (row_max + torch.log(row_sum)).squeeze(-1)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(probs) >= dropout_p
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out, lse
