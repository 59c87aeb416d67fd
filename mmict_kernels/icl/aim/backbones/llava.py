"""LLaVA (1.5 class) and LLaVA-NeXT as AIM backbones.

- :class:`LlavaBackbone`: ``LlavaForConditionalGeneration``; a fixed-size image is (3, S, S) pixels
  and gives a fixed number of tokens. Takes a stacked (N, 3, S, S) tensor or a list of
  :class:`~mmict_kernels.icl.aim.visual.VisualInput` (a video's frames read as images, their
  tokens one after the other).
- :class:`LlavaNextBackbone`: ``LlavaNextForConditionalGeneration`` with any-resolution tiling:
  an image is read at its tiles (the base view plus the grid of crops its aspect ratio picks
  from ``image_grid_pinpoints``), unpadded to the image's own shape, with a newline token per
  row; so the number of tokens depends on each image's size. Frames of a video are read as images.

Both read images through the model's own ``get_image_features`` (vision tower, feature layer and
selection, projector) exactly as the stock forward does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..visual import Segment, VisualInput, VisualTokens
from .base import Backbone, as_items, pooled_features

# The tiny backbone's pixel normalisation (no image processor): the embedded shapes data is drawn
# on a mid-grey background, so these keep its pixels near zero mean and unit scale.
TINY_PIXEL_MEAN, TINY_PIXEL_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _check_llava_like(model: nn.Module, what: str) -> None:
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model: expected a transformers {what} model with get_image_features, got {type(model).__name__}")


def resize_uint8(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 (bicubic, as Pillow resizes)."""
    if frame.shape[:2] == (height, width):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC), dtype=np.uint8)


class LlavaBackbone(Backbone):
    """``LlavaForConditionalGeneration``: images (N, 3, S, S), or a list of VisualInput with (F, 3, S, S) frames."""

    family = "llava"

    def __init__(self, model: nn.Module, processor=None):
        super().__init__()
        _check_llava_like(model, "LLaVA-style")
        self.lm = model
        self.processor = processor
        self.requires_grad_(False).eval()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, n, hidden) projected image features."""
        cfg = self.lm.config
        out = self.lm.get_image_features(
            pixel_values=pixels.to(self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = pooled_features(out)
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def visual_tokens(self, images, text_ids=None) -> list[VisualTokens]:
        # LLaVA's image tokens do not depend on the prompt: text_ids is not used.
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"images: expected pixel values (N, 3, H, W), got shape {tuple(images.shape)}")
            return [VisualTokens(f, (Segment("image", f.shape[0]),)) for f in self._features(images)]
        items = as_items(images, self.family)
        for i, item in enumerate(items):
            if item.pixel_values.dim() != 4:
                raise ValueError(f"images[{i}]: expected (F, 3, H, W) frames, got shape {tuple(item.pixel_values.shape)}")
        feats = self._features(torch.cat([item.pixel_values for item in items]))  # every frame in one call
        out, start = [], 0
        for item in items:
            frames = item.pixel_values.shape[0]
            tokens = feats[start : start + frames].flatten(0, 1)  # a video's frames one after the other
            start += frames
            out.append(VisualTokens(tokens, (Segment(item.kind, tokens.shape[0]),)))
        return out

    def preprocess(self, frames: Sequence[np.ndarray], kind: str = "image", fps: float | None = None) -> VisualInput:
        if self.processor is not None:
            pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"]
            return VisualInput(pixels, kind)
        size = self.lm.config.vision_config.image_size
        x = torch.from_numpy(np.stack([resize_uint8(f, size, size) for f in frames])).float().div(255).permute(0, 3, 1, 2)
        mean, std = torch.tensor(TINY_PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(TINY_PIXEL_STD).view(1, 3, 1, 1)
        return VisualInput((x - mean) / std, kind)


class LlavaNextBackbone(Backbone):
    """``LlavaNextForConditionalGeneration``: a list of VisualInput with (F, P, 3, S, S) tiles and ``image_sizes``."""

    family = "llava_next"

    def __init__(self, model: nn.Module, processor=None):
        super().__init__()
        _check_llava_like(model, "LLaVA-NeXT")
        if not hasattr(model.config, "image_grid_pinpoints"):
            raise TypeError(f"model: expected a LLaVA-NeXT model (config with image_grid_pinpoints), got {type(model).__name__}")
        self.lm = model
        self.processor = processor
        self.requires_grad_(False).eval()

    def visual_tokens(self, images, text_ids=None) -> list[VisualTokens]:
        items = as_items(images, self.family)
        for i, item in enumerate(items):
            frames = item.pixel_values.shape[0] if item.pixel_values.dim() == 5 else -1
            if frames < 1 or item.image_sizes is None or len(item.image_sizes) != frames:
                raise ValueError(
                    f"images[{i}]: expected (F, P, 3, S, S) tiles with one (height, width) image size per frame, "
                    f"got shape {tuple(item.pixel_values.shape)} and image_sizes {item.image_sizes}"
                )
        tiles = max(item.pixel_values.shape[1] for item in items)
        # Items processed apart may be padded to different tile counts; the model reads each frame's
        # own count from its image size, so zero tiles past it are never read.
        pixels = torch.cat(
            [F.pad(item.pixel_values, (0, 0, 0, 0, 0, 0, 0, tiles - item.pixel_values.shape[1])) for item in items]
        )
        sizes = [list(size) for item in items for size in item.image_sizes]  # host ints: no device sync in the model
        cfg = self.lm.config
        out = self.lm.get_image_features(
            pixel_values=pixels.to(self.dtype),
            image_sizes=sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        per_frame = list(pooled_features(out))  # (n_f, hidden) per frame: base view, unpadded tiles, newlines
        result, start = [], 0
        for item in items:
            frames = item.pixel_values.shape[0]
            tokens = torch.cat(per_frame[start : start + frames])
            start += frames
            result.append(VisualTokens(tokens, (Segment(item.kind, tokens.shape[0]),)))
        return result

    def preprocess(self, frames: Sequence[np.ndarray], kind: str = "image", fps: float | None = None) -> VisualInput:
        if self.processor is None:
            raise ValueError("processor: the LLaVA-NeXT backbone needs its image processor (any-resolution tiling)")
        out = self.processor(images=list(frames), return_tensors="pt")
        sizes = [tuple(int(x) for x in s) for s in np.asarray(out["image_sizes"]).reshape(-1, 2)]
        return VisualInput(out["pixel_values"], kind, image_sizes=tuple(sizes))
