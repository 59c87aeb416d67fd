"""The rows' side of a prefix-cache call: their padding, positions and embeddings, and the model call itself.

Shared by training (:func:`~mmict_kernels.modules.prefix_cache.cache.forward_with_prefix`) and
generation (:func:`~mmict_kernels.modules.prefix_cache.generate.generate_with_prefix`); both build
on this module and on ``attention.py``, never on each other, so the package has no import cycle.
"""

from __future__ import annotations

import torch

from ...ops import checks as C
from .attention import ATTENTION_NAME, PrefixCallState


def prepare_rows(
    model, cache, input_ids, inputs_embeds, attention_mask, prefix_ids, *, left_padded: bool = False, row_position_ids=None
):
    """Everything a call needs about its rows, checked: (embeds, prefix_ids, row_prefix_lengths, seqlens_k, position_ids).

    ``cache`` is the :class:`~mmict_kernels.modules.prefix_cache.cache.DemoPrefixCache` the rows attend
    to; ``prefix_ids`` comes back as int64 (B,), ``row_prefix_lengths`` as int64 (B,) (each row's
    group prefix length). ``left_padded``: generation needs every row's last position to be a token.
    ``row_position_ids``: see :func:`row_positions`; ``position_ids`` comes back (B, L) or (P, B, L).
    """
    embeds = input_embeddings(model, input_ids, inputs_embeds)
    batch, length = embeds.shape[:2]
    prefix_ids = cache.check_prefix_ids(prefix_ids, batch, embeds.device)
    row_prefix_lengths = cache.prefix_lengths[prefix_ids].to(torch.int64)
    if left_padded and attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == length:
        C.expect(
            attention_mask[:, -1] != 0,
            "attention_mask: generation needs LEFT-padded prompts (every row's last position must be a token)",
        )
    seqlens_k, position_ids = rows_layout(attention_mask, row_prefix_lengths, batch, length)
    if row_position_ids is not None:
        position_ids = row_positions(row_position_ids, attention_mask, row_prefix_lengths, batch, length)
    return embeds, prefix_ids, row_prefix_lengths, seqlens_k, position_ids


def row_positions(row_position_ids: torch.Tensor, attention_mask, row_prefix_lengths: torch.Tensor, batch: int, length: int):
    """The caller's own positions of each row, moved after its group's prefix: (B, L) or (P, B, L) int64.

    ``row_position_ids`` (B, L) or (P, B, L) count each row's own tokens from 0 at its first valid
    token, as in a prompt without the prefix. Multimodal rotary embeddings need them (Qwen2-VL's
    M-RoPE gives an image's tokens 3-D positions (time, height, width) that do not advance one by one).
    A prefix of Lp text-like tokens holds positions 0..Lp-1 in all P sections, so in the
    concatenated prompt every position of the row is shifted by Lp: that is what is added here.
    Positions at padding are set to the prefix length (never read by a valid token).
    """
    C.check_tensor("row_position_ids", row_position_ids, ndim=(2, 3), dtypes=(torch.int64, torch.int32))
    if tuple(row_position_ids.shape[-2:]) != (batch, length):
        raise ValueError(
            f"row_position_ids: expected shape ({batch}, {length}) or (P, {batch}, {length}) like the rows' tokens, "
            f"got {tuple(row_position_ids.shape)}"
        )
    device = row_prefix_lengths.device
    own = row_position_ids.to(device=device, dtype=torch.int64)
    if attention_mask is not None:
        own = own * (attention_mask.to(device) != 0)  # padding -> 0 (so a row's largest position is a token's)
    return own + row_prefix_lengths[:, None]


def rows_layout(attention_mask: torch.Tensor | None, row_prefix_lengths: torch.Tensor, batch: int, length: int):
    """From a rows' 2D padding mask: (seqlens_k int32 (B,), position_ids int64 (B, L)).

    Rows may be left-padded (generation) and/or right-padded (training). Own key j of row b is
    valid iff j >= L - seqlens_k[b]; right padding needs no masking because causal attention
    never lets a valid query see a later (padding) key. Positions count the row's valid tokens
    and start at its group's prefix length.
    """
    device = row_prefix_lengths.device
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=torch.int32, device=device)
    else:
        C.check_tensor("attention_mask", attention_mask, ndim=2)
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask: expected shape ({batch}, {length}) like the rows' tokens, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=device, dtype=torch.int32)
        if C.value_checks_enabled(mask):  # device-side asserts on a GPU: no host sync
            C.expect((mask == 0) | (mask == 1), "attention_mask: expected values 0 (padding) and 1 (token)")
            # one run of ones per row: at most one 0 -> 1 step, counting a leading 1 as a step
            rises = mask[:, 0] + (mask[:, 1:] - mask[:, :-1] == 1).sum(1)
            C.expect(rises <= 1, "attention_mask: a row has padding between tokens; only left and/or right padding is supported")
    first_valid = torch.where(mask.any(1), mask.argmax(1), torch.full_like(mask[:, 0], length))
    seqlens_k = (length - first_valid).to(torch.int32)
    position_ids = row_prefix_lengths.to(torch.int64)[:, None] + (mask.cumsum(1) - 1).clamp(min=0)
    return seqlens_k, position_ids


def input_embeddings(model, input_ids, inputs_embeds) -> torch.Tensor:
    """The rows' (B, L, hidden) input embeddings from exactly one of token ids or embeddings."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids / inputs_embeds: pass exactly one of them")
    if inputs_embeds is None:
        C.check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
        return model.get_input_embeddings()(input_ids)
    return C.check_tensor("inputs_embeds", inputs_embeds, ndim=3, dtypes=C.FLOAT_DTYPES)


def call_rows(model, state: PrefixCallState, embeds: torch.Tensor, position_ids: torch.Tensor, **model_kwargs):
    """One model call on the rows while ``state`` is active (see ``prefix_attention_active``)."""
    state.layers_called = 0
    out = model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **model_kwargs)
    if state.layers_called != state.cache.num_layers:
        raise RuntimeError(
            f"model: {state.layers_called} attention calls went through {ATTENTION_NAME!r}, the cache holds "
            f"{state.cache.num_layers} layers (model and cache do not match, or the model bypasses AttentionInterface)"
        )
    return out
