"""FusedMHub: the BLIP-2 / InstructBLIP Q-Former (MMICT's M-Hub) on mmict_kernels' attention ops.

A drop-in for transformers' ``Blip2QFormerModel`` and ``InstructBlipQFormerModel``: same state-dict
keys (``hub.load_state_dict(hf_qformer.state_dict())`` works both ways; each attention block's Q/K/V
weights are one fused parameter inside, see ``projections.py``), same ``forward`` arguments in the same
positional order per flavor, same outputs in eval mode (float32 rounding) and the same dropout
sites in training. On top of that:

- attention runs through :func:`mmict_kernels.ops.hub_self_attention` and
  :func:`mmict_kernels.ops.hub_cross_attention` (``backend``: cuda / triton / torch / auto), with the
  padding and objective masks computed inside the kernels and packed (varlen) image tokens;
- ``mask=`` picks the BLIP-2 stage-1 self-attention mask: "bidirectional" (ITM, InstructBLIP; the
  default, what transformers does), "unimodal" (ITC), "multimodal_causal" (ITG);
- :meth:`FusedMHub.encode_image` computes every cross-attention layer's image K/V once
  (:class:`ImageKVCache`), and ``forward(..., image_kv=cache)`` reuses it (given
  ``encoder_hidden_states`` instead, on a CPU, each layer projects its K/V right before it attends,
  or, with few queries, attends without forming K and V at all: ``absorbed.py``);
- :meth:`FusedMHub.forward_objectives` runs several masks over the same images in one pass;
- the module owns the learned ``query_tokens`` (transformers keeps them outside the Q-Former) and uses
  them when no ``query_embeds`` are given;
- training keeps less for backward (about 0.6x of transformers' saved bytes at the default config):
  no weight copies, the FFN's GELU recomputed, dropout masks kept packed 8 to a byte on a CPU (redrawn
  from a seed elsewhere), attention keeping only q, k, v, the output and the log-sum-exp
  (``epilogue.py``, the ops' backends).

Differences from transformers, by design:
- ``attention_mask`` must be right-padded with every query position valid (how BLIP-2/InstructBLIP
  build it); anything else raises a ValueError. ``encoder_attention_mask`` may be any pattern.
- Padded text positions (``attention_mask`` 0) come out as zeros from every layer and take no
  gradient; transformers computes them although nothing reads them. On a CPU the layer's
  position-wise matmuls skip them altogether (``text_rows.py``). Valid positions are unchanged.
- A sample whose image tokens are all masked gets a zero cross-attention output; transformers
  gives a uniform average over the masked tokens.
- ``output_attentions=True`` is refused: the kernels never materialize attention probabilities.

This file holds the module itself: construction (config, ``from_hf``, ``from_lavis``), the image K/V
cache, ``forward`` / ``forward_objectives`` and the layer loop. Around it, in this package:
``arguments.py`` (transformers' call signature -> named, checked inputs), ``objectives.py`` (how
several masks share one pass), ``layers.py`` (the parameter tree, named as transformers names it),
``epilogue.py`` (what surrounds each matmul), ``text_rows.py`` (padded text slots), ``absorbed.py``, ``image_kv_cache.py``,
``lavis.py``, ``swap_in.py``.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from ... import backends, ops
from ...ops import checks as C
from . import absorbed, epilogue
from .arguments import (
    FLAVORS,
    bind_forward_arguments,
    check_devices,
    check_flavor_arguments,
    check_input_ids,
    check_query_embeds,
    default_query_batch,
    query_positions,
    text_lengths,
)
from .image_kv_cache import ImageKVCache, arrange_image_tokens
from .layers import QFormerEncoder, QFormerTextEmbeddings, init_qformer_weights
from .objectives import objective_state, share_query_stream
from .projections import split_fused
from .text_rows import TextRows


@dataclasses.dataclass
class MHubOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    """transformers' Q-Former output: ``last_hidden_state`` (B, L, hidden) and ``pooler_output`` (B, hidden)."""


def _config_value(config, name, default=None):
    return getattr(config, name, default)


def _copy_config(config):
    """A private copy so later edits of the caller's config do not change this module."""
    try:
        return copy.deepcopy(config)
    except Exception:  # an exotic config object: keep a reference
        return config


