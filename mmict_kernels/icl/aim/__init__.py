"""AIM: demonstrations aggregated into fused virtual tokens by a frozen multimodal LLM.

- ``model.py``: :class:`AIMModel` (frozen backbone + trainable projection; the demonstrations' fused
  tokens are a shared prefix through ``modules.prefix_cache``) and :class:`AIMBatch`;
- ``backbones.py``: the frozen backbones it aggregates with (:class:`LlavaBackbone`, :class:`MMICTBackbone`);
- ``bank.py``: :class:`DemonstrationBank`, each demonstration's frozen aggregation stored once on disk
  (also what the paper's comparison, ``icl.comparison``, gives AIM);
- ``config.py``, ``data.py``, ``run.py``: the end-to-end run behind ``python -m mmict_kernels.aim``.
"""

from .backbones import Backbone, LlavaBackbone, MMICTBackbone
from .bank import DemonstrationBank
from .model import IGNORE, AIMBatch, AIMModel

__all__ = ["IGNORE", "AIMBatch", "AIMModel", "Backbone", "LlavaBackbone", "MMICTBackbone", "DemonstrationBank"]
