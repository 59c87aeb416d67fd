"""nn.Modules built on mmict_kernels' ops.

- :class:`FusedMHub` (``fused_mhub.py``, blocks in ``mhub_layers.py``, epilogues in ``epilogue.py``): the
  BLIP-2 / InstructBLIP Q-Former (M-Hub) on fused attention, with an image K/V cache
  (:class:`ImageKVCache`, ``image_kv_cache.py``), multi-objective passes, and LAVIS loading (``lavis.py``).
- :func:`apply_mmict_kernels` (``swap_in.py``): patch transformers' BLIP-2 / InstructBLIP models in place.
- :class:`DemoPrefixCache`, :func:`forward_with_prefix`, :func:`generate_with_prefix` (``prefix_cache*.py``):
  a frozen decoder LM's K/V over shared demonstrations, computed once per group and attended by
  every row through ``ops.prefix_attention`` (training and generation).

Typical use::

    hub = FusedMHub.from_hf(instructblip.qformer, query_tokens=instructblip.query_tokens)  # or from_lavis(path)
    out = hub(input_ids, attention_mask, encoder_hidden_states=image_embeds)  # same call as transformers
    cache = hub.encode_image(frames, num_frames=[8, 3, 5])        # image K/V once, packed video frames
    a = hub(input_ids=ids_a, attention_mask=mask_a, image_kv=cache)  # reused, gradients flow to `frames`
    itc, itm, itg = hub.forward_objectives(input_ids=ids, attention_mask=mask, image_kv=cache)

    apply_mmict_kernels(blip2_model)  # model.qformer is now a FusedMHub; outputs and generation unchanged

Importing this package pulls in transformers; ``import mmict_kernels.ops`` does not.
"""

from .fused_mhub import FusedMHub, MHubOutput
from .image_kv_cache import ImageKVCache
from .prefix_cache import DemoPrefixCache, forward_with_prefix, generate_with_prefix
from .prefix_cache_attention import RowKVCache
from .swap_in import apply_mmict_kernels, apply_mmict_kernels_to_blip2, apply_mmict_kernels_to_instructblip

__all__ = [
    "FusedMHub",
    "MHubOutput",
    "ImageKVCache",
    "apply_mmict_kernels",
    "apply_mmict_kernels_to_blip2",
    "apply_mmict_kernels_to_instructblip",
    "DemoPrefixCache",
    "RowKVCache",
    "forward_with_prefix",
    "generate_with_prefix",
]
