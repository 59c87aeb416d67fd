"""Images and videos as a backbone reads them, and where their tokens sit in a row.

- :class:`VisualInput`: one image, or one video (several frames), in a backbone's own pixel format
  (what its transformers image processor gives);
- :class:`Segment`: a run of tokens in a row: text, or one image's / video's tokens with the patch
  grid that multimodal rotary embeddings (Qwen2-VL's M-RoPE) derive positions from;
- :class:`VisualTokens`: one item's LLM input embeddings and the segments they form.

Pixel formats by backbone (``pixel_values``):

- LLaVA: (F, 3, S, S), one row per frame (F = 1 for an image);
- LLaVA-NeXT: (F, P, 3, S, S): every frame's any-resolution tiles (the base view first, padded
  to P tiles), with ``image_sizes`` the (height, width) of each frame before tiling;
- Qwen2-VL / Qwen2.5-VL: (patches, channels x temporal patch x patch x patch) flattened patches,
  with ``grid_thw`` the (t, h, w) patch grid (a video's t counts pairs of frames).
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

KINDS = ("image", "video")


@dataclasses.dataclass(eq=False)
class VisualInput:
    """One image or one video in a backbone's pixel format (see the module docstring)."""

    pixel_values: torch.Tensor
    kind: str = "image"
    image_sizes: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT: (height, width) of each frame
    grid_thw: tuple[int, int, int] | None = None  # Qwen2-VL: the vision tower's patch grid
    second_per_grid_t: float = 1.0  # Qwen2.5-VL video: seconds between temporal patches (time positions)
    _digest: bytes | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values: expected a torch.Tensor, got {type(self.pixel_values).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.grid_thw is not None:
            self.grid_thw = tuple(int(x) for x in self.grid_thw)
            if len(self.grid_thw) != 3 or min(self.grid_thw) < 1:
                raise ValueError(f"grid_thw: expected three positive ints (t, h, w), got {self.grid_thw}")
        if self.image_sizes is not None:
            self.image_sizes = tuple((int(h), int(w)) for h, w in self.image_sizes)

    def to(self, device: torch.device | str) -> VisualInput:
        """On ``device``; the content digest is taken first (where the pixels are, e.g. still on the host),
        so a demonstration bank never copies GPU pixels back to hash them (a host sync per step)."""
        return dataclasses.replace(self, pixel_values=self.pixel_values.to(device), _digest=self.digest())

    def digest(self) -> bytes:
        """A content digest (computed once): the pixels' bytes and every field that changes what the backbone reads."""
        if self._digest is None:
            self._digest = self._compute_digest()
        return self._digest

    def _compute_digest(self) -> bytes:
        pixels = self.pixel_values.detach()
        if pixels.dtype == torch.bfloat16:
            pixels = pixels.float()
        h = hashlib.sha256()
        h.update(f"{self.kind};{tuple(pixels.shape)};{pixels.dtype};{self.image_sizes};{self.grid_thw};".encode())
        h.update(f"{self.second_per_grid_t!r};".encode())
        h.update(pixels.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.digest()


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of ``length`` tokens of a row: ``kind`` "text", "image" or "video".

    For backbones with multimodal rotary embeddings an image or video segment carries its vision
    tower's patch grid ``grid_thw`` (and a video's ``second_per_grid_t``): its tokens' 3-D positions
    follow from them, not from their count.
    """

    kind: str
    length: int
    grid_thw: tuple[int, int, int] | None = None
    second_per_grid_t: float = 1.0


def text_segment(length: int) -> Segment:
    return Segment("text", int(length))


@dataclasses.dataclass
class VisualTokens:
    """One image's or video's LLM input embeddings (n, hidden) and the segments they form (lengths sum to n)."""

    embeds: torch.Tensor
    segments: tuple[Segment, ...]

    def __post_init__(self):
        total = sum(s.length for s in self.segments)
        if total != self.embeds.shape[0]:
            raise ValueError(f"segments: cover {total} tokens, the embeddings hold {self.embeds.shape[0]}")
