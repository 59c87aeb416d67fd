"""PyTorch reference of M-Hub self-attention over [queries ; text] with the BLIP-2 objective masks."""

from __future__ import annotations

import torch

from .._reference import masked_attention

# BLIP-2 stage-1 objectives and the mask each uses (docs/DESIGN.md).
MASK_MODES = ("bidirectional", "unimodal", "multimodal_causal")
MASK_ALIASES = {"itm": "bidirectional", "itc": "unimodal", "itg": "multimodal_causal"}


def canonical_mask(mask, name: str = "mask") -> str:
    """The mask's canonical name (aliases "itm", "itc", "itg" resolved); a clear error otherwise."""
    if not isinstance(mask, str):
        raise TypeError(f"{name}: expected a str, one of {MASK_MODES}, got {type(mask).__name__}")
    canonical = MASK_ALIASES.get(mask, mask)
    if canonical not in MASK_MODES:
        raise ValueError(f"{name}: expected one of {MASK_MODES} (or aliases {tuple(MASK_ALIASES)}), got {mask!r}")
    return canonical


def self_attention_mask(
    num_query_tokens: int,
    seq_len: int,
    text_lengths: torch.Tensor | None,
    mask: str,
    device: torch.device,
) -> torch.Tensor:
    """Boolean (B or 1, 1, L, L) mask, True where row i may attend to key j.

    Keys: the ``num_query_tokens`` queries, then ``text_lengths[b]`` valid text tokens, then padding.
    - bidirectional (ITM, InstructBLIP): every row sees every valid key.
    - unimodal (ITC): queries see queries; text rows see valid text keys.
    - multimodal_causal (ITG): queries see queries; text row i sees all queries and valid text keys j <= i.
    Padded text rows follow the same rule as text rows (their outputs are ignored downstream,
    but they stay finite, as in transformers).
    """
    nq = num_query_tokens
    i = torch.arange(seq_len, device=device)[:, None]  # rows
    j = torch.arange(seq_len, device=device)[None, :]  # keys
    if text_lengths is None:
        key_valid = torch.ones(1, 1, seq_len, dtype=torch.bool, device=device)
    else:
        key_valid = (j < nq + text_lengths.long()[:, None, None]).reshape(-1, 1, seq_len)  # (B, 1, L)
    row_is_query, key_is_query = i < nq, j < nq
    if mask == "bidirectional":
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    elif mask == "unimodal":
        allowed = row_is_query == key_is_query
    elif mask == "multimodal_causal":
        allowed = torch.where(row_is_query, key_is_query, key_is_query | (j <= i))
    else:
        raise ValueError(f"mask: expected one of {MASK_MODES}, got {mask!r}")
    return (allowed[None] & key_valid)[:, None]  # (B or 1, 1, L, L)


def hub_self_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_query_tokens: int,
    text_lengths: torch.Tensor | None = None,
    mask: str = "bidirectional",
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments as :func:`mmict_kernels.ops.hub_self_attention`; returns (out, lse)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    full_mask = self_attention_mask(num_query_tokens, q.shape[1], text_lengths, mask, q.device)
    return masked_attention(q, k, v, full_mask, scale, dropout_p, dropout_mask)
