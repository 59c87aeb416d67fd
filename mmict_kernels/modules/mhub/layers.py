"""The building blocks of FusedMHub, named exactly like transformers' Q-Former sub-modules.

The module tree mirrors ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` (``...crossattention.output.LayerNorm.bias``,
``...intermediate_query.dense.weight``, ...), except that each attention block keeps its Q/K/V (cross-attention: K/V)
weights as one fused parameter (``projections.py``); its state dict hooks save and load them under transformers'
names (``encoder.layer.{i}.attention.attention.query.weight``, ...), so a transformers state dict loads as is. What differs is
*how* a layer runs: attention goes through :mod:`mmict_kernels.ops` (masks built in-kernel, packed
image tokens, no probability matrix), and the driver loop lives in :class:`FusedMHub` so that image
K/V can be cached and several objectives can share one pass.
"""

from __future__ import annotations

import torch
from torch import nn

from . import epilogue
from .projections import QFormerProjections


def _activation(name_or_fn):
    """The FFN activation from a config's ``hidden_act`` (a name or a callable), as in transformers."""
    if callable(name_or_fn):
        return name_or_fn
    from transformers.activations import ACT2FN

    if name_or_fn not in ACT2FN:
        raise ValueError(f"config.hidden_act: unknown activation {name_or_fn!r}; expected one of {sorted(ACT2FN)}")
    return ACT2FN[name_or_fn]


class QFormerOutputBlock(nn.Module):
    """BERT's output block: ``LayerNorm(dropout(dense(x)) + residual)`` (post-LayerNorm)."""

    def __init__(self, in_features: int, hidden_size: int, layer_norm_eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        return epilogue.dense_dropout_residual_layernorm(self, x, residual, backend)


def _output_block(config, in_features: int) -> QFormerOutputBlock:
    return QFormerOutputBlock(in_features, config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob)


class QFormerAttentionBlock(nn.Module):
    """``attention`` (the projections) + ``output`` (dense, dropout, residual, LayerNorm), as in HF."""

    def __init__(self, config, is_cross_attention: bool):
        super().__init__()
        kv_in = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.attention = QFormerProjections(config.hidden_size, kv_in, config.hidden_size, is_cross_attention)
        self.output = _output_block(config, config.hidden_size)


class QFormerIntermediate(nn.Module):
    """The FFN's first half: ``act(dense(x))``."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _activation(config.hidden_act)
        self.act_name = config.hidden_act if isinstance(config.hidden_act, str) else None

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        return epilogue.dense_activation(self, x, backend)


class QFormerLayer(nn.Module):
    """One Q-Former layer's parameters. Which blocks exist follows transformers exactly:

    - ``crossattention`` when ``layer_idx % cross_attention_frequency == 0``;
    - ``intermediate``/``output`` (the text FFN) when the Q-Former reads text
      (always for InstructBLIP; ``use_qformer_text_input`` for BLIP-2);
    - ``intermediate_query``/``output_query`` (the query FFN) always.
    """

    def __init__(self, config, layer_idx: int, has_text_ffn: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = QFormerAttentionBlock(config, is_cross_attention=False)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttentionBlock(config, is_cross_attention=True)
        self.has_text_ffn = has_text_ffn
        if has_text_ffn:
            self.intermediate = QFormerIntermediate(config)
            self.output = _output_block(config, config.intermediate_size)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = _output_block(config, config.intermediate_size)

    def feed_forward_query(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        return epilogue.feed_forward(self.intermediate_query, self.output_query, x, backend)

    def feed_forward_text(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        return epilogue.feed_forward(self.intermediate, self.output, x, backend)


class QFormerEncoder(nn.Module):
    """Holds ``layer`` (a ModuleList) so parameter names read ``encoder.layer.{i}...`` as in HF."""

    def __init__(self, config, has_text_ffn: bool):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, i, has_text_ffn) for i in range(config.num_hidden_layers))


class QFormerTextEmbeddings(nn.Module):
    """InstructBLIP's embeddings: word + absolute position for text, then LayerNorm + dropout over [queries ; text]."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Non-persistent, as in transformers, so state dicts carry no position_ids.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(self, input_ids, position_ids, query_embeds) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.to(self.layernorm.weight.dtype))
        if input_ids is not None:
            if position_ids is None:
                position_ids = self.position_ids[:, : input_ids.shape[1]]
            text = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
            parts.append(text.to(self.layernorm.weight.dtype))
        embeddings = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.layernorm(embeddings))


def init_qformer_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation (as transformers' ``_init_weights``): N(0, std) matrices, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
