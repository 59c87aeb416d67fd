"""Load the Q-Former (M-Hub) and query tokens of a LAVIS BLIP-2 / InstructBLIP / MMICT checkpoint.

LAVIS (and the MMICT code built on it) keeps the Q-Former as a BERT inside ``Qformer.bert`` and the
learned queries as ``query_tokens``. Key by key, LAVIS -> FusedMHub (transformers' names):

    Qformer.bert.embeddings.LayerNorm.*            -> layernorm.*               (BLIP-2: no word embeddings)
                                                   -> embeddings.layernorm.*    (InstructBLIP / MMICT)
    Qformer.bert.embeddings.word_embeddings.weight -> embeddings.word_embeddings.weight
    Qformer.bert.embeddings.position_embeddings.*  -> embeddings.position_embeddings.*
    Qformer.bert.encoder.layer.{i}.attention.self.{query,key,value}.*       -> encoder.layer.{i}.attention.attention.*
    Qformer.bert.encoder.layer.{i}.crossattention.self.{query,key,value}.*  -> encoder.layer.{i}.crossattention.attention.*
    (attention.output / crossattention.output / intermediate / output / intermediate_query / output_query: same names)
    query_tokens                                   -> query_tokens

Not part of the M-Hub and skipped: every key outside ``Qformer.bert.*`` and ``query_tokens`` (the ViT,
``ln_vision``, the LLM, ``t5_proj`` / ``opt_proj``, ``Qformer.cls.*`` language-model head), the
``Qformer.bert.embeddings.position_ids`` buffer and ``Qformer.bert.pooler.*`` (BERT's pooler; the
Q-Former output does not use it). Any other ``Qformer.bert.*`` key is unexpected and raises.

Sizes come from the tensors: hidden size, layer count, which layers cross-attend (must be every
f-th layer from 0, as in LAVIS's ``cross_attention_freq``), encoder (ViT) width, FFN size, vocabulary,
positions, number of query tokens. The head count cannot be read from shapes: pass it (BERT-base: 12).
"""

from __future__ import annotations

import os
import re

import torch

BERT_PREFIX = "Qformer.bert."
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_SKIPPED_BERT = ("embeddings.position_ids", "pooler.")


class LavisCheckpointError(ValueError):
    """A LAVIS state dict that does not describe a Q-Former FusedMHub can load (the message lists why)."""


def load_lavis_state_dict(path_or_state_dict, *, weights_only: bool = True) -> dict:
    """A flat {name: tensor} dict from a LAVIS ``.pth`` (optionally ``{"model": ...}``), a ``.safetensors`` file, or a dict."""
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    elif isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path_or_state_dict: no such checkpoint file: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=weights_only)
    else:
        raise TypeError(f"path_or_state_dict: expected a file path or a state dict, got {type(path_or_state_dict).__name__}")
    for wrapper in ("model", "state_dict"):  # LAVIS saves {"model": ..., "optimizer": ..., "epoch": ...}
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _rename_bert_key(key: str, flavor: str) -> str:
    """A key under ``Qformer.bert.`` (prefix removed) -> FusedMHub name."""
    if key.startswith("embeddings.LayerNorm."):
        return ("layernorm." if flavor == "blip2" else "embeddings.layernorm.") + key[len("embeddings.LayerNorm.") :]
    m = _LAYER_KEY.match(key)
    if m:
        rest = m.group(2).replace("attention.self.", "attention.attention.", 1)
        rest = rest.replace("crossattention.self.", "crossattention.attention.", 1)
        return f"encoder.layer.{m.group(1)}.{rest}"
    return key


def _rename_to_lavis(name: str, flavor: str) -> str:
    """A FusedMHub name -> LAVIS key (the inverse of the table above)."""
    if name == "query_tokens":
        return name
    if flavor == "blip2" and name.startswith("layernorm."):
        return BERT_PREFIX + "embeddings.LayerNorm." + name[len("layernorm.") :]
    if name.startswith("embeddings.layernorm."):
        return BERT_PREFIX + "embeddings.LayerNorm." + name[len("embeddings.layernorm.") :]
    m = _LAYER_KEY.match(name)
    if m:
        rest = m.group(2)
        if rest.startswith("attention.attention."):
            rest = "attention.self." + rest[len("attention.attention.") :]
        elif rest.startswith("crossattention.attention."):
            rest = "crossattention.self." + rest[len("crossattention.attention.") :]
        return f"{BERT_PREFIX}encoder.layer.{m.group(1)}.{rest}"
    return BERT_PREFIX + name


def _shape(state: dict, key: str, what: str):
    if key not in state:
        raise LavisCheckpointError(f"path_or_state_dict: missing {BERT_PREFIX}{key} (needed for {what})")
    return tuple(state[key].shape)


