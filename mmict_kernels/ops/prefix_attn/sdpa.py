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


def prefix_attention_sdpa(
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
    """Same arguments as the reference (inputs already checked); returns (out, lse).

    The prefix gradients are summed over each group's rows by ``index_select``'s backward
    (``index_add``, a fixed order: ``deterministic`` has nothing to change).
    """
    batch, len_q = q.shape[:2]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if prefix_ids is None:
        prefix_ids = torch.zeros(batch, dtype=torch.long, device=q.device)
    prefix_ids = prefix_ids.long()
    keys = torch.cat([prefix_k.index_select(0, prefix_ids), k], dim=1)  # (B, Lp + Lk, Hkv, D)
    values = torch.cat([prefix_v.index_select(0, prefix_ids), v], dim=1)
    mask = None
    if causal or prefix_lengths is not None or seqlens_k is not None:
        mask = prefix_attention_mask(len_q, prefix_k.shape[1], k.shape[1], prefix_ids, prefix_lengths, seqlens_k, causal)
    return attention(q, keys, values, mask, scale)
