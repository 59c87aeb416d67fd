"""Greedy and sampled generation for a batch of prompts on shared demonstration prefixes.

A small loop instead of ``transformers.generate``: generate derives position ids from the
attention mask alone (positions would restart at 0 instead of continuing after each group's
prefix) and keeps its own per-row cache. Here every decode step runs the model on one token
per row; each layer appends the row's new K/V to a preallocated :class:`RowKVCache` and attends
to [the group's prefix (shared, never copied) ; the row's cache] through ``ops.prefix_attention``
with Lq = 1 and ``seqlens_k`` marking the left padding of the prompts.

The loop never waits on the GPU per step: whether every row has finished is read only every
``eos_check_every`` steps (one host sync each), and the tokens generated after the last row
finished are trimmed once at the end. Beam search is not supported (greedy or sampling only).
"""

from __future__ import annotations

import torch

from .attention import PrefixCallState, RowKVCache, prefix_attention_active
from .cache import DemoPrefixCache
from .rows import call_rows, prepare_rows


def _pick_next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, generator
):
    """(B, V) logits -> (B,) tokens. Sampling filters in transformers' order: temperature, top-k, top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_generation_args(max_new_tokens, min_new_tokens, num_beams, eos_check_every, do_sample, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens: expected an int in [0, max_new_tokens = {max_new_tokens}], got {min_new_tokens!r}")
    if num_beams != 1:
        raise ValueError(
            f"num_beams: generation on a shared demonstration prefix is greedy or sampled (num_beams=1), got {num_beams!r}; "
            "for beam search run the model without the prefix cache (eval.use_prefix_cache: false in the driver)"
        )
    if not isinstance(eos_check_every, int) or eos_check_every < 1:
        raise ValueError(f"eos_check_every: expected a positive int, got {eos_check_every!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature: expected > 0 when sampling, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")


@torch.no_grad()
def generate_with_prefix(
    model: torch.nn.Module,
    cache: DemoPrefixCache,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    row_cache: RowKVCache | None = None,
    eos_check_every: int = 8,
    row_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate after [group prefix ; prompt] for every row; returns only the new tokens.

    Args:
        model: the causal LM the cache was built from (eval mode).
        cache: a :class:`DemoPrefixCache` (its graph is not needed; generation runs without grad).
        input_ids / inputs_embeds: (B, L) / (B, L, hidden) prompts, LEFT-padded.
        attention_mask: (B, L) 1 for tokens, 0 for left padding. Default: all tokens.
        prefix_ids: (B,) group of each row (default all 0: one group).
        max_new_tokens: tokens to generate per row.
        min_new_tokens: EOS cannot be chosen before this many new tokens (its logit is masked, as
            transformers' ``min_new_tokens``).
        num_beams: must be 1 (beam search is not supported on the shared prefix; a clear error otherwise).
        do_sample, temperature, top_k, top_p: sampling (else greedy), filters applied in that order.
        eos_token_id: a row that emits it is finished; later positions get ``pad_token_id``
            (default: ``eos_token_id``). Generation stops early once every row has finished.
        generator: random generator for sampling (reproducible draws).
        backend: ``ops.prefix_attention`` backend (default: the cache's).
        row_cache: an empty :class:`RowKVCache` of capacity >= L + max_new_tokens to fill with
            the rows' own K/V (pass one to inspect or measure it); default: a fresh one.
        eos_check_every: read "has every row finished?" from the GPU only every this many steps
            (each read is a host sync); the result is the same, at most this many - 1 extra steps run.
        row_position_ids: (B, L) or (P, B, L) positions of the prompts' own tokens counted from 0 at
            each row's first token (multimodal rotary embeddings, see ``forward_with_prefix``). New
            tokens continue after the row's largest position, as transformers' generation does
            (Qwen2-VL's rope deltas); with the default 1-D positions that is the last token's.

    Returns:
        int64 (B, T) new tokens, T <= max_new_tokens (T < max_new_tokens only if all rows hit EOS).
    """
    _check_generation_args(max_new_tokens, min_new_tokens, num_beams, eos_check_every, do_sample, temperature, top_k, top_p)
    embeds, prefix_ids, _, seqlens_k, position_ids = prepare_rows(
        model, cache, input_ids, inputs_embeds, attention_mask, prefix_ids, left_padded=True, row_position_ids=row_position_ids
    )
    # Where decoding continues: after the row's largest position (the last token's for 1-D positions,
    # whose padding sits at the prefix length; for P sections the largest of all, as rope deltas do).
    last_position = position_ids.amax(dim=-1)
    if last_position.dim() == 2:
        last_position = last_position.amax(dim=0)
    batch, length = embeds.shape[:2]
    device = embeds.device
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    embedding = model.get_input_embeddings()

    if row_cache is None:
        row_cache = RowKVCache(length + max_new_tokens)
    elif row_cache.capacity < length + max_new_tokens or row_cache.lengths:
        raise ValueError(
            f"row_cache: expected an empty RowKVCache of capacity >= {length + max_new_tokens} (prompt + new tokens)"
        )
    state = PrefixCallState(
        cache=cache, prefix_ids=prefix_ids, seqlens_k=seqlens_k, row_kv=row_cache, backend=backend or cache.backend
    )
    new_tokens = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # Steps run while some row was unfinished at their start (on device: read once at the end).
    steps_needed = torch.zeros((), dtype=torch.int64, device=device)
    with prefix_attention_active(model, state):
        # Prefill: the whole prompt; only the last position's logits are needed.
        logits = call_rows(model, state, embeds, position_ids, logits_to_keep=1).logits[:, -1]
        for step in range(max_new_tokens):
            if eos_token_id is not None and step < min_new_tokens:
                logits = logits.clone()
                logits[:, eos_token_id] = float("-inf")
            token = _pick_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                steps_needed = steps_needed + (~finished).any().to(torch.int64)
                token = torch.where(finished, torch.full_like(token, pad_token_id), token)
                finished |= token == eos_token_id
            new_tokens.append(token)
            last = step == max_new_tokens - 1
            if last or (eos_token_id is not None and (step + 1) % eos_check_every == 0 and bool(finished.all())):
                break
            # Decode: one token per row; it is the row's next valid key (the cache grows at the end).
            state.seqlens_k = state.seqlens_k + 1
            position = last_position + (step + 1)
            step_embeds = embedding(token[:, None])
            logits = call_rows(model, state, step_embeds, position[:, None], logits_to_keep=1).logits[:, -1]
    tokens = torch.stack(new_tokens, dim=1)
    if eos_token_id is not None and len(new_tokens) > 1:
        tokens = tokens[:, : int(steps_needed)]  # one host sync per call: drop the steps after every row had finished
    return tokens


__all__ = ["generate_with_prefix"]
