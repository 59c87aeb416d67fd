"""Image processors for backbones built from a config (random weights, no checkpoint folder).

A checkpoint brings its own processor (``AutoImageProcessor.from_pretrained``). A model built from
a config has none, so this builds transformers' own processor class with settings that match the
config: LLaVA-NeXT's tiles of the vision tower's input size and the config's grid pinpoints;
Qwen2-VL's patch, merge and temporal patch sizes, images scaled to at most ``image_size`` squared
pixels. No download: the classes are constructed from arguments.
"""

from __future__ import annotations

import transformers

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _processor_class(name: str):
    # transformers >= 5.20 names the Pillow implementation "<Name>Pil" and warns when the plain name
    # falls back to it without torchvision; older versions have only the plain name.
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def llava_next_processor(config):
    """``LlavaNextImageProcessor`` for a LLaVA-NeXT config: tiles of the vision tower's size, its grid pinpoints."""
    size = config.vision_config.image_size
    return _processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def qwen2_vl_processor(config, image_size: int):
    """``Qwen2VLImageProcessor`` for a Qwen2-VL / Qwen2.5-VL config; images scaled to at most ``image_size``**2 pixels."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    return _processor_class("Qwen2VLImageProcessor")(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        min_pixels=factor * factor,
        max_pixels=max(image_size * image_size, factor * factor),
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def default_processor(model, image_size: int | None = None):
    """The processor for a model built from a config (None for LLaVA 1.5: its backbone resizes itself)."""
    name = type(model).__name__
    if name.startswith("LlavaNext"):
        return llava_next_processor(model.config)
    if name.startswith("Qwen2"):
        if image_size is None:
            raise ValueError("image_size: needed to build a Qwen2-VL image processor (the largest image side in pixels)")
        return qwen2_vl_processor(model.config, image_size)
    return None
