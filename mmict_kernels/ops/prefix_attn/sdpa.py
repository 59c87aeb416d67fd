"""The ``torch`` backend of ops.prefix_attention: torch's fused SDPA CPU kernel (see ``ops/_sdpa.py``).

Each row's keys are [its group's prefix ; its own keys] (one gather and one concatenation: the
copies the Triton and CUDA kernels avoid), masked by ``prefix_attention_mask``; grouped-query K/V
go to the kernel as they are. The reference (``reference.py``) stays the readable definition and the
test oracle.
"""

from __future__ import annotations

import torch

from .._sdpa import attention
from .reference import prefix_attention_mask


def prefix_attention_sdpa(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale, prefix_lengths, seqlens_k, deterministic):
    """Backend entry (inputs validated by the front-end, as the Triton and CUDA entries): returns (out, lse).

    The prefix gradients are summed over each group's rows by ``index_select``'s backward
    (``index_add``, a fixed order: ``deterministic`` has nothing to change).
    """
    keys = torch.cat([prefix_k.index_select(0, prefix_ids), k], dim=1)  # (B, Lp + Lk, Hkv, D)
    values = torch.cat([prefix_v.index_select(0, prefix_ids), v], dim=1)
    mask = None
    if causal or prefix_lengths is not None or seqlens_k is not None:
        mask = prefix_attention_mask(q.shape[1], prefix_k.shape[1], k.shape[1], prefix_ids, prefix_lengths, seqlens_k, causal)
    return attention(q, keys, values, mask, scale)
