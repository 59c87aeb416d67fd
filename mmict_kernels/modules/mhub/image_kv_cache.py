"""Image K/V cache: every cross-attention layer's keys and values, computed once per image set.

At BLIP-2's default shape the image K/V projections are the largest cost of a Q-Former pass (docs/DESIGN.md:
~6.7 of ~12.6 GFLOP per image). They depend on the image alone, so one :class:`ImageKVCache` serves
any number of later passes: other text, other objectives (ITC / ITM / ITG), or a demonstration
image shared by many queries. The cache keeps the autograd graph: gradients of every pass that
uses it flow back to the K/V weights and (when they require grad) to the image embeddings.

Two layouts, both read directly by :func:`mmict_kernels.ops.hub_cross_attention`:
- dense: K/V (B, Li, H, D), optional ``seqlens_k`` (B,) when samples have padding (valid tokens first);
- packed: K/V (total_tokens, H, D) with ``cu_seqlens_k`` (B + 1,): variable frame counts cost no padding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ... import backends
from ...ops import checks as C


@dataclasses.dataclass
class ImageKVCache:
    """Cross-attention K/V of every cross-attention layer of one FusedMHub for one batch of images.

    Attributes:
        keys, values: one tensor per cross-attention layer, dense (B, Li, H, D) or packed (total, H, D).
        layer_ids: the Q-Former layer index of each entry (layers 0, f, 2f, ... for frequency f).
        cu_seqlens_k: int32 (B + 1,) offsets for the packed layout, else None.
        seqlens_k: int32 (B,) valid tokens per sample for the dense layout with padding, else None.
        batch_size: B, the number of image sets (samples).
    """

    keys: tuple
    values: tuple
    layer_ids: tuple
    cu_seqlens_k: torch.Tensor | None
    seqlens_k: torch.Tensor | None
    batch_size: int

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_k is not None

    def kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of Q-Former layer ``layer_idx``."""
        try:
            i = self.layer_ids.index(layer_idx)
        except ValueError:
            raise ValueError(
                f"image_kv: the cache holds layers {self.layer_ids}, not cross-attention layer {layer_idx}"
            ) from None
        return self.keys[i], self.values[i]

    def lengths(self) -> torch.Tensor:
        """int64 (B,) valid image tokens per sample."""
        if self.cu_seqlens_k is not None:
            return (self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]).long()
        if self.seqlens_k is not None:
            return self.seqlens_k.long()
        k = self.keys[0] if self.keys else None
        n = k.shape[1] if k is not None else 0
        return torch.full((self.batch_size,), n, dtype=torch.long, device=self.cu_or_key_device())

    def cu_or_key_device(self) -> torch.device:
        if self.keys:
            return self.keys[0].device
        return self.cu_seqlens_k.device if self.cu_seqlens_k is not None else torch.device("cpu")

    def select(self, index, total_tokens: int | None = None) -> ImageKVCache:
        """A cache whose row ``r`` is this cache's row ``index[r]`` (rows may repeat).

        Use it when many rows share an image, e.g. one demonstration image seen by several queries:
        the projections are not recomputed, only the K/V rows are gathered (differentiably).
        ``total_tokens``: for a packed cache, the selected rows' token count if the caller knows it
        (e.g. from host-side lengths); otherwise it is read from the device (one host sync).
        """
        device = self.cu_or_key_device()
        index = torch.as_tensor(index, dtype=torch.long, device=device)
        if index.dim() != 1:
            raise ValueError(f"index: expected a 1-D tensor of sample ids, got shape {tuple(index.shape)}")
        if C.value_checks_enabled(index):
            C.check_range("index", index, 0, self.batch_size - 1, "sample ids")
        if self._is_identity(index):
            return self  # every row its own image, in order: nothing to gather (and nothing to scatter back)
        # index_select, not advanced indexing: its backward is index_add, not an accumulating index_put.
        if not self.packed:
            seqlens = None if self.seqlens_k is None else self.seqlens_k.index_select(0, index)
            return ImageKVCache(
                tuple(k.index_select(0, index) for k in self.keys),
                tuple(v.index_select(0, index) for v in self.values),
                self.layer_ids,
                None,
                seqlens,
                index.numel(),
            )
        lengths = self.lengths()[index]
        starts = self.cu_seqlens_k[:-1].long()[index]
        new_cu = F.pad(torch.cumsum(lengths, 0), (1, 0))
        if total_tokens is None:
            total = int(new_cu[-1])  # one sync: the packed size
        else:
            total = int(total_tokens)
            if C.value_checks_enabled(new_cu):
                C.expect(new_cu[-1] == total, f"total_tokens: expected the selected rows' token count, got {total}")
        offset_in_row = torch.arange(total, device=device) - torch.repeat_interleave(new_cu[:-1], lengths, output_size=total)
        token = torch.repeat_interleave(starts, lengths, output_size=total) + offset_in_row
        return ImageKVCache(
            tuple(k.index_select(0, token) for k in self.keys),
            tuple(v.index_select(0, token) for v in self.values),
            self.layer_ids,
            new_cu.to(torch.int32),
            None,
            index.numel(),
        )

    def _is_identity(self, index: torch.Tensor) -> bool:
        """Whether ``index`` is 0, 1, ..., B - 1. Only read for CPU tensors: on a GPU (real or simulated by
        the compile-only harness) reading it would wait for the device."""
        if (
            index.device.type != "cpu"
            or backends.on_gpu(index)
            or index.numel() != self.batch_size
            or torch.compiler.is_compiling()
        ):
            return False
        return bool(torch.equal(index, torch.arange(self.batch_size)))

    def detach(self) -> ImageKVCache:
        """The same K/V without autograd history (e.g. frozen images at evaluation)."""
        return dataclasses.replace(self, keys=tuple(k.detach() for k in self.keys), values=tuple(v.detach() for v in self.values))