def infer_lavis_config(bert: dict, query_tokens: torch.Tensor | None, num_attention_heads: int, **overrides):
    """(transformers Q-Former config, flavor, num_query_tokens) from the shapes of a LAVIS ``Qformer.bert`` dict."""
    from transformers import Blip2QFormerConfig, InstructBlipQFormerConfig

    layer_ids = sorted({int(m.group(1)) for k in bert if (m := _LAYER_KEY.match(k))})
    if not layer_ids:
        raise LavisCheckpointError(f"path_or_state_dict: no {BERT_PREFIX}encoder.layer.* keys: not a LAVIS Q-Former state dict")
    num_layers = layer_ids[-1] + 1
    hidden = _shape(bert, "encoder.layer.0.attention.self.query.weight", "the hidden size")[0]
    if hidden % num_attention_heads != 0:
        raise LavisCheckpointError(f"num_attention_heads: hidden size {hidden} is not a multiple of {num_attention_heads}")
    cross = sorted({i for i in layer_ids if f"encoder.layer.{i}.crossattention.self.key.weight" in bert})
    if not cross or cross[0] != 0:
        raise LavisCheckpointError(
            f"path_or_state_dict: cross-attention must start at layer 0 (LAVIS cross_attention_freq); found layers {cross}"
        )
    freq = cross[1] - cross[0] if len(cross) > 1 else num_layers
    if cross != list(range(0, num_layers, freq)):
        raise LavisCheckpointError(
            f"path_or_state_dict: cross-attention layers {cross} are not every f-th layer from 0 (LAVIS cross_attention_freq)"
        )
    encoder_width = _shape(bert, "encoder.layer.0.crossattention.self.key.weight", "the image encoder width")[1]
    intermediate = _shape(bert, "encoder.layer.0.intermediate_query.dense.weight", "the FFN size")[0]
    has_words = "embeddings.word_embeddings.weight" in bert
    has_text_ffn = any(k.endswith(".intermediate.dense.weight") for k in bert)
    flavor = "instructblip" if has_words else "blip2"
    vocab = bert["embeddings.word_embeddings.weight"].shape[0] if has_words else 30522
    max_pos = bert["embeddings.position_embeddings.weight"].shape[0] if "embeddings.position_embeddings.weight" in bert else 512
    kwargs = dict(
        hidden_size=hidden,
        num_attention_heads=num_attention_heads,
        num_hidden_layers=num_layers,
        intermediate_size=intermediate,
        cross_attention_frequency=freq,
        encoder_hidden_size=encoder_width,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
    )
    kwargs.update(overrides)
    if flavor == "blip2":
        config = Blip2QFormerConfig(use_qformer_text_input=has_text_ffn, **kwargs)
    else:
        config = InstructBlipQFormerConfig(**kwargs)
    nq = 0 if query_tokens is None else query_tokens.shape[1]
    return config, flavor, nq


def fused_mhub_from_lavis(
    cls,
    path_or_state_dict,
    num_attention_heads: int = 12,
    *,
    backend: str = "auto",
    weights_only: bool = True,
    **config_overrides,
):
    """See :meth:`FusedMHub.from_lavis`. ``config_overrides`` (e.g. ``layer_norm_eps``, ``hidden_dropout_prob``)
    go to the transformers config; the sizes come from the checkpoint."""
    if not isinstance(num_attention_heads, int) or isinstance(num_attention_heads, bool) or num_attention_heads < 1:
        raise ValueError(f"num_attention_heads: expected a positive int, got {num_attention_heads!r}")
    state = load_lavis_state_dict(path_or_state_dict, weights_only=weights_only)
    bert = {k[len(BERT_PREFIX) :]: v for k, v in state.items() if k.startswith(BERT_PREFIX)}
    query_tokens = state.get("query_tokens")
    if query_tokens is None:
        raise LavisCheckpointError("path_or_state_dict: missing keys ['query_tokens'] (the learned queries)")
    if not isinstance(query_tokens, torch.Tensor) or query_tokens.dim() != 3 or query_tokens.shape[0] != 1:
        shape = tuple(query_tokens.shape) if isinstance(query_tokens, torch.Tensor) else type(query_tokens).__name__
        raise LavisCheckpointError(f"path_or_state_dict: query_tokens must have shape (1, Nq, hidden), got {shape}")
    config, flavor, nq = infer_lavis_config(bert, query_tokens, num_attention_heads, **config_overrides)

    hub = cls(config, flavor=flavor, num_query_tokens=nq, backend=backend)
    renamed = {"query_tokens": query_tokens}
    for key, value in bert.items():
        if key.startswith(_SKIPPED_BERT):
            continue
        renamed[_rename_bert_key(key, flavor)] = value
    expected = set(hub.state_dict())
    missing = sorted(_rename_to_lavis(k, flavor) for k in expected - set(renamed))
    unexpected = sorted(
        BERT_PREFIX + k for k in bert if not k.startswith(_SKIPPED_BERT) and _rename_bert_key(k, flavor) not in expected
    )
    if missing or unexpected:
        raise LavisCheckpointError(
            f"path_or_state_dict: the LAVIS Q-Former keys do not match a {flavor} Q-Former of this shape; "
            f"missing keys {missing}; unexpected keys {unexpected}"
        )
    for name, tensor in hub.state_dict().items():
        if tuple(renamed[name].shape) != tuple(tensor.shape):
            raise LavisCheckpointError(
                f"path_or_state_dict: {_rename_to_lavis(name, flavor)} has shape {tuple(renamed[name].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    hub.load_state_dict(renamed, strict=True)
    return hub


def to_lavis_state_dict(hub) -> dict:
    """The hub's weights under LAVIS keys (``Qformer.bert.*``, ``query_tokens``): the inverse of :func:`fused_mhub_from_lavis`."""
    return {_rename_to_lavis(k, hub.flavor): v for k, v in hub.state_dict().items()}


__all__ = ["fused_mhub_from_lavis", "load_lavis_state_dict", "infer_lavis_config", "to_lavis_state_dict", "LavisCheckpointError"]
