"""Demo-prefix KV cache for a frozen decoder-only LM: shared demonstrations computed once.

In MMICT, many queries share one set of in-context demonstrations, so the LLM input of each row
is [demonstrations ; the row's own tokens] with the demonstration part identical across rows.
:class:`DemoPrefixCache` runs the LM over the G demonstration sequences once and keeps every
layer's K/V (after RoPE), one copy per group. :func:`forward_with_prefix` then runs the rows'
own tokens only; each layer's attention reads [the row's group prefix ; its own tokens] through
``ops.prefix_attention`` (no concatenation, no per-row copy), with positions continuing after
the group's prefix length. Gradients flow back into the demonstration embeddings, summed over
the rows of each group. :func:`generate_with_prefix` decodes on top of the same cache.

Works with any transformers decoder whose attention dispatches through ``ALL_ATTENTION_FUNCTIONS``
(Llama, Qwen2, Mistral, GPT-NeoX, OPT, ...)::

    cache = DemoPrefixCache.build(model, demo_embeds, demo_lengths)      # (G, Lp, hidden), (G,)
    out = forward_with_prefix(model, cache, inputs_embeds=rows, attention_mask=mask, prefix_ids=ids)
    loss = loss_fn(out.logits, ...); loss.backward()                     # grads reach demo_embeds
    new_tokens = generate_with_prefix(model, cache, inputs_embeds=prompts, attention_mask=left_padded, prefix_ids=ids)

Equivalence: row b gives the logits the stock model gives on the sequence
[demo_embeds[g][:demo_lengths[g]] ; row b's valid tokens] with g = prefix_ids[b].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..ops import checks as C
from .prefix_cache_attention import ATTENTION_NAME, PrefixCallState, PrefixCapture, RowKVCache, prefix_attention_active

# Arguments the prefix path sets itself; passing them through would contradict it.
_RESERVED_KWARGS = ("attention_mask", "position_ids", "past_key_values", "cache", "use_cache")


@dataclasses.dataclass
class DemoPrefixCache:
    """Every layer's K/V over G demonstration prefixes, one copy per group.

    Attributes:
        keys, values: per layer, (G, Lp, Hkv, D) after RoPE (views of the LM's projections; they
            carry the autograd graph back to the demonstration embeddings when those require grad).
        prefix_lengths: int32 (G,) valid tokens of each group (right padding).
        backend: default ``ops.prefix_attention`` backend for calls that use this cache.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    prefix_lengths: torch.Tensor
    backend: str = "auto"

    # --------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        demo_embeds: torch.Tensor | Sequence[torch.Tensor],
        demo_lengths: torch.Tensor | Sequence[int] | None = None,
        *,
        backend: str = "auto",
    ) -> "DemoPrefixCache":
        """Run ``model`` over the demonstrations once and keep each layer's K/V.

        In training, build a fresh cache every step (the demonstration embeddings change); its
        K/V carry the graph back to ``demo_embeds``, which the first backward frees as usual.

        Args:
            model: a transformers causal LM (or its decoder), frozen; in eval() mode (no dropout).
            demo_embeds: (G, Lp, hidden) right-padded input embeddings, or a list of G tensors
                (L_g, hidden) of ragged lengths (padded here).
            demo_lengths: (G,) valid tokens per group; default: all Lp (ignored for a list).
            backend: default backend of ``ops.prefix_attention`` for the rows.
        """
        embeds, lengths = _pad_demonstrations(demo_embeds, demo_lengths)
        groups, len_prefix = embeds.shape[:2]
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        # Right padding: positions 0..Lp-1 are the true positions of every valid token.
        position_ids = torch.arange(len_prefix, device=embeds.device).expand(groups, len_prefix)
        capture = PrefixCapture()
        state = PrefixCallState(capture=capture)
        with prefix_attention_active(decoder, state):
            decoder(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)
        layers = sorted(capture.keys)
        if not layers or layers != list(range(len(layers))):
            raise RuntimeError(
                f"model: expected attention calls for layers 0..n-1 while building the prefix cache, got layer ids {layers}; "
                "does its attention dispatch through transformers' ALL_ATTENTION_FUNCTIONS?"
            )
        return cls(
            keys=tuple(capture.keys[i] for i in layers),
            values=tuple(capture.values[i] for i in layers),
            prefix_lengths=lengths.to(torch.int32),
            backend=backend,
        )

    # --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_groups(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_prefix_length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[3]

    def layer(self, idx: int, *, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v) of layer ``idx``, checked against the layer that asks for them."""
        if not 0 <= idx < self.num_layers:
            raise ValueError(f"cache: holds {self.num_layers} layers, the model asked for layer {idx} (built from another model?)")
        prefix_k, prefix_v = self.keys[idx], self.values[idx]
        if prefix_k.shape[2] != num_kv_heads or prefix_k.shape[3] != head_dim:
            raise ValueError(
                f"cache: layer {idx} holds {prefix_k.shape[2]} K/V heads of dim {prefix_k.shape[3]}, the model's layer has "
                f"{num_kv_heads} K/V heads of dim {head_dim} (built from another model?)"
            )
        if prefix_k.dtype != dtype:
            raise TypeError(f"cache: holds {prefix_k.dtype} K/V, the model's layer {idx} computes {dtype}")
        return prefix_k, prefix_v

    def check_prefix_ids(self, prefix_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """int64 (B,) group of each row, validated (default: all 0 when there is one group)."""
        if prefix_ids is None:
            if self.num_groups != 1:
                raise ValueError(f"prefix_ids: required when the cache holds several groups (G = {self.num_groups})")
            return torch.zeros(batch, dtype=torch.int64, device=device)
        C.check_index_tensor("prefix_ids", prefix_ids, shape=(batch,), dtypes=(torch.int64, torch.int32), device=device)
        prefix_ids = prefix_ids.to(torch.int64)
        if C.value_checks_enabled(prefix_ids):
            C.check_range("prefix_ids", prefix_ids, 0, self.num_groups - 1, f"group indices (the cache holds G = {self.num_groups} groups)")
        return prefix_ids

    def nbytes(self) -> int:
        """Bytes of K/V this cache holds (all layers, one copy per group)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def expanded_nbytes(self, prefix_ids: torch.Tensor) -> int:
        """Bytes the same prefixes would take copied once per row (what concatenation holds)."""
        return self.nbytes() // self.num_groups * int(prefix_ids.numel())

    def detach(self) -> "DemoPrefixCache":
        """The same K/V without the autograd graph (for evaluation that reuses a training cache)."""
        return dataclasses.replace(
            self, keys=tuple(k.detach() for k in self.keys), values=tuple(v.detach() for v in self.values)
        )


