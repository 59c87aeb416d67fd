"""Frozen multimodal backbones AIM can aggregate demonstrations with.

A backbone turns images into LLM input embeddings and runs a decoder-only LLM whose attention
goes through transformers' attention interface (so the demo-prefix cache can serve it). Two:

- :class:`LlavaBackbone`: a transformers ``LlavaForConditionalGeneration`` (vision tower +
  projector + language model), from a config with random weights or a local checkpoint.
- :class:`MMICTBackbone`: this project's own MMICT model (``ln_vision`` + M-Hub + FC in front of
  a decoder-only LLM), e.g. one trained by ``python -m mmict_kernels.train``; its image tokens
  are the FC of M-Hub's query outputs, as the MMICT query path feeds them to the LLM.

Both are frozen: AIM never trains them (``requires_grad_(False)``, eval mode).
"""

from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """Interface: ``image_tokens``, ``embed``, ``lm`` (a causal LM taking ``inputs_embeds``), ``hidden_size``."""

    lm: nn.Module

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.embedding_dim

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def image_tokens(self, images: torch.Tensor, text_ids: list[list[int]] | None = None) -> torch.Tensor:
        """(N, ...) images -> (N, n, hidden) LLM input embeddings; ``text_ids`` only for backbones that read a prompt."""
        raise NotImplementedError

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Every layer's hidden states (embeddings first, the normed top last), as transformers returns them."""
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states


class LlavaBackbone(Backbone):
    """``LlavaForConditionalGeneration``: images are pixel tensors (N, 3, H, W)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "get_image_features"):
            raise TypeError(
                f"model: expected a transformers LLaVA-style model with get_image_features, got {type(model).__name__}"
            )
        self.lm = model
        self.requires_grad_(False).eval()

    def image_tokens(self, images: torch.Tensor, text_ids: list[list[int]] | None = None) -> torch.Tensor:
        # LLaVA's image tokens do not depend on the prompt: text_ids is not used.
        if images.dim() != 4:
            raise ValueError(f"images: expected pixel values (N, 3, H, W), got shape {tuple(images.shape)}")
        feats = self.lm.get_image_features(pixel_values=images.to(self.embed_tokens.weight.dtype))
        # transformers 5.x returns an output object whose pooler_output is the projected features
        # (a list of (n, hidden) per image); older versions return a tensor or a list.
        feats = getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats


class MMICTBackbone(Backbone):
    """The MMICT model's query path: images are frozen encoder features (N, Li, width)."""

    def __init__(self, mmict_model: nn.Module):
        super().__init__()
        for attr in ("ln_vision", "mhub", "proj", "llm", "num_query_tokens"):
            if not hasattr(mmict_model, attr):
                raise TypeError(f"mmict_model: expected an MMICTModel (missing {attr!r}), got {type(mmict_model).__name__}")
        if getattr(mmict_model.llm.config, "is_encoder_decoder", False):
            raise ValueError(
                "mmict_model: AIM needs a decoder-only LLM (its fused tokens are a causal prefix); got an encoder-decoder"
            )
        self.ln_vision, self.mhub, self.fc, self.lm = mmict_model.ln_vision, mmict_model.mhub, mmict_model.proj, mmict_model.llm
        self.num_query_tokens = mmict_model.num_query_tokens
        self.requires_grad_(False).eval()

    def image_tokens(self, images: torch.Tensor, text_ids: list[list[int]] | None = None) -> torch.Tensor:
        """FC of M-Hub's query outputs; with ``text_ids`` (M-Hub token ids) the queries also read that
        text, as MMICT's query path does (textual-guided visual features); without, the queries alone."""
        if images.dim() != 3:
            raise ValueError(f"images: expected encoder features (N, Li, width), got shape {tuple(images.shape)}")
        if text_ids is not None and len(text_ids) != images.shape[0]:
            raise ValueError(f"text_ids: expected one id list per image ({images.shape[0]}), got {len(text_ids)}")
        feats = self.ln_vision(images.to(self.ln_vision.weight.dtype))
        n, device = images.shape[0], images.device
        width = max((len(t) for t in text_ids), default=0) if text_ids is not None else 0
        ids = torch.zeros(n, width, dtype=torch.long, device=device)
        mask = torch.ones(n, self.num_query_tokens + width, dtype=torch.long, device=device)
        for i, t in enumerate(text_ids or []):  # right padding, as M-Hub requires
            ids[i, : len(t)] = torch.tensor(list(t), dtype=torch.long)
            mask[i, self.num_query_tokens + len(t) :] = 0
        out = self.mhub(input_ids=ids, attention_mask=mask, encoder_hidden_states=feats)
        return self.fc(out.last_hidden_state[:, : self.num_query_tokens]).to(self.embed_tokens.weight.dtype)
