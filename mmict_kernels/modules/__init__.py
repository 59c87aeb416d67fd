"""nn.Modules built on mmict_kernels' ops.

- ``mhub/``: :class:`FusedMHub`, the BLIP-2 / InstructBLIP Q-Former (M-Hub) on fused attention, with an
  image K/V cache (:class:`ImageKVCache`), multi-objective passes, LAVIS loading, and
  :func:`apply_mmict_kernels` to patch transformers' BLIP-2 / InstructBLIP models in place.
- ``prefix_cache/``: :class:`DemoPrefixCache`, :func:`forward_with_prefix`, :func:`generate_with_prefix`:
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

from .mhub import FusedMHub, ImageKVCache, MHubOutput
from .mhub.swap_in import apply_mmict_kernels, apply_mmict_kernels_to_blip2, apply_mmict_kernels_to_instructblip
from .prefix_cache import DemoPrefixCache, RowKVCache, forward_with_prefix, generate_with_prefix

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