# ---------------------------------------------------------------------------------------------
# Turning the caller's image tokens into the layout the kernels read
# ---------------------------------------------------------------------------------------------
def _valid_mask(image_mask: torch.Tensor, batch: int, num_tokens: int, device) -> torch.Tensor:
    C.check_tensor("image_mask", image_mask, ndim=2)
    if tuple(image_mask.shape) != (batch, num_tokens):
        raise ValueError(f"image_mask: expected shape {(batch, num_tokens)} (B, image tokens), got {tuple(image_mask.shape)}")
    if image_mask.device != device:
        raise ValueError(f"image_mask: expected device {device} (same as the image embeddings), got {image_mask.device}")
    return image_mask != 0


def arrange_image_tokens(
    image_embeds: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    *,
    num_frames=None,
    cu_seqlens: torch.Tensor | None = None,
    packed: bool | None = None,
    encoder_hidden_size: int,
    device: torch.device | None = None,
):
    """Validate image tokens and lay them out for the kernels.

    Returns ``(tokens, cu_seqlens_k, seqlens_k, batch)``: tokens is dense (B, Li, E) or packed (total, E).

    - ``image_embeds`` (B, Li, E) alone: dense, every token valid.
    - with ``image_mask`` (B, Li) (nonzero = valid, any pattern): packed by default (valid tokens only,
      no projection work on padding); ``packed=False`` (and always under torch.compile, where a
      data-dependent size would break the graph) keeps the dense layout, with a stable permutation
      that moves each sample's valid tokens first (attention ignores key order) and ``seqlens_k``.
    - ``image_embeds`` (total_frames, Lf, E) with ``num_frames`` (B,): the frames of sample b are
      rows ``sum(num_frames[:b]) ...``; packed into one key sequence of ``num_frames[b] * Lf`` tokens.
    - ``image_embeds`` (total, E) with ``cu_seqlens`` (B + 1,): already packed.
    """
    C.check_tensor("image_embeds", image_embeds, ndim=(2, 3), dtypes=C.FLOAT_DTYPES)
    if device is not None and image_embeds.device != device:
        raise ValueError(f"image_embeds: expected device {device} (the FusedMHub's parameters), got {image_embeds.device}")
    if image_embeds.shape[-1] != encoder_hidden_size:
        raise ValueError(
            f"image_embeds: expected last dim encoder_hidden_size = {encoder_hidden_size}, got shape {tuple(image_embeds.shape)}"
        )
    given = [n for n, v in (("image_mask", image_mask), ("num_frames", num_frames), ("cu_seqlens", cu_seqlens)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of image_mask, num_frames, cu_seqlens; got {given}")
    device = image_embeds.device
    compiling = torch.compiler.is_compiling()

    if cu_seqlens is not None:
        if image_embeds.dim() != 2:
            raise ValueError(f"image_embeds: with cu_seqlens expected packed (total, E), got shape {tuple(image_embeds.shape)}")
        C.check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens: expected device {device}, got {cu_seqlens.device}")
        cu = cu_seqlens.to(torch.int32).contiguous()
        if C.value_checks_enabled(cu) and cu.numel() > 0:  # once per encode (device-side asserts on a GPU)
            C.expect(
                (cu[0] == 0) & (cu[-1] == image_embeds.shape[0]),
                f"cu_seqlens: expected cu_seqlens[0] == 0 and cu_seqlens[-1] == image_embeds.shape[0] = {image_embeds.shape[0]}",
            )
            C.expect(cu[1:] >= cu[:-1], "cu_seqlens: expected non-decreasing offsets")
        return image_embeds, cu, None, cu.shape[0] - 1

    if num_frames is not None:
        if image_embeds.dim() != 3:
            raise ValueError(
                "image_embeds: with num_frames expected per-frame tokens (total_frames, tokens_per_frame, E), "
                f"got {tuple(image_embeds.shape)}"
            )
        frames = torch.as_tensor(num_frames, device=device)
        if frames.dim() != 1 or frames.is_floating_point():
            raise ValueError(f"num_frames: expected a 1-D integer sequence (frames per sample), got {num_frames!r}")
        total_frames, per_frame, _ = image_embeds.shape
        if C.value_checks_enabled(frames):
            C.check_range("num_frames", frames, 0, total_frames, "frame counts")
            C.expect(
                frames.sum() == total_frames,
                f"num_frames: expected frame counts summing to image_embeds.shape[0] = {total_frames}",
            )
        cu = F.pad(torch.cumsum(frames.long() * per_frame, 0), (1, 0)).to(torch.int32)
        return image_embeds.reshape(total_frames * per_frame, image_embeds.shape[-1]), cu, None, frames.shape[0]

    if image_embeds.dim() != 3:
        raise ValueError(f"image_embeds: expected (B, image tokens, E), got shape {tuple(image_embeds.shape)}")
    batch, num_tokens, width = image_embeds.shape
    if image_mask is None:
        return image_embeds, None, None, batch
    valid = _valid_mask(image_mask, batch, num_tokens, device)
    lengths = valid.sum(dim=1)
    if packed is None:
        packed = not compiling
    if packed:
        flat = valid.reshape(-1).nonzero().squeeze(1)  # sample-major, token order kept
        cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        return image_embeds.reshape(batch * num_tokens, width)[flat], cu, None, batch
    # Dense: stable sort of "is padding" puts valid tokens first, in their original order.
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    dense = torch.gather(image_embeds, 1, order[:, :, None].expand(batch, num_tokens, width))
    return dense, None, lengths.to(torch.int32), batch


__all__ = ["ImageKVCache", "arrange_image_tokens"]
