"""Frozen multimodal backbones AIM aggregates demonstrations with, and :func:`backbone_for` to pick one.

- ``base.py``: :class:`Backbone`, the interface (visual tokens, row positions, hidden states, preprocessing);
- ``llava.py``: :class:`LlavaBackbone` (LLaVA 1.5 class), :class:`LlavaNextBackbone` (any-resolution tiling);
- ``qwen2_vl.py``: :class:`Qwen2VLBackbone` (Qwen2-VL and Qwen2.5-VL: images, videos, M-RoPE positions);
- ``mmict.py``: :class:`MMICTBackbone` (this project's MMICT model: M-Hub + FC + decoder-only LLM);
- ``processors.py``: image processors for models built from a config (no checkpoint).
"""

from __future__ import annotations

from torch import nn

from .base import Backbone
from .llava import LlavaBackbone, LlavaNextBackbone
from .mmict import MMICTBackbone
from .processors import default_processor
from .qwen2_vl import Qwen2VLBackbone

# transformers class name -> backbone, most specific first (none of these subclasses another).
_TRANSFORMERS_BACKBONES = (
    ("Qwen2_5_VLForConditionalGeneration", Qwen2VLBackbone),
    ("Qwen2VLForConditionalGeneration", Qwen2VLBackbone),
    ("LlavaNextForConditionalGeneration", LlavaNextBackbone),
    ("LlavaForConditionalGeneration", LlavaBackbone),
)


def backbone_for(model: nn.Module, processor=None) -> Backbone:
    """The AIM backbone for ``model``.

    Args:
        model: a transformers ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``, or this
            project's ``MMICTModel`` (a :class:`Backbone` is returned as it is).
        processor: the model's image processor (a checkpoint's own); default: none for LLaVA 1.5
            and MMICT (they need none), and for the others whatever ``preprocess`` is later given
            (see :func:`default_processor` for models built from a config).

    Raises:
        TypeError: for any other model, naming the supported ones.
    """
    if isinstance(model, Backbone):
        return model
    import transformers

    for name, cls in _TRANSFORMERS_BACKBONES:
        model_cls = getattr(transformers, name, None)
        if model_cls is not None and isinstance(model, model_cls):
            return cls(model, processor=processor)
    from ...model import MMICTModel

    if isinstance(model, MMICTModel):
        return MMICTBackbone(model)
    supported = ", ".join([name for name, _ in _TRANSFORMERS_BACKBONES] + ["mmict_kernels MMICTModel"])
    raise TypeError(f"model: AIM has no backbone for {type(model).__module__}.{type(model).__name__}; supported: {supported}")


__all__ = [
    "Backbone",
    "LlavaBackbone",
    "LlavaNextBackbone",
    "MMICTBackbone",
    "Qwen2VLBackbone",
    "backbone_for",
    "default_processor",
]
