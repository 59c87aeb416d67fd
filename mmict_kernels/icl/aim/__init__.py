"""AIM: demonstrations aggregated into fused virtual tokens by a frozen multimodal LLM.

- ``model.py``: :class:`AIMModel` (frozen backbone + trainable projection; the demonstrations' fused
  tokens are a shared prefix through ``modules.prefix_cache``) and :class:`AIMBatch`;
- ``backbones/``: the frozen backbones it aggregates with (LLaVA, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL, the
  project's MMICT model) and :func:`backbone_for`, which picks one for a model;
- ``visual.py``: :class:`VisualInput` (an image or video in a backbone's pixel format) and the row segments;
- ``bank.py``: :class:`DemonstrationBank`, each demonstration's frozen aggregation stored once on disk
  (also what the paper's comparison, ``icl.comparison``, gives AIM);
- ``config.py``, ``data.py``, ``run.py``: the end-to-end run behind ``python -m mmict_kernels.aim``.
"""

from .backbones import Backbone, LlavaBackbone, LlavaNextBackbone, MMICTBackbone, Qwen2VLBackbone, backbone_for
from .bank import DemonstrationBank
from .model import IGNORE, AIMBatch, AIMModel
from .visual import VisualInput

__all__ = [
    "IGNORE",
    "AIMBatch",
    "AIMModel",
    "Backbone",
    "DemonstrationBank",
    "LlavaBackbone",
    "LlavaNextBackbone",
    "MMICTBackbone",
    "Qwen2VLBackbone",
    "VisualInput",
    "backbone_for",
]
