"""The layer epilogues of FusedMHub (what follows each matmul), behind the module's backend choice.

Two shapes of epilogue occur in every BERT layer:
- output blocks: ``LayerNorm(dropout(x @ W^T + b) + residual)`` (after attention and after the FFN);
- the FFN's first half: ``act(x @ W^T + b)``.

With ``backend="torch"`` (and whenever no fused kernel can run the inputs) they are plain
``F.linear`` + ``F.dropout`` + ``F.layer_norm``, bit-for-bit what transformers computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_dropout_residual_layernorm(block, x: torch.Tensor, residual: torch.Tensor, backend: str) -> torch.Tensor:
    """``block.LayerNorm(block.dropout(block.dense(x)) + residual)`` for a :class:`QFormerOutputBlock`."""
    h = F.linear(x, block.dense.weight, block.dense.bias)
    h = block.dropout(h)
    return F.layer_norm(h + residual, block.LayerNorm.normalized_shape, block.LayerNorm.weight, block.LayerNorm.bias, block.LayerNorm.eps)


def dense_activation(block, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``act(dense(x))`` for a :class:`QFormerIntermediate`."""
    return block.intermediate_act_fn(F.linear(x, block.dense.weight, block.dense.bias))
