"""Naive, loop-based float64 attention: an oracle independent of the references' masking code.

Each (sample, head, query row) is computed from an explicit list of visible key indices, so a
mistake in a vectorized mask cannot hide in both the reference and its oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def naive_attention(q, keys, values, visible: Callable[[int, int], list[int]], scale: float):
    """q (B, Lq, H, D); keys/values: callables b -> (Lk_b, H, D) float tensors; visible(b, i) -> key indices.

    Returns (B, Lq, H, D) float64; rows with no visible key are zero.
    """
    batch, len_q, heads, head_dim = q.shape
    out = torch.zeros(batch, len_q, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        kb, vb = keys(b).double(), values(b).double()
        for i in range(len_q):
            idx = visible(b, i)
            if not idx:
                continue
            ks, vs = kb[idx], vb[idx]  # (n, H, D)
            scores = torch.einsum("hd,nhd->hn", q[b, i].double(), ks) * scale
            probs = torch.softmax(scores, dim=-1)
            out[b, i] = torch.einsum("hn,nhd->hd", probs, vs)
    return out
