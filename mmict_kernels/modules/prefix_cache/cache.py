"""Demo-prefix KV cache for a frozen decoder-only LM: shared demonstrations computed once.

In MMICT, many queries share one set of in-context demonstrations, so the LLM input of each row
is [demonstrations ; the row's own tokens] with the demonstration part identical across rows.
:class:`DemoPrefixCache` runs the LM over the G demonstration sequences once and keeps every
layer's K/V (after RoPE), one copy per group. :func:`forward_with_prefix` then runs the rows'
own tokens only; each layer's attention reads [the row's group prefix ; its own tokens] through
``ops.prefix_attention`` (no concatenation, no per-row copy), with positions continuing after
the group's prefix length. Gradients flow back into the demonstration embeddings, summed over
the rows of each group. ``generate.py``'s :func:`generate_with_prefix` decodes on top of the same cache.

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
from collections.abc import Sequence

import torch

from ...ops import checks as C
from .attention import PrefixCallState, PrefixCapture, prefix_attention_active
from .rows import call_rows, prepare_rows

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
    ) -> DemoPrefixCache:
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

    # The sizes of every layer's (G, Lp, Hkv, D) keys, read from the first layer.
    num_groups = property(lambda self: self.keys[0].shape[0], doc="G: the demonstration groups.")
    max_prefix_length = property(lambda self: self.keys[0].shape[1], doc="Lp: the padded prefix length.")
    num_kv_heads = property(lambda self: self.keys[0].shape[2], doc="Hkv: the LM's K/V heads.")
    head_dim = property(lambda self: self.keys[0].shape[3], doc="D: the head dim.")

    def layer(self, idx: int, *, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v) of layer ``idx``, checked against the layer that asks for them."""
        if not 0 <= idx < self.num_layers:
            raise ValueError(
                f"cache: holds {self.num_layers} layers, the model asked for layer {idx} (built from another model?)"
            )
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
            C.check_range(
                "prefix_ids", prefix_ids, 0, self.num_groups - 1, f"group indices (the cache holds G = {self.num_groups} groups)"
            )
        return prefix_ids

    def nbytes(self) -> int:
        """Bytes of K/V this cache holds (all layers, one copy per group)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def expanded_nbytes(self, prefix_ids: torch.Tensor) -> int:
        """Bytes the same prefixes would take copied once per row (what concatenation holds)."""
        return self.nbytes() // self.num_groups * int(prefix_ids.numel())

    def detach(self) -> DemoPrefixCache:
        """The same K/V without the autograd graph (for evaluation that reuses a training cache)."""
        return dataclasses.replace(self, keys=tuple(k.detach() for k in self.keys), values=tuple(v.detach() for v in self.values))


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
    row_position_ids: torch.Tensor | None = None,
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
        row_position_ids: (B, L) or (P, B, L) positions of each row's own tokens counted from 0 at its
            first valid token, as in a prompt without the prefix; each row's group prefix length is
            added. Needed by multimodal rotary embeddings (Qwen2-VL's 3-D M-RoPE, P = 3), whose image
            tokens do not advance the position one by one. Default: the valid tokens counted 0, 1, ...
        **model_kwargs: passed to ``model`` (e.g. ``labels``, ``logits_to_keep``).

    Returns:
        The model's output (``.logits`` (B, L, vocab) for a causal LM). Outputs at padded
        positions are unspecified (mask them out of the loss).
    """
    for name in _RESERVED_KWARGS:
        if name in model_kwargs:
            raise TypeError(f"{name}: set by forward_with_prefix itself (pass the rows' padding mask as attention_mask=)")
    rows = prepare_rows(model, cache, input_ids, inputs_embeds, attention_mask, prefix_ids, row_position_ids=row_position_ids)
    embeds, prefix_ids, _, seqlens_k, position_ids = rows
    state = PrefixCallState(
        cache=cache, prefix_ids=prefix_ids, seqlens_k=seqlens_k, backend=backend or cache.backend, deterministic=deterministic
    )
    with prefix_attention_active(model, state):
        return call_rows(model, state, embeds, position_ids, **model_kwargs)


__all__ = ["DemoPrefixCache", "forward_with_prefix"]