# ------------------------------------------------------------------------------------------
def _pad_demonstrations(demo_embeds, demo_lengths) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(demo_embeds, (list, tuple)):
        if not demo_embeds:
            raise ValueError("demo_embeds: expected at least one demonstration sequence")
        for i, t in enumerate(demo_embeds):
            C.check_tensor(f"demo_embeds[{i}]", t, ndim=2, dtypes=C.FLOAT_DTYPES)
        lengths = torch.tensor([t.shape[0] for t in demo_embeds], device=demo_embeds[0].device)
        embeds = torch.nn.utils.rnn.pad_sequence(list(demo_embeds), batch_first=True)
        return embeds, lengths
    C.check_tensor("demo_embeds", demo_embeds, ndim=3, dtypes=C.FLOAT_DTYPES)
    groups, len_prefix = demo_embeds.shape[:2]
    if groups == 0 or len_prefix == 0:
        raise ValueError(f"demo_embeds: expected at least one group and one token, got shape {tuple(demo_embeds.shape)}")
    if demo_lengths is None:
        return demo_embeds, torch.full((groups,), len_prefix, device=demo_embeds.device)
    lengths = torch.as_tensor(demo_lengths, device=demo_embeds.device)
    C.check_index_tensor("demo_lengths", lengths, shape=(groups,), dtypes=(torch.int64, torch.int32), device=demo_embeds.device)
    C.check_range("demo_lengths", lengths, 0, len_prefix, "prefix lengths")
    return demo_embeds, lengths


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
            raise ValueError(f"attention_mask: expected shape ({batch}, {length}) like the rows' tokens, got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.int32)
        if C.value_checks_enabled(mask):
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError("attention_mask: expected values 0 (padding) and 1 (token)")
            # one run of ones per row: at most one 0 -> 1 step, counting a leading 1 as a step
            rises = mask[:, 0] + (mask[:, 1:] - mask[:, :-1] == 1).sum(1)
            if (rises > 1).any():
                bad = int(torch.nonzero(rises > 1)[0, 0])
                raise ValueError(f"attention_mask: row {bad} has padding between tokens; only left and/or right padding is supported")
    first_valid = torch.where(mask.any(1), mask.argmax(1), torch.full_like(mask[:, 0], length))
    seqlens_k = (length - first_valid).to(torch.int32)
    position_ids = row_prefix_lengths.to(torch.int64)[:, None] + (mask.cumsum(1) - 1).clamp(min=0)
    return seqlens_k, position_ids


def _input_embeddings(model, input_ids, inputs_embeds) -> torch.Tensor:
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


def forward_with_prefix(
    model: torch.nn.Module,
    cache: DemoPrefixCache,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    backend: str | None = None,
    deterministic: bool = False,
    **model_kwargs,
):
    """Run the rows' own tokens through ``model`` on top of their groups' cached prefixes.

    Args:
        model: the LM the cache was built from (frozen, eval mode).
        cache: a :class:`DemoPrefixCache`.
        input_ids: (B, L) token ids, or ``inputs_embeds`` (B, L, hidden).
        attention_mask: (B, L) 1 for tokens, 0 for padding (left and/or right). Default: all tokens.
        prefix_ids: (B,) group of each row. Default: all 0 (one group).
        backend: ``ops.prefix_attention`` backend (default: the cache's).
        deterministic: bitwise-reproducible gradients into the prefix (see ``ops.prefix_attention``).
        **model_kwargs: passed to ``model`` (e.g. ``labels``, ``logits_to_keep``).

    Returns:
        The model's output (``.logits`` (B, L, vocab) for a causal LM). Outputs at padded
        positions are unspecified (mask them out of the loss).
    """
    for name in _RESERVED_KWARGS:
        if name in model_kwargs:
            raise TypeError(f"{name}: set by forward_with_prefix itself (pass the rows' padding mask as attention_mask=)")
    embeds = _input_embeddings(model, input_ids, inputs_embeds)
    batch, length = embeds.shape[:2]
    prefix_ids = cache.check_prefix_ids(prefix_ids, batch, embeds.device)
    seqlens_k, position_ids = rows_layout(attention_mask, cache.prefix_lengths[prefix_ids], batch, length)
    state = PrefixCallState(
        cache=cache, prefix_ids=prefix_ids, seqlens_k=seqlens_k, backend=backend or cache.backend, deterministic=deterministic
    )
    with prefix_attention_active(model, state):
        return call_rows(model, state, embeds, position_ids, **model_kwargs)


def generate_with_prefix(model, cache, input_ids=None, **kwargs):
    """Generation on shared prefixes: see :func:`mmict_kernels.modules.prefix_cache_generate.generate_with_prefix`.

    Re-exported here so that one import gives the whole API; imported on call because that
    module builds on this one (a top-level import would be circular).
    """
    from .prefix_cache_generate import generate_with_prefix as generate

    return generate(model, cache, input_ids, **kwargs)

__all__ = ["ATTENTION_NAME", "DemoPrefixCache", "RowKVCache", "forward_with_prefix", "generate_with_prefix", "rows_layout"]
