"""Qwen2-VL and Qwen2.5-VL as AIM backbones: images and videos, 3-D rotary positions (M-RoPE).

An image or video reaches the LLM as ``<|vision_start|> [its tokens] <|vision_end|>``, as in the
models' own prompts. Its tokens come from the model's ``get_image_features`` /
``get_video_features`` (patches merged 2 x 2); a video's temporal patches pair its frames.

Positions: Qwen2-VL gives each token three rotary positions (time, height, width). Text tokens
have three equal ones, counting on; an image's tokens take the row's next position plus their
grid coordinates, and the text after it continues past them. A row's positions are computed by
the model's own ``get_rope_index`` on a placeholder sequence with the same layout (so they are
exactly what transformers gives that layout in a plain prompt, in every version), on the host,
once per layout. AIM's fused demonstration tokens are text-like, so a query after a prefix of Lp
fused tokens holds its own positions shifted by Lp: the prefix cache adds that shift.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..visual import Segment, VisualInput, VisualTokens, text_segment
from .base import Backbone, as_items, pooled_features

# Distinct layouts whose positions are remembered (a training run meets the same few again and again).
_POSITION_MEMO = 4096


class Qwen2VLBackbone(Backbone):
    """``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``: a list of VisualInput
    with flattened patches (n, dim) and their ``grid_thw``; ``kind`` "image" or "video"."""

    def __init__(self, model: nn.Module, processor=None):
        super().__init__()
        config = getattr(model, "config", None)
        missing = [
            a
            for a in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if not hasattr(config, a)
        ]
        if missing or not hasattr(model, "get_video_features"):
            raise TypeError(f"model: expected a transformers Qwen2-VL / Qwen2.5-VL model, got {type(model).__name__}")
        self.lm = model
        self.processor = processor
        self.family = "qwen2_5_vl" if "2_5" in type(model).__name__ else "qwen2_vl"
        self.merge = config.vision_config.spatial_merge_size
        self.requires_grad_(False).eval()
        self._rope_index = getattr(model, "get_rope_index", None) or model.model.get_rope_index
        self._rope_params = set(inspect.signature(self._rope_index).parameters)
        self._positions: collections.OrderedDict[tuple[Segment, ...], np.ndarray] = collections.OrderedDict()

    # ------------------------------------------------------------------ visual tokens
    def visual_tokens(self, images, text_ids=None) -> list[VisualTokens]:
        items = as_items(images, self.family)
        for i, item in enumerate(items):
            if item.grid_thw is None or item.pixel_values.dim() != 2:
                raise ValueError(
                    f"images[{i}]: expected flattened patches (n, dim) with their grid_thw, "
                    f"got shape {tuple(item.pixel_values.shape)} and grid_thw {item.grid_thw}"
                )
            t, h, w = item.grid_thw
            if item.pixel_values.shape[0] != t * h * w:
                raise ValueError(
                    f"images[{i}]: grid_thw {item.grid_thw} needs {t * h * w} patches, got {item.pixel_values.shape[0]}"
                )
        tokens: list[torch.Tensor | None] = [None] * len(items)
        for kind, encode in (("image", self.lm.get_image_features), ("video", self.lm.get_video_features)):
            idx = [i for i, item in enumerate(items) if item.kind == kind]
            if not idx:
                continue
            pixels = torch.cat([items[i].pixel_values for i in idx])
            grids = torch.tensor([items[i].grid_thw for i in idx], dtype=torch.long, device=pixels.device)
            feats = pooled_features(encode(pixels.to(self.dtype), grids))
            if isinstance(feats, torch.Tensor):  # older versions: one tensor for all items
                feats = torch.split(feats, [self._num_tokens(items[i]) for i in idx])
            for i, f in zip(idx, feats):
                tokens[i] = f.to(self.dtype)
        device = items[0].pixel_values.device if items else None
        wrappers = self.embed(
            torch.tensor([self.lm.config.vision_start_token_id, self.lm.config.vision_end_token_id], device=device)
        )
        out = []
        for item, t in zip(items, tokens):
            segment = Segment(item.kind, t.shape[0], item.grid_thw, float(item.second_per_grid_t))
            out.append(VisualTokens(torch.cat([wrappers[:1], t, wrappers[1:]]), (text_segment(1), segment, text_segment(1))))
        return out

    def _num_tokens(self, item: VisualInput) -> int:
        t, h, w = item.grid_thw
        return t * h * w // self.merge**2

    # ------------------------------------------------------------------ positions
    def row_positions(self, segments: tuple[Segment, ...]) -> np.ndarray:
        """(3, n) int64 positions of a row laid out as ``segments``, counted from 0 (see the module docstring)."""
        segments = tuple(segments)
        found = self._positions.get(segments)
        if found is None:
            found = self._positions_by_the_model(segments)
            self._positions[segments] = found
            if len(self._positions) > _POSITION_MEMO:
                self._positions.popitem(last=False)
        return found

    def _positions_by_the_model(self, segments: tuple[Segment, ...]) -> np.ndarray:
        cfg = self.lm.config
        special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
        plain = next(i for i in range(len(special) + 1) if i not in special)  # any ordinary text token
        ids, types, grids, second_per_grid = [], [], {"image": [], "video": []}, []
        for s in segments:
            if s.kind == "text":
                ids += [plain] * s.length
                types += [0] * s.length
                continue
            if s.grid_thw is None or s.length != s.grid_thw[0] * s.grid_thw[1] * s.grid_thw[2] // self.merge**2:
                raise ValueError(f"segments: a {s.kind} segment of {s.length} tokens does not match its grid {s.grid_thw}")
            if not ids:
                raise ValueError("segments: an image or video must follow its <|vision_start|> token")
            ids[-1] = cfg.vision_start_token_id  # older versions find vision blocks by the token before them
            ids += [cfg.image_token_id if s.kind == "image" else cfg.video_token_id] * s.length
            types += [1 if s.kind == "image" else 2] * s.length
            grids[s.kind].append(list(s.grid_thw))
            if s.kind == "video":
                second_per_grid.append(s.second_per_grid_t)
        # Host tensors only: the model's rope index loops in Python; nothing here touches the GPU.
        args = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "mm_token_type_ids": torch.tensor([types], dtype=torch.int32),
            "image_grid_thw": torch.tensor(grids["image"], dtype=torch.long) if grids["image"] else None,
            "video_grid_thw": torch.tensor(grids["video"], dtype=torch.long) if grids["video"] else None,
            "second_per_grid_ts": torch.tensor(second_per_grid, dtype=torch.float32) if second_per_grid else None,
            "attention_mask": None,
        }
        if not grids["image"] and not grids["video"]:  # text only: positions count on (the model refuses this layout)
            return np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids))).copy()
        accepted = {k: v for k, v in args.items() if k in self._rope_params}
        positions, _ = self._rope_index(**accepted)
        return positions[:, 0].to(torch.int64).numpy().copy()

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, frames: Sequence[np.ndarray], kind: str = "image", fps: float | None = None) -> VisualInput:
        """One image (``kind`` "image", one frame) or a video's frames -> patches and grid (see :func:`video_patches`).

        ``fps``: the frames' sampling rate; a video's ``second_per_grid_t`` is temporal patch / fps
        (Qwen2.5-VL's time positions). Default 2 frames per second (Qwen's own default sampling).
        """
        if self.processor is None:
            raise ValueError(f"processor: the {self.family} backbone needs its image processor")
        if kind == "image":
            if len(frames) != 1:
                raise ValueError(f"frames: an image is one frame, got {len(frames)} (use kind='video')")
            out = self.processor(images=[frames[0]], return_tensors="pt")
            return VisualInput(out["pixel_values"], "image", grid_thw=tuple(int(x) for x in out["image_grid_thw"][0]))
        pixels, grid = video_patches(self.processor, frames)
        temporal = self.lm.config.vision_config.temporal_patch_size
        return VisualInput(pixels, "video", grid_thw=grid, second_per_grid_t=temporal / (fps or 2.0))


def video_patches(processor, frames: Sequence[np.ndarray]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A video's frames as Qwen2-VL patches: ((t * h * w), C * T * p * p) and the grid (t, h, w).

    The image processor resizes and normalises each frame and flattens it into merge-ordered
    patches; with a temporal patch of 1 a frame's patch is [channel][row][column]. A video patch
    stacks T consecutive frames' patches at the same place as [channel][frame][row][column] (the
    layout of the model's 3-D patch embedding); an odd tail is padded by repeating the last frame,
    as transformers' video processor does. (An image is the same with its frame repeated T times:
    tests check that this gives the processor's own image patches.)
    """
    frames = list(frames)
    if not frames:
        raise ValueError("frames: a video needs at least one frame")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"frames: a video's frames must share one size, got {sorted({f.shape for f in frames})}")
    temporal = processor.temporal_patch_size
    frames += [frames[-1]] * (-len(frames) % temporal)
    single = _single_frame_processor(processor)
    out = single(images=frames, return_tensors="pt")
    per_frame, grid = out["pixel_values"], out["image_grid_thw"]
    _, h, w = (int(x) for x in grid[0])
    channels = per_frame.shape[1] // (processor.patch_size**2)
    p = processor.patch_size
    x = per_frame.view(len(frames) // temporal, temporal, h * w, channels, p, p)  # (t, T, n, C, p, p)
    x = x.permute(0, 2, 3, 1, 4, 5).reshape((len(frames) // temporal) * h * w, channels * temporal * p * p)
    return x.contiguous(), (len(frames) // temporal, h, w)


def _single_frame_processor(processor):
    """The same image processor with a temporal patch of 1 (each frame flattened on its own)."""
    import copy

    single = copy.deepcopy(processor)
    single.temporal_patch_size = 1
    return single
