"""What every AIM backbone provides: a frozen multimodal LLM seen through one small interface.

A backbone turns images and videos into LLM input embeddings (:meth:`Backbone.visual_tokens`),
says where a row's tokens sit (:meth:`Backbone.row_positions`: ``None`` for ordinary 1-D
positions, a (3, n) array for Qwen2-VL's M-RoPE), reads hidden states, and prepares pixels from
raw frames with its own image processor (:meth:`Backbone.preprocess`). Its ``lm`` is the
transformers model the demo-prefix cache runs (its attention dispatches through transformers'
``AttentionInterface``). Backbones are frozen: AIM never trains them (``requires_grad_(False)``,
eval mode).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..visual import Segment, VisualInput, VisualTokens


class Backbone(nn.Module):
    """Interface (see the module docstring). ``family`` names the architecture (bank fingerprints, errors)."""

    lm: nn.Module
    family: str = "backbone"
    processor = None  # the image processor preprocess() uses (None: the backbone's own resizing)

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.embedding_dim

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def visual_tokens(
        self, images: torch.Tensor | Sequence[VisualInput], text_ids: list[list[int]] | None = None
    ) -> list[VisualTokens]:
        """One :class:`VisualTokens` per image or video, all of them encoded in as few vision-tower calls as possible.

        ``text_ids`` only for backbones whose visual tokens read a prompt (MMICT's M-Hub).
        """
        raise NotImplementedError

    def row_positions(self, segments: tuple[Segment, ...]) -> np.ndarray | None:
        """(P, n) int64 positions of a row made of ``segments`` counted from 0, or None (1-D: 0, 1, ..., n - 1)."""
        return None

    def hidden_states(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every layer's hidden states (embeddings first, the normed top last), as transformers returns them.

        No attention mask: rows are right-padded and the LM causal, so a valid token never sees padding.
        """
        extra = {} if position_ids is None else {"position_ids": position_ids}
        out = self.lm(inputs_embeds=inputs_embeds, output_hidden_states=True, use_cache=False, **extra)
        return out.hidden_states

    def preprocess(self, frames: Sequence[np.ndarray], kind: str = "image", fps: float | None = None) -> VisualInput:
        """Raw (H, W, 3) uint8 frames (one for an image) -> the backbone's :class:`VisualInput`.

        ``fps``: a video's frame rate, for backbones whose positions encode time (Qwen2.5-VL).
        """
        raise NotImplementedError(f"{type(self).__name__}: no image preprocessing (pass VisualInput / feature tensors)")

    def describe(self) -> str:
        """What, beyond the weights, changes the aggregations: the architecture and the image processor's settings."""
        processor = self.processor.to_dict() if hasattr(self.processor, "to_dict") else None
        return json.dumps(
            {"family": self.family, "model": type(self.lm).__name__, "processor": processor}, sort_keys=True, default=str
        )


def as_items(images, family: str) -> list[VisualInput]:
    """``images`` as a list of :class:`VisualInput` (errors name the backbone and what it expects)."""
    if isinstance(images, torch.Tensor):
        raise TypeError(
            f"images: the {family} backbone takes a list of VisualInput (its processor's pixel values with their sizes), "
            f"got a tensor of shape {tuple(images.shape)}"
        )
    items = list(images)
    for i, item in enumerate(items):
        if not isinstance(item, VisualInput):
            raise TypeError(f"images[{i}]: expected a VisualInput, got {type(item).__name__}")
    return items


def pooled_features(out) -> list[torch.Tensor] | torch.Tensor:
    """A ``get_image_features`` result across transformers versions: 5.x returns an output object whose
    ``pooler_output`` holds the projected features, older ones the features (a tensor or a list) themselves."""
    return getattr(out, "pooler_output", out)
