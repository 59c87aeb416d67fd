"""nn.Modules built on mmict_kernels' ops.

- :class:`FusedMHub` (``fused_mhub.py``): the BLIP-2 / InstructBLIP Q-Former (M-Hub) on fused attention,
  with an image K/V cache (:class:`ImageKVCache`, ``image_kv_cache.py``) and multi-objective passes.
- :func:`apply_mmict_kernels` (``swap_in.py``): patch transformers' BLIP-2 / InstructBLIP models in place.

Importing this package pulls in transformers; ``import mmict_kernels.ops`` does not.
"""

from .fused_mhub import FusedMHub, MHubOutput
from .image_kv_cache import ImageKVCache
from .swap_in import apply_mmict_kernels, apply_mmict_kernels_to_blip2, apply_mmict_kernels_to_instructblip

__all__ = [
    "FusedMHub",
    "MHubOutput",
    "ImageKVCache",
    "apply_mmict_kernels",
    "apply_mmict_kernels_to_blip2",
    "apply_mmict_kernels_to_instructblip",
]
