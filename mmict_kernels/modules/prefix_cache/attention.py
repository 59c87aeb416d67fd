"""The attention function that transformers models call while a demo-prefix cache is active.

It is registered with transformers' ``AttentionInterface`` under :data:`ATTENTION_NAME`, so any
decoder whose attention modules dispatch through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2,
Mistral, GPT-NeoX, ...) runs it in place of eager/SDPA attention. What it needs beyond the
arguments transformers passes (the cached prefix, each row's group, padding) travels in a
:class:`PrefixCallState` held in a context variable for the duration of one call, so nothing
model-specific has to be threaded through the model's ``forward``.

Two modes:

* capture (building the cache): the demonstrations run as ordinary causal sequences; every layer's
  K/V (after RoPE) is recorded, one copy per group.
* rows: each row's queries attend to [its group's cached prefix ; its own keys] through
  :func:`mmict_kernels.ops.prefix_attention`, optionally appending the new keys to a per-row
  decode cache (:class:`RowKVCache`) first.

transformers builds no attention mask for an implementation that has no entry in its mask
interface (``masking_utils._preprocess_mask_arguments`` exits early, in 5.17 and 5.24), so the
``attention_mask`` argument arrives as ``None`` and padding comes from the call state instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ...ops.checks import skip_value_checks
from ...ops.prefix_attn import prefix_attention

ATTENTION_NAME = "mmict_prefix"


class RowKVCache:
    """Each row's own keys/values while decoding, per layer: (B, capacity, Hkv, D) buffers.

    Preallocated so a decode step writes one slot instead of concatenating (no re-allocation
    per token). The prefix is not in here: it stays in the :class:`DemoPrefixCache`, once per group.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, L_new, Hkv, D) keys/values of ``layer``; return all of that layer's so far."""
        if layer not in self.keys:
            shape = (k.shape[0], self.capacity, k.shape[2], k.shape[3])
            self.keys[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
            self.lengths[layer] = 0
        start = self.lengths[layer]
        end = start + k.shape[1]
        if end > self.capacity:
            raise RuntimeError(f"RowKVCache: layer {layer} would hold {end} tokens, capacity is {self.capacity}")
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


@dataclasses.dataclass
class PrefixCapture:
    """Collects (G, Lp, Hkv, D) keys/values per layer while the demonstrations run."""

    keys: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    values: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PrefixCallState:
    """Everything the attention function needs for one model call (capture or rows)."""

    capture: PrefixCapture | None = None
    cache: object | None = None  # a DemoPrefixCache (rows mode); typed loosely: cache.py builds on this module
    prefix_ids: torch.Tensor | None = None  # (B,) int64
    seqlens_k: torch.Tensor | None = None  # (B,) int32: the last n own keys of each row are valid
    row_kv: RowKVCache | None = None
    backend: str = "auto"
    deterministic: bool = False  # bitwise-reproducible prefix gradients (kernels otherwise sum rows with atomics)
    layers_called: int = 0


_ACTIVE: contextvars.ContextVar[PrefixCallState | None] = contextvars.ContextVar("mmict_prefix_state", default=None)

# Keyword arguments some models pass that change the attention itself; silently ignoring them
# would give wrong results, so they are refused (sliding_window only when it would cut something).
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def _refuse_unsupported(kwargs: dict, total_keys: int) -> None:
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{ATTENTION_NAME} attention: the model passes `{name}`, which prefix attention does not support"
            )
    window = kwargs.get("sliding_window")
    if window is not None and total_keys > window:
        raise NotImplementedError(
            f"{ATTENTION_NAME} attention: sliding_window={window} is shorter than prefix + own tokens ({total_keys}); "
            "sliding-window attention over a cached prefix is not supported"
        )


def prefix_cache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query (B, H, Lq, D), key/value (B, Hkv, Lk, D), post-RoPE.

    Returns (B, Lq, H, D) and no attention weights.
    """
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError(
            f"attn_implementation={ATTENTION_NAME!r} was called outside a prefix-cache call: use DemoPrefixCache.build / "
            "forward_with_prefix / generate_with_prefix (recomputation by gradient checkpointing is not supported either)"
        )
    if dropout:
        raise ValueError(
            f"{ATTENTION_NAME} attention: attention dropout ({dropout}) is not supported; put the frozen LM in eval() mode"
        )
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise RuntimeError(
            f"{ATTENTION_NAME} attention: {type(module).__name__} has no integer `layer_idx`; cannot find its cached prefix"
        )
    state.layers_called += 1
    q = query.transpose(1, 2)  # (B, Lq, H, D): the layout prefix_attention takes (a view, no copy)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)

    if state.capture is not None:
        _refuse_unsupported(kwargs, key.shape[2])
        if layer in state.capture.keys:
            raise RuntimeError(f"{ATTENTION_NAME} attention: layer_idx {layer} was called twice while building the prefix cache")
        state.capture.keys[layer] = k
        state.capture.values[layer] = v
        # Demonstrations are right-padded, so plain causal attention is exact for every valid token
        # (padding only ever follows them); padded positions are never read later.
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=query.shape[2] > 1, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
        return out.transpose(1, 2), None

    prefix_k, prefix_v = state.cache.layer(layer, num_kv_heads=k.shape[2], head_dim=k.shape[3], dtype=k.dtype)
    if state.row_kv is not None:
        k, v = state.row_kv.append(layer, k, v)
    _refuse_unsupported(kwargs, prefix_k.shape[1] + k.shape[1])
    # prefix_ids, prefix_lengths and seqlens_k were validated once per call by the caller: skip
    # the per-layer range checks (each is a device sync, in every layer of every decode step).
    with skip_value_checks():
        out = _prefix_attention(q, k, v, prefix_k, prefix_v, state, scaling)
    return out, None


def _prefix_attention(q, k, v, prefix_k, prefix_v, state, scaling):
    return prefix_attention(
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        state.prefix_ids,
        causal=True,
        softmax_scale=scaling,
        backend=state.backend,
        prefix_lengths=state.cache.prefix_lengths,
        seqlens_k=state.seqlens_k,
        deterministic=state.deterministic,
    )


AttentionInterface.register(ATTENTION_NAME, prefix_cache_attention)


@contextlib.contextmanager
def prefix_attention_active(model: torch.nn.Module, state: PrefixCallState):
    """Route ``model``'s attention through :func:`prefix_cache_attention` with ``state``; restore on exit.

    Raises if the model cannot switch (its attention does not dispatch through AttentionInterface).
    Callers also compare ``state.layers_called`` with the number of layers afterwards, which catches
    models whose attention modules ignore the switch.
    """
    config = model.config
    previous = config._attn_implementation
    if previous != ATTENTION_NAME:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION_NAME)
        else:  # older transformers: the config attribute is what the attention modules read
            config._attn_implementation = ATTENTION_NAME
    if config._attn_implementation != ATTENTION_NAME:
        raise RuntimeError(
            f"model: {type(model).__name__} could not switch to attn_implementation={ATTENTION_NAME!r}; its attention must "
            "dispatch through transformers' ALL_ATTENTION_FUNCTIONS"
        )
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)
        if previous != ATTENTION_NAME:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(previous)
            else:
                config._attn_implementation = previous
