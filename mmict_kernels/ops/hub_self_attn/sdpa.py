"""The ``torch`` backend of ops.hub_self_attention: torch's fused SDPA CPU kernel (see ``ops/_sdpa.py``).

The objective's mask (and the text padding) is expressed as SDPA's attention mask, one (B, 1, L, L)
boolean per call; the reference (``reference.py``) stays the readable definition and the test oracle.
"""

from __future__ import annotations

from .._sdpa import attention
from .reference import self_attention_mask


def hub_self_attention_sdpa(q, k, v, num_query_tokens, text_lengths, mask, scale, dropout_p):
    """Backend entry (inputs validated by the front-end, as the Triton entry): returns (out, lse)."""
    if mask == "bidirectional" and text_lengths is None:
        full_mask = None  # every key visible: no mask at all
    else:
        full_mask = self_attention_mask(num_query_tokens, q.shape[1], text_lengths, mask, q.device)
    return attention(q, k, v, full_mask, scale, dropout_p)