@dataclasses.dataclass
class _ImageTokens:
    """Image tokens laid out for the kernels, before projection: each cross-attention layer projects its own K/V."""

    tokens: torch.Tensor  # (B, Li, E) dense or (total, E) packed, in the Q-Former's dtype
    cu_seqlens_k: torch.Tensor | None
    seqlens_k: torch.Tensor | None
    batch_size: int


class FusedMHub(nn.Module):
    """The Q-Former / M-Hub on fused attention kernels.

    Args:
        config: a transformers ``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig`` (or any object
            with their attributes: hidden_size, num_attention_heads, num_hidden_layers,
            intermediate_size, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob,
            layer_norm_eps, cross_attention_frequency, encoder_hidden_size, and for text
            vocab_size, max_position_embeddings, pad_token_id).
        flavor: "blip2" (``Blip2QFormerModel``: LayerNorm over ``query_embeds``, no embeddings) or
            "instructblip" (``InstructBlipQFormerModel``: word/position embeddings for text).
        num_query_tokens: size of the learned ``query_tokens`` parameter (1, Nq, hidden); 0 for none
            (then ``query_embeds`` must be passed, as with transformers).
        backend: "auto", "cuda", "triton" or "torch" for the attention ops (and fused epilogues).
    """

    def __init__(self, config, flavor: str = "blip2", num_query_tokens: int = 32, backend: str = "auto"):
        super().__init__()
        if flavor not in FLAVORS:
            raise ValueError(f"flavor: expected one of {FLAVORS}, got {flavor!r}")
        if not isinstance(num_query_tokens, int) or isinstance(num_query_tokens, bool) or num_query_tokens < 0:
            raise ValueError(f"num_query_tokens: expected an int >= 0, got {num_query_tokens!r}")
        self._backend = backends.check_backend_name(backend)
        self.flavor = flavor
        self.config = _copy_config(config)
        hidden, heads = config.hidden_size, config.num_attention_heads
        if hidden % heads != 0:
            raise ValueError(f"config: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
        if config.cross_attention_frequency < 1:
            raise ValueError(f"config.cross_attention_frequency: expected >= 1, got {config.cross_attention_frequency}")
        self.num_heads = heads
        self.head_dim = hidden // heads
        self.hidden_size = hidden
        self.encoder_hidden_size = config.encoder_hidden_size
        self.attention_dropout = float(_config_value(config, "attention_probs_dropout_prob", 0.0))
        # Text FFN blocks exist for InstructBLIP always, for BLIP-2 only with use_qformer_text_input.
        self.has_text_ffn = flavor == "instructblip" or bool(_config_value(config, "use_qformer_text_input", False))

        if num_query_tokens > 0:
            self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, hidden))
        else:
            self.register_parameter("query_tokens", None)
        if flavor == "blip2":
            self.layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
            self.dropout = nn.Dropout(config.hidden_dropout_prob)
        else:
            self.embeddings = QFormerTextEmbeddings(config)
        self.encoder = QFormerEncoder(config, self.has_text_ffn)
        self.cross_attention_layers = tuple(i for i, layer in enumerate(self.encoder.layer) if layer.has_cross_attention)

        std = float(_config_value(config, "initializer_range", 0.02))
        init_qformer_weights(self, std)
        if self.query_tokens is not None:
            nn.init.normal_(self.query_tokens, mean=0.0, std=std)
        # transformers' gradient_checkpointing_enable() sets this flag on every module that has one.
        self.gradient_checkpointing = False
        self._prepare_backends()

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each layer in backward instead of keeping its activations (training only)."""
        self.gradient_checkpointing = bool(enable)

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    # -----------------------------------------------------------------------------------------
    # Backend choice
    # -----------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """ "auto", "cuda", "triton" or "torch": the attention ops' (and fused epilogues') backend."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = backends.check_backend_name(value)
        self._prepare_backends()

    def _prepare_backends(self) -> None:
        """Resolve (and import) the attention implementations for the current device and dtype, eagerly.

        torch.compile then finds them already loaded when the first call is a compiled one. A backend
        that cannot run is not an error here: the op call raises with the reasons.
        """
        weight = self._first_weight() if len(self.encoder.layer) else None
        if weight is None:
            return
        for op in ("hub_self_attention", "hub_cross_attention"):
            for dropout in (False, True):
                try:
                    facts = dict(device_type=weight.device.type, dtype=weight.dtype, head_dim=self.head_dim, dropout=dropout)
                    backends.resolve(op, backends.module_choice(op, self._backend, **facts), **facts)
                except (backends.BackendUnavailableError, ImportError):
                    pass

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() change device or dtype, and with them the backend's implementation.
        out = super()._apply(fn, *args, **kwargs)
        self._prepare_backends()
        return out

    # -----------------------------------------------------------------------------------------
    # Construction from transformers / state dicts
    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(
        cls, module, backend: str = "auto", *, query_tokens: torch.Tensor | None = None, num_query_tokens: int | None = None
    ):
        """Build a FusedMHub holding a copy of a transformers Q-Former's weights.

        Args:
            module: a ``Blip2QFormerModel`` or ``InstructBlipQFormerModel`` (any config).
            backend: the attention backend ("auto", "cuda", "triton", "torch").
            query_tokens: the model's learned queries (e.g. ``blip2_model.query_tokens``), copied into
                the hub's ``query_tokens``. Without them the hub gets ``num_query_tokens`` freshly
                initialised queries (default 32; 0 for none).
        """
        from transformers import Blip2QFormerModel, InstructBlipQFormerModel

        if isinstance(module, InstructBlipQFormerModel):
            flavor = "instructblip"
        elif isinstance(module, Blip2QFormerModel):
            flavor = "blip2"
        else:
            raise TypeError(
                f"module: expected a transformers Blip2QFormerModel or InstructBlipQFormerModel, got {type(module).__name__}"
            )
        if query_tokens is not None:
            C.check_tensor("query_tokens", query_tokens, ndim=3, dtypes=C.FLOAT_DTYPES)
            if query_tokens.shape[0] != 1 or query_tokens.shape[2] != module.config.hidden_size:
                expected = f"(1, Nq, {module.config.hidden_size})"
                raise ValueError(f"query_tokens: expected shape {expected}, got {tuple(query_tokens.shape)}")
            if num_query_tokens is not None and num_query_tokens != query_tokens.shape[1]:
                shape = tuple(query_tokens.shape)
                raise ValueError(f"num_query_tokens: {num_query_tokens} disagrees with query_tokens of shape {shape}")
            num_query_tokens = query_tokens.shape[1]
        elif num_query_tokens is None:
            num_query_tokens = 32
        reference = next(module.parameters())
        hub = cls(module.config, flavor=flavor, num_query_tokens=num_query_tokens, backend=backend)
        hub.to(device=reference.device, dtype=reference.dtype)
        hub.load_state_dict(module.state_dict(), strict=True)
        if query_tokens is not None:
            with torch.no_grad():
                hub.query_tokens.copy_(query_tokens)
        hub.train(module.training)
        hub.gradient_checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in module.encoder.layer)
        return hub

    @classmethod
    def from_lavis(cls, path_or_state_dict, num_attention_heads: int = 12, **kwargs):
        """Load the Q-Former and query tokens of a LAVIS BLIP-2 / InstructBLIP / MMICT checkpoint.

        Args:
            path_or_state_dict: a ``.pth`` file (a state dict, or LAVIS's ``{"model": state_dict, ...}``),
                a ``.safetensors`` file, or a state dict, with keys ``Qformer.bert.*`` and ``query_tokens``
                (other keys, e.g. the ViT or the LLM, are skipped).
            num_attention_heads: not recorded in shapes (BERT-base Q-Former: 12).
            kwargs: ``backend=``, ``weights_only=`` (torch.load; default True), and transformers config
                overrides (``layer_norm_eps``, ``hidden_dropout_prob``, ...).

        Sizes, layer count, cross-attention layers, encoder width and vocabulary come from the tensors;
        word embeddings in the checkpoint mean InstructBLIP / MMICT (text-aware), none mean BLIP-2.
        Missing or unexpected Q-Former keys raise :class:`~mmict_kernels.modules.mhub.lavis.LavisCheckpointError`
        listing them. See :mod:`mmict_kernels.modules.mhub.lavis` for the key mapping.
        """
        from .lavis import fused_mhub_from_lavis

        return fused_mhub_from_lavis(cls, path_or_state_dict, num_attention_heads=num_attention_heads, **kwargs)

    def split_fused_names(self, named: dict) -> dict:
        """``{name: tensor}`` keyed by this hub's parameter names -> keyed by transformers' names.

        The fused ``*.qkv.*`` / ``*.kv.*`` entries become ``*.query.*``, ``*.key.*``, ``*.value.*`` (views;
        None stays None); everything else passes through. E.g. the gradients as transformers would name
        them: ``hub.split_fused_names({n: p.grad for n, p in hub.named_parameters()})``. (``state_dict()``
        already uses transformers' names.)
        """
        return split_fused(named, self.hidden_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # transformers' Q-Former state dicts have no query_tokens (the parent model holds them):
        # loading one keeps our current queries instead of failing a strict load.
        key = prefix + "query_tokens"
        if key in missing_keys and key not in state_dict:
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        nq = 0 if self.query_tokens is None else self.query_tokens.shape[1]
        return (
            f"flavor={self.flavor!r}, backend={self.backend!r}, num_query_tokens={nq}, heads={self.num_heads}x{self.head_dim}, "
            f"cross_attention_layers={self.cross_attention_layers}"
        )

    # -----------------------------------------------------------------------------------------
    # Image K/V cache
    # -----------------------------------------------------------------------------------------
    def encode_image(
        self,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        *,
        num_frames=None,
        cu_seqlens: torch.Tensor | None = None,
        packed: bool | None = None,
    ) -> ImageKVCache:
        """Project image tokens to the K/V of every cross-attention layer, once.

        Args:
            image_embeds: (B, Li, E) image tokens; or (total_frames, Lf, E) with ``num_frames``; or
                packed (total, E) with ``cu_seqlens``. E is ``config.encoder_hidden_size``.
            image_mask: (B, Li), nonzero where a token is valid (any pattern). Packs the valid tokens
                unless ``packed=False`` (or while compiling): then dense with ``seqlens_k``.
            num_frames: (B,) frames per sample for video; sample b attends to all tokens of its frames.
            cu_seqlens: (B + 1,) int offsets of each sample's tokens in packed ``image_embeds``.

        Returns an :class:`ImageKVCache` to pass as ``forward(..., image_kv=cache)``; gradients of every
        pass that uses it flow back to ``image_embeds`` and to the key/value weights.
        """
        tokens = self._image_tokens(image_embeds, image_mask, num_frames=num_frames, cu_seqlens=cu_seqlens, packed=packed)
        keys, values = [], []
        for i in self.cross_attention_layers:
            k, v = epilogue.kv_projection(self.encoder.layer[i].crossattention.attention, tokens.tokens, self.num_heads)
            keys.append(k)
            values.append(v)
        return ImageKVCache(
            tuple(keys), tuple(values), self.cross_attention_layers, tokens.cu_seqlens_k, tokens.seqlens_k, tokens.batch_size
        )

    def _image_tokens(self, image_embeds, image_mask, **layout) -> _ImageTokens:
        tokens, cu_seqlens_k, seqlens_k, batch = arrange_image_tokens(
            image_embeds, image_mask, encoder_hidden_size=self.encoder_hidden_size, device=self._param_device(), **layout
        )
        tokens = tokens.to(self._param_dtype())  # transformers casts image features to the Q-Former's dtype too
        return _ImageTokens(tokens, cu_seqlens_k, seqlens_k, batch)

    # -----------------------------------------------------------------------------------------
    # Forward
    # -----------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Same arguments as the transformers module of this flavor, plus ``mask=`` and ``image_kv=``.

        BLIP-2: ``forward(query_embeds=None, query_length=None, attention_mask=None,
        encoder_hidden_states=None, encoder_attention_mask=None, *, mask, image_kv, return_dict)``.
        InstructBLIP: ``forward(input_ids=None, attention_mask=None, position_ids=None, query_embeds=None,
        encoder_hidden_states=None, encoder_attention_mask=None, *, mask, image_kv, return_dict)``.

        - query_embeds (B, Nq, hidden): defaults to the module's ``query_tokens`` when images are given.
        - attention_mask (B, L) over [queries ; text]: right padding, queries valid; or (B, T) for the text alone.
        - encoder_hidden_states (B, Li, E) image tokens with encoder_attention_mask (B, Li) (any pattern);
          or ``image_kv=`` an :class:`ImageKVCache` from :meth:`encode_image` instead.
        - mask: "bidirectional" (default), "unimodal" or "multimodal_causal" (see ops.hub_self_attention).
        - output_hidden_states=True: ``hidden_states`` = (embeddings, layer 1, ..., layer N) as transformers.
          ``output_attentions=True`` raises (the kernels never form the probabilities).

        Returns :class:`MHubOutput` (``last_hidden_state`` (B, L, hidden), ``pooler_output`` (B, hidden)),
        or a tuple when ``return_dict=False``.
        """
        inputs = bind_forward_arguments(self.flavor, args, kwargs)
        check_devices(self._param_device(), inputs)
        masks = inputs.pop("mask")
        return_dict = inputs.pop("return_dict")
        outputs = self._run(masks=(masks,), **inputs)
        return outputs[0] if return_dict in (None, True) else outputs[0].to_tuple()

    def forward_objectives(self, *args, masks=("unimodal", "bidirectional", "multimodal_causal"), **kwargs):
        """Several self-attention masks over the same inputs in one pass; one output per mask.

        Equals ``[self(*args, mask=m, **kwargs) for m in masks]`` (BLIP-2 stage 1: ITC, ITM, ITG),
        but the image K/V are projected once and the cross-attention of all objectives runs as one
        kernel call per layer (the objectives' query rows of a sample share its image keys).
        With one "unimodal" (ITC) and one "multimodal_causal" (ITG) mask, their query rows, equal
        under both masks, are computed once and ITC's text rows run as a text-only stream (see
        ``objectives.share_query_stream``): the default three objectives cost two query streams, not three.

        Dropout (training): the embeddings' dropout is drawn once for all objectives, ITC and ITG
        share their query stream's draws (as in LAVIS), and every other row draws its own; so in
        training the outputs follow the separate calls in distribution, not draw for draw.
        """
        if isinstance(masks, str) or not isinstance(masks, (tuple, list)) or len(masks) == 0:
            raise TypeError(f"masks: expected a non-empty tuple or list of mask names, got {masks!r}")
        if "mask" in kwargs:
            raise TypeError("forward_objectives: pass masks=(...), not mask=")
        inputs = bind_forward_arguments(self.flavor, args, kwargs)
        check_devices(self._param_device(), inputs)
        inputs.pop("mask")
        return_dict = inputs.pop("return_dict")
        outputs = self._run(masks=tuple(masks), **inputs)
        return tuple(o if return_dict in (None, True) else o.to_tuple() for o in outputs)

    def _first_weight(self) -> torch.Tensor:
        # The first layer's fused Q/K/V weight: its dtype and device are the hub's.
        return self.encoder.layer[0].attention.attention.qkv.weight

    def _param_dtype(self) -> torch.dtype:
        return self._first_weight().dtype

    def _param_device(self) -> torch.device:
        return self._first_weight().device

    def _embed(self, input_ids, position_ids, query_embeds):
        """[queries ; text] hidden states after LayerNorm + dropout."""
        dtype = self._param_dtype()
        if self.flavor == "blip2":
            return self.dropout(self.layernorm(query_embeds.to(dtype)))
        if input_ids is not None:
            check_input_ids(input_ids, position_ids, query_embeds, self.config.max_position_embeddings)
        return self.embeddings(input_ids, position_ids, query_embeds)

    def _image_cache(self, encoder_hidden_states, encoder_attention_mask, image_kv, batch: int):
        if image_kv is not None:
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise ValueError("image_kv: pass either image_kv or encoder_hidden_states/encoder_attention_mask, not both")
            if not isinstance(image_kv, ImageKVCache):
                raise TypeError(f"image_kv: expected an ImageKVCache from encode_image, got {type(image_kv).__name__}")
            if tuple(image_kv.layer_ids) != self.cross_attention_layers:
                raise ValueError(
                    f"image_kv: cache holds layers {image_kv.layer_ids}, this hub cross-attends in {self.cross_attention_layers}"
                )
            cache = image_kv
        elif encoder_hidden_states is not None:
            C.check_tensor("encoder_hidden_states", encoder_hidden_states, ndim=3, dtypes=C.FLOAT_DTYPES)
            # Dense layout (no data-dependent shapes): padding anywhere is moved behind the valid tokens.
            if encoder_hidden_states.device.type == "cpu" and not self._checkpointing():
                # Nothing to reuse: each cross-attention layer projects its K/V right before it attends
                # (on a CPU, faster than all up front: the K/V are still in cache when read). Under
                # checkpointing they stay up front, outside the recomputed layers.
                cache = self._image_tokens(encoder_hidden_states, encoder_attention_mask, packed=False)
            else:
                cache = self.encode_image(encoder_hidden_states, encoder_attention_mask, packed=False)
        else:
            if encoder_attention_mask is not None:
                raise ValueError("encoder_attention_mask: given without encoder_hidden_states")
            return None
        if cache.batch_size != batch:
            raise ValueError(f"image batch {cache.batch_size} differs from the query/text batch {batch}")
        return cache

    def _run(
        self,
        *,
        masks,
        input_ids,
        position_ids,
        query_embeds,
        query_length,
        attention_mask,
        encoder_hidden_states,
        encoder_attention_mask,
        image_kv,
        output_hidden_states,
    ):
        has_image = encoder_hidden_states is not None or image_kv is not None
        check_flavor_arguments(self.flavor, input_ids, position_ids, query_length)
        if query_embeds is None and (self.flavor == "blip2" or has_image):
            if self.query_tokens is None:
                raise ValueError("query_embeds: required (this FusedMHub has no query_tokens of its own)")
            query_embeds = self.query_tokens.expand(default_query_batch(input_ids, encoder_hidden_states, image_kv), -1, -1)
        if query_embeds is None and input_ids is None:
            raise ValueError("input_ids / query_embeds: give at least one of them")
        if query_embeds is not None:
            check_query_embeds(query_embeds, self.hidden_size)

        hidden = self._embed(input_ids, position_ids, query_embeds)
        batch, seq_len, _ = hidden.shape
        nq = query_positions(self.flavor, query_embeds, query_length, seq_len)
        if seq_len > nq and not self.has_text_ffn:
            raise ValueError(
                f"query_embeds: {seq_len - nq} positions beyond query_length = {nq} need the text FFN, which this BLIP-2 "
                "Q-Former lacks (config.use_qformer_text_input=False)"
            )
        lengths = text_lengths(attention_mask, batch, seq_len, nq)
        cache = self._image_cache(encoder_hidden_states, encoder_attention_mask, image_kv, batch)
        if nq > 0 and self.cross_attention_layers and cache is None:
            raise ValueError("encoder_hidden_states: required (or image_kv=) for the query tokens' cross-attention layers")

        # Rows of `hidden`, objective-major ([r * B + b]), one block per mask of row_masks; a shared
        # ITC (itc is not None) reads ITG's query rows and its own text-only stream, itc_text.
        row_masks, itc, itg_row = share_query_stream(masks)
        itc_text = hidden[:, nq:] if itc is not None and seq_len > nq else None
        num_rows = len(row_masks)
        if num_rows > 1:
            hidden = hidden.repeat(num_rows, 1, 1)
        if output_hidden_states is None:
            output_hidden_states = bool(_config_value(self.config, "output_hidden_states", False))
        # As transformers: the embeddings' output, then every layer's output.
        all_hidden = [(hidden, itc_text)] if output_hidden_states else None
        # Where the text tokens are, per stream (padded text slots: see text_rows.py); the CPU path
        # computes the valid rows alone, what a GPU runs computes every slot and zeroes the padded ones.
        pack = self._cpu_path(hidden)
        text_rows = (
            TextRows.of(lengths, hidden.shape[0], nq, seq_len, pack),
            TextRows.of(lengths, batch, 0, seq_len - nq, pack) if itc_text is not None else None,
        )
        checkpointing = self._checkpointing()
        for layer in self.encoder.layer:
            args = (layer, hidden, itc_text, nq, lengths, row_masks, cache, text_rows)
            if checkpointing:
                # Keep only each layer's input; recompute the layer in backward. The RNG state is
                # restored for the recomputation, so dropout (and the kernels' seeds) repeat exactly.
                hidden, itc_text = torch.utils.checkpoint.checkpoint(self._layer_streams, *args, use_reentrant=False)
            else:
                hidden, itc_text = self._layer_streams(*args)
            if all_hidden is not None:
                all_hidden.append((hidden, itc_text))

        layout = dict(itc=itc, itg_row=itg_row, num_rows=num_rows, batch=batch, nq=nq)
        outputs = []
        for o in range(len(masks)):
            h = objective_state(o, hidden, itc_text, **layout)
            states = None if all_hidden is None else tuple(objective_state(o, *x, **layout) for x in all_hidden)
            outputs.append(MHubOutput(last_hidden_state=h, pooler_output=h[:, 0, :], hidden_states=states))
        return outputs

    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _layer_streams(self, layer, hidden, itc_text, nq, text_lengths, masks, cache, text_rows):
        """One layer over the objective rows and, if any, ITC's text-only stream.

        The ops' index checks are skipped here: the text lengths come from the attention mask checked
        once per forward, the image lengths from the cache checked when it was built; per-layer
        repeats would only add device asserts (while compiling, checks are off anyway).
        """
        if torch.compiler.is_compiling():
            return self._layer_streams_unchecked(layer, hidden, itc_text, nq, text_lengths, masks, cache, text_rows)
        with C.skip_value_checks():
            return self._layer_streams_unchecked(layer, hidden, itc_text, nq, text_lengths, masks, cache, text_rows)

    def _op_backend(self, op: str, q: torch.Tensor) -> str:
        """What this module's backend setting means for ``op`` ("cuda": CUDA where the op has a kernel for these inputs)."""
        return backends.module_choice(op, self.backend, q.device.type, q.dtype, self.head_dim, self._dropout_p() > 0)

    def _layer_streams_unchecked(self, layer, hidden, itc_text, nq, text_lengths, masks, cache, text_rows):
        hidden = self._layer(layer, hidden, nq, text_lengths, masks, cache, text_rows[0])
        if itc_text is not None:
            # ITC's text rows see only valid text keys: a sequence with no queries, under the padding mask.
            itc_text = self._layer(layer, itc_text, 0, text_lengths, ("bidirectional",), cache, text_rows[1])
        return hidden, itc_text

    def _layer(self, layer, hidden, nq, text_lengths, masks, cache, text_rows: TextRows | None):
        rows, seq_len, width = hidden.shape
        num_objectives = len(masks)
        batch = rows // num_objectives
        packed = text_rows is not None and text_rows.packed
        # On the packed path every position-wise matmul reads the rows to compute alone (x); the
        # attention reads q, k, v scattered back to the padded layout (zeros in the padded slots).
        x = text_rows.gather(hidden) if packed else hidden
        q, k, v = epilogue.qkv_projection(layer.attention.attention, x, self.num_heads)
        if packed:
            q, k, v = (text_rows.scatter(t, seq_len) for t in (q, k, v))
        parts = []
        backend = self._op_backend("hub_self_attention", q)
        for o, mask in enumerate(masks):
            s = slice(o * batch, (o + 1) * batch)
            parts.append(
                ops.hub_self_attention(
                    q[s], k[s], v[s], nq, text_lengths, mask=mask, backend=backend, dropout_p=self._dropout_p()
                )
            )
        attn = parts[0] if num_objectives == 1 else torch.cat(parts, dim=0)
        attn = attn.reshape(rows, seq_len, width)
        query_part, text_part = self._output_block(layer.attention.output, attn, x, nq, text_rows)
        out = None
        if query_part is not None:
            if layer.has_cross_attention:
                query_part = self._cross_attention(layer, query_part, cache, num_objectives)
            out = layer.feed_forward_query(query_part, self.backend)
        if text_part is not None:
            text = layer.feed_forward_text(text_part, self.backend)
            if text_rows is not None:
                text = text_rows.scatter_text(text) if text_rows.packed else text_rows.zero_padding(text)
            out = text if out is None else torch.cat([out, text], dim=1)
        return out

    def _output_block(self, block, attn, residual, nq, text_rows: TextRows | None):
        """The attention output block over (rows, L, W), as (query part (rows, nq, W), text part); None for an absent part.

        The query rows and the text rows go separate ways from here (cross-attention, their own FFNs):
        each part comes out as its own contiguous tensor, so no matmul below reads a strided slice
        (which it would copy, and keep the copy for backward). On the packed path ``residual`` is
        already the gathered rows, and the text part is the valid text rows alone, (text tokens, W).
        """
        if text_rows is not None and text_rows.packed:
            both = epilogue.dense_dropout_residual_layernorm_rows(block, attn, text_rows.rows_index, residual, self.backend)
            query = both[: text_rows.query_rows].view(-1, nq, both.shape[-1]) if nq > 0 else None
            return query, both[text_rows.query_rows :]
        if nq == 0:
            return None, epilogue.dense_dropout_residual_layernorm(block, attn, residual, self.backend)
        return epilogue.output_block_split(block, attn, residual, nq, self.backend)

    def _cross_attention(self, layer, query_part, cache: ImageKVCache | _ImageTokens, num_objectives: int):
        rows, nq, width = query_part.shape
        batch = rows // num_objectives
        q = epilogue.query_projection(layer.crossattention.attention, query_part, self.num_heads)
        if num_objectives > 1:
            # Every objective's queries of sample b read sample b's image: put them side by side
            # along the query axis, (O*B, Nq, H, D) -> (B, O*Nq, H, D), and run one kernel call.
            heads, dim = self.num_heads, self.head_dim
            q = q.view(num_objectives, batch, nq, heads, dim).transpose(0, 1).reshape(batch, num_objectives * nq, heads, dim)
        if isinstance(cache, _ImageTokens) and self._absorb(q, cache):
            # Few queries per image on a CPU: attend without forming K and V (absorbed.py)
            proj = layer.crossattention.attention
            valid = None if cache.seqlens_k is None else torch.arange(cache.tokens.shape[1]) < cache.seqlens_k[:, None]
            out = absorbed.absorbed_cross_attention(
                q, cache.tokens, valid, proj.kv.weight, proj.kv.bias, self.head_dim**-0.5, self._dropout_p()
            )
            return self._cross_attention_output(layer, out, query_part, batch, num_objectives)
        if isinstance(cache, _ImageTokens):
            k, v = epilogue.kv_projection(layer.crossattention.attention, cache.tokens, self.num_heads)
        else:
            k, v = cache.kv(layer.layer_idx)
        out = ops.hub_cross_attention(
            q,
            k,
            v,
            cache.cu_seqlens_k,
            backend=self._op_backend("hub_cross_attention", q),
            seqlens_k=cache.seqlens_k,
            dropout_p=self._dropout_p(),
        )
        return self._cross_attention_output(layer, out, query_part, batch, num_objectives)

    def _cross_attention_output(self, layer, out, query_part, batch: int, num_objectives: int):
        rows, nq, width = query_part.shape
        if num_objectives > 1:
            out = out.view(batch, num_objectives, nq, self.num_heads, self.head_dim).transpose(0, 1)
        return layer.crossattention.output(out.reshape(rows, nq, width), query_part, self.backend)

    def _cpu_path(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s work runs this module's CPU path (torch ops on CPU tensors, eager): where padded text
        rows are skipped and the absorbed cross-attention may run. Not the GPU kernels' path (on a CPU too,
        under the interpreter or the compile-only harness) and not under torch.compile."""
        on_cpu = t.device.type == "cpu" and not backends.on_gpu(t)
        return on_cpu and not epilogue.use_fused(self.backend, t) and not torch.compiler.is_compiling()

    def _absorb(self, q: torch.Tensor, image: _ImageTokens) -> bool:
        """Whether this cross-attention runs with the K/V projections folded into the queries (absorbed.py):
        dense image tokens, and :meth:`attends_image_tokens` for each sample with its own image."""
        _, lq, _, _ = q.shape
        tokens = image.tokens
        return image.cu_seqlens_k is None and self.attends_image_tokens(q, lq, tokens.shape[1], tokens.requires_grad, 1, 1)

    def attends_image_tokens(
        self, t: torch.Tensor, num_queries: int, image_tokens: int, image_grad: bool, rows: int, images: int
    ) -> bool:
        """Whether ``rows`` rows of ``num_queries`` queries over ``images`` distinct images of ``image_tokens`` tokens
        (on ``t``'s device) cost less given each row's image tokens, attended without forming K and V
        (absorbed.py: the CPU path outside autocast, by its FLOP model), than each image's K/V computed once
        (:meth:`encode_image` + ``ImageKVCache.select``). ``image_grad``: the image tokens need a gradient."""
        if not self._cpu_path(t) or torch.is_autocast_enabled("cpu"):
            return False
        backward = torch.is_grad_enabled()
        args = (num_queries, image_tokens, self.encoder_hidden_size, self.num_heads, self.head_dim, image_grad and backward)
        return absorbed.cheaper(*args, backward, rows=rows, images=images)


__all__ = ["FusedMHub", "MHubOutput"]
