"""Demo-prefix KV cache: demonstrations shared by many rows, run once through a frozen decoder LM.

- ``cache.py``: :class:`DemoPrefixCache` (every layer's K/V over G demonstration prefixes) and
  :func:`forward_with_prefix` (the rows' own tokens on top of their group's prefix; training);
- ``generate.py``: :func:`generate_with_prefix` (greedy / sampled decoding on the same cache);
- ``attention.py``: the attention function transformers calls while a cache is active
  (registered as :data:`ATTENTION_NAME`), the per-call state, and :class:`RowKVCache` (decode K/V);
- ``rows.py``: what both entry points need about the rows (padding, positions, embeddings, the call).

Dependencies run one way: ``attention`` <- ``rows`` <- ``cache`` <- ``generate``, so no module
imports one that imports it back.
"""

from .attention import ATTENTION_NAME, RowKVCache
from .cache import DemoPrefixCache, forward_with_prefix
from .generate import generate_with_prefix
from .rows import rows_layout

__all__ = ["ATTENTION_NAME", "DemoPrefixCache", "RowKVCache", "forward_with_prefix", "generate_with_prefix", "rows_layout"]
