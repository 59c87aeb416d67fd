"""This project's own MMICT model as AIM's frozen backbone.

``ln_vision`` + M-Hub + FC in front of a decoder-only LLM, e.g. one trained by ``python -m
mmict_kernels.train``; its visual tokens are the FC of M-Hub's query outputs, as the MMICT query
path feeds them to the LLM. Images are the frozen encoder's features (N, Li, width): a video's
frames are packed along Li (MMICT's video packing), so it is one item like an image.
"""

from __future__ import annotations

import torch
from torch import nn

from ..visual import Segment, VisualTokens
from .base import Backbone


class MMICTBackbone(Backbone):
    """The MMICT model's query path: images are frozen encoder features (N, Li, width)."""

    family = "mmict"

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

    def visual_tokens(self, images: torch.Tensor, text_ids: list[list[int]] | None = None) -> list[VisualTokens]:
        """FC of M-Hub's query outputs, (num_query_tokens, hidden) per image; with ``text_ids`` (M-Hub token ids)
        the queries also read that text, as MMICT's query path does (textual-guided visual features)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected encoder features (N, Li, width), got {got}")
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
        tokens = self.fc(out.last_hidden_state[:, : self.num_query_tokens]).to(self.dtype)
        return [VisualTokens(t, (Segment("image", self.num_query_tokens),)) for t in tokens]
