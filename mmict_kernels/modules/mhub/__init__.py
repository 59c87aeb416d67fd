"""M-Hub: the BLIP-2 / InstructBLIP Q-Former on mmict_kernels' fused attention, and how it plugs into models.

- ``hub.py``: :class:`FusedMHub` (construction, ``encode_image``, ``forward``, ``forward_objectives``,
  the layer loop) and :class:`MHubOutput`;
- ``arguments.py``: transformers' call signature per flavor, bound and checked; the attention mask
  turned into the text lengths the kernels read;
- ``objectives.py``: several BLIP-2 stage-1 masks in one pass (ITC and ITG share a query stream);
- ``layers.py``: the parameter tree, named exactly as transformers names it (state dicts load as is);
- ``projections.py``: Q/K/V (cross-attention K/V) weights stored fused, saved and loaded under transformers' keys;
- ``epilogue.py``: bias / dropout / residual / LayerNorm / GELU / QKV glue, fused on GPU, keeping little for backward;
- ``absorbed.py``: cross-attention with the image K/V projections folded into the queries (CPU, few queries);
- ``text_rows.py``: padded text slots skipped on a CPU (the valid rows gathered), zeroed elsewhere;
- ``image_kv_cache.py``: :class:`ImageKVCache`, every cross-attention layer's image K/V computed once;
- ``lavis.py``: LAVIS / MMICT checkpoints -> FusedMHub; ``swap_in.py``: FusedMHub into BLIP-2 / InstructBLIP models.
"""

from .arguments import FLAVORS
from .hub import FusedMHub, MHubOutput
from .image_kv_cache import ImageKVCache

# The swap-in helpers stay in swap_in.py (mmict_kernels.modules re-exports them): they patch models, not the hub.
__all__ = ["FLAVORS", "FusedMHub", "MHubOutput", "ImageKVCache"]
