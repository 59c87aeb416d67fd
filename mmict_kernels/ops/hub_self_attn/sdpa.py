"""The ``torch`` backend of ops.hub_self_attention: torch's fused SDPA CPU kernel (see ``ops/_sdpa.py``).

The objective's mask (and the text padding) is expressed as SDPA's attention mask, one (B, 1, L, L)
boolean per call; the reference (``reference.py``) stays the readable definition and the test oracle.
"""

from __future__ import annotations

import torch

from .._sdpa import attention
from .reference import self_attention_mask


def hub_self_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_query_tokens: int,
    text_lengths: torch.Tensor | None,
    mask: str,
    softmax_scale: float,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments as the reference (inputs already checked); returns (out, lse)."""
    seq_len = q.shape[1]
    if mask == "bidirectional" and text_lengths is None:
        full_mask = None  # every key visible: no mask at all
    else:
        full_mask = self_attention_mask(num_query_tokens, seq_len, text_lengths, mask, q.device)
    return attention(q, k, v, full_mask, softmax_scale, dropout_p)
