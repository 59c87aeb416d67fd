"""The layer epilogues of FusedMHub (what surrounds each matmul), behind the module's backend choice.

Three shapes of glue occur in every BERT layer:
- output blocks: ``LayerNorm(dropout(x @ W^T + b) + residual)`` (after attention and after the FFN);
- the FFN's first half: ``act(x @ W^T + b)``;
- the Q/K/V projections (and the image K/V of cross-attention): three (two) matmuls on one input.

Which path runs:
- ``backend="torch"``, and ``"auto"`` on CPU: plain ``F.linear`` + ``nn.Dropout`` + ``F.layer_norm``,
  bit-for-bit what transformers computes (and its dropout RNG use).
- ``backend="triton"``, and ``"auto"``/``"cuda"`` on GPU: the fused ops of
  :mod:`mmict_kernels.ops.fused_epilogue` (bias + dropout + residual + LayerNorm in one kernel,
  bias + GELU in one kernel, one GEMM for Q/K/V). Their dropout keep-mask comes from a seed drawn
  from torch's generator, so ``torch.manual_seed`` reproduces a training step; it is not the same
  random stream as ``nn.Dropout`` (the rate and the scaling are). The fused GELU is the exact erf
  GELU, so it only replaces ``hidden_act="gelu"``; other activations stay unfused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import backends
from ...ops import fused_epilogue


def use_fused(backend: str, x: torch.Tensor) -> bool:
    """Whether the fused epilogue kernels serve this call (see the module docstring)."""
    if backend == "triton":
        return True
    return backend in ("auto", "cuda") and backends.on_gpu(x)


def _autocast(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def _epilogue_backend(backend: str) -> str:
    # The epilogues have Triton kernels and the reference; "cuda" and "auto" mean "the fastest".
    return "triton" if backend == "triton" else "auto"


def dense_dropout_residual_layernorm(block, x: torch.Tensor, residual: torch.Tensor, backend: str) -> torch.Tensor:
    """``block.LayerNorm(block.dropout(block.dense(x)) + residual)`` for a :class:`QFormerOutputBlock`."""
    ln = block.LayerNorm
    if use_fused(backend, x):
        h = F.linear(x, block.dense.weight)  # the bias joins the fused epilogue
        p = block.dropout.p if block.training else 0.0
        # Under autocast the matmul gives low precision while the residual stream stays in the
        # parameters' dtype; LayerNorm runs in that dtype (as autocast runs layer_norm in float32).
        dtype = ln.weight.dtype
        return fused_epilogue.bias_dropout_add_layernorm(
            h.to(dtype), block.dense.bias, residual.to(dtype), ln.weight, ln.bias, ln.eps, p, backend=_epilogue_backend(backend)
        )
    h = block.dropout(F.linear(x, block.dense.weight, block.dense.bias))
    return F.layer_norm(h + residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def dense_activation(block, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``act(dense(x))`` for a :class:`QFormerIntermediate`."""
    if block.act_name == "gelu" and use_fused(backend, x):
        h = F.linear(x, block.dense.weight)
        # autocast: the bias joins in the matmul's dtype, as F.linear(x, W, b) would add it
        return fused_epilogue.bias_gelu(h, block.dense.bias.to(h.dtype), backend=_epilogue_backend(backend))
    return block.intermediate_act_fn(F.linear(x, block.dense.weight, block.dense.bias))


def _heads(y: torch.Tensor, num_heads: int) -> torch.Tensor:
    # (..., H*D) -> (..., H, D): the layout the attention ops read (head dim contiguous; rows may be strided).
    return y.view(*y.shape[:-1], num_heads, y.shape[-1] // num_heads)


def qkv_projection(proj, x: torch.Tensor, num_heads: int, backend: str):
    """(q, k, v), each (..., H, D), of a self-attention block's ``query``/``key``/``value`` linears."""
    # The fused projection's autograd keeps the un-cast weight: not under autocast.
    if use_fused(backend, x) and not _autocast(x):
        q, k, v = fused_epilogue.fused_qkv_linear(
            x, proj.query.weight, proj.query.bias, proj.key.weight, proj.key.bias, proj.value.weight, proj.value.bias
        )
    else:
        q, k, v = (F.linear(x, lin.weight, lin.bias) for lin in (proj.query, proj.key, proj.value))
    return _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)


def kv_projection(proj, x: torch.Tensor, num_heads: int, backend: str):
    """(k, v), each (..., H, D), of a cross-attention block applied to image tokens."""
    if use_fused(backend, x) and not _autocast(x):
        k, v = fused_epilogue.fused_kv_linear(x, proj.key.weight, proj.key.bias, proj.value.weight, proj.value.bias)
    else:
        k, v = (F.linear(x, lin.weight, lin.bias) for lin in (proj.key, proj.value))
    return _heads(k, num_heads), _heads(v, num_heads)


def query_projection(proj, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q (..., H, D) of a cross-attention block (the keys come from the image K/V cache)."""
    return _heads(F.linear(x, proj.query.weight, proj.query.bias), num_heads)
