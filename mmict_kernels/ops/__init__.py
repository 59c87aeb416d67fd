"""The attention ops of mmict_kernels; each lives in its own sub-package (reference, triton, cuda).

- :func:`hub_cross_attention`: M-Hub queries -> image / frame tokens (dense or packed varlen).
- :func:`hub_self_attention`: M-Hub [queries ; text] with ITM / ITC / ITG masks computed in-kernel.
- :func:`prefix_attention`: LLM rows -> [shared demonstration prefix ; own tokens], GQA.
- Fused BERT-layer epilogues (``fused_epilogue``): bias + dropout + residual + LayerNorm, bias + GELU.
- :func:`skip_value_checks`: a context that skips the index-range checks of every op.

Rules every op and backend follows:
- ``return_lse=True`` also returns the log-sum-exp of the scaled scores, (B, H, Lq) float32. It is
  a statistic (for merging partial attentions, for tests): it is not differentiated on any
  backend, as in FlashAttention; use ``out`` for anything that needs a gradient.
- A row that sees no key gives ``out = 0`` and ``lse = -inf``, never NaN, and zero gradients.
- Index tensors are checked without stopping a GPU (device-side asserts) and clamped inside the
  kernels, so no input makes a kernel read or write outside its tensors.
"""

from .checks import skip_value_checks
from .fused_epilogue import bias_dropout_add_layernorm, bias_gelu, dropout_keep_mask, fused_kv_linear, fused_qkv_linear
from .hub_cross_attn import hub_cross_attention, hub_cross_attention_reference
from .hub_self_attn import MASK_MODES, canonical_mask, hub_self_attention, hub_self_attention_reference, self_attention_mask
from .prefix_attn import prefix_attention, prefix_attention_mask, prefix_attention_reference

__all__ = [
    "hub_cross_attention",
    "hub_cross_attention_reference",
    "hub_self_attention",
    "hub_self_attention_reference",
    "self_attention_mask",
    "MASK_MODES",
    "canonical_mask",
    "prefix_attention",
    "prefix_attention_reference",
    "prefix_attention_mask",
    "bias_dropout_add_layernorm",
    "bias_gelu",
    "dropout_keep_mask",
    "fused_qkv_linear",
    "fused_kv_linear",
    "skip_value_checks",
]
