"""The layer epilogues of FusedMHub (what surrounds each matmul), behind the module's backend choice.

Four shapes of glue occur in every BERT layer:
- output blocks: ``LayerNorm(dropout(x @ W^T + b) + residual)`` (after attention and after the FFN);
- the FFN: ``output(act(x @ W1^T + b1))``, whose GELU output is the largest activation of a layer;
- the Q/K/V projections (and the image K/V of cross-attention): one matmul against the fused
  ``qkv`` (``kv``) weight (``projections.py``), split into views.

Which path runs, and what it keeps for backward:
- ``backend="triton"``, and ``"auto"``/``"cuda"`` on GPU: the fused ops of
  :mod:`mmict_kernels.ops.fused_epilogue` (bias + dropout + residual + LayerNorm in one kernel, which
  keeps the dense output and regenerates its dropout mask from a Philox seed; bias + GELU, recomputed
  in backward instead of kept). The keep-mask comes from a seed drawn from torch's generator, so
  ``torch.manual_seed`` reproduces a training step; it is not ``nn.Dropout``'s random stream (the
  rate and the scaling are).
- ``backend="torch"``, and ``"auto"`` on CPU: the same arithmetic as transformers (``F.linear``,
  dropout with torch's random numbers, ``F.layer_norm``, ``F.gelu``) through
  ``fused_epilogue.dropout_add_layernorm`` and ``fused_epilogue.bias_gelu_linear``, which keep the
  dense output only (the dropout mask is drawn again from a seed, the LayerNorm statistics and the
  GELU are recomputed in backward).
- under autocast, under ``torch.compile``, and for activations other than ``"gelu"`` (the fused GELU
  is the exact erf GELU): the plain modules, as transformers runs them.
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


def _dropout_p(block) -> float:
    return block.dropout.p if block.training else 0.0


def _add_layernorm(block, h: torch.Tensor, residual: torch.Tensor, backend: str, has_bias: bool) -> torch.Tensor:
    """``block.LayerNorm(block.dropout(h [+ block.dense.bias]) + residual)``; ``h`` is the dense matmul's output."""
    ln = block.LayerNorm
    if use_fused(backend, h):
        # Under autocast the matmul gives low precision while the residual stream stays in the
        # parameters' dtype; LayerNorm runs in that dtype (as autocast runs layer_norm in float32).
        dtype = ln.weight.dtype
        bias = block.dense.bias if not has_bias else torch.zeros_like(block.dense.bias)
        return fused_epilogue.bias_dropout_add_layernorm(
            h.to(dtype),
            bias,
            residual.to(dtype),
            ln.weight,
            ln.bias,
            ln.eps,
            _dropout_p(block),
            backend=_epilogue_backend(backend),
        )
    if not has_bias:
        h = h + block.dense.bias
    if _autocast(h):
        return F.layer_norm(block.dropout(h) + residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    return fused_epilogue.dropout_add_layernorm(h, residual, ln.weight, ln.bias, ln.eps, _dropout_p(block))


def dense_dropout_residual_layernorm(block, x: torch.Tensor, residual: torch.Tensor, backend: str) -> torch.Tensor:
    """``block.LayerNorm(block.dropout(block.dense(x)) + residual)`` for a :class:`QFormerOutputBlock`."""
    if use_fused(backend, x):
        return _add_layernorm(block, F.linear(x, block.dense.weight), residual, backend, has_bias=False)  # bias in the epilogue
    return _add_layernorm(block, F.linear(x, block.dense.weight, block.dense.bias), residual, backend, has_bias=True)


def output_block_split(block, x: torch.Tensor, residual: torch.Tensor, split: int, backend: str):
    """``dense_dropout_residual_layernorm`` over (B, L, .) rows, returned as two tensors: positions [:split] and [split:].

    One matmul over all positions; the LayerNorm epilogue runs per part, so each part comes out
    contiguous (None for an empty text part).
    """
    if split >= x.shape[1]:
        return dense_dropout_residual_layernorm(block, x, residual, backend), None
    fused = use_fused(backend, x)
    h = F.linear(x, block.dense.weight) if fused else F.linear(x, block.dense.weight, block.dense.bias)
    sizes = [split, x.shape[1] - split]
    # split, not two slices: its backward writes both gradients into one tensor
    return tuple(
        _add_layernorm(block, hp, rp, backend, has_bias=not fused)
        for hp, rp in zip(h.split(sizes, dim=1), residual.split(sizes, dim=1))
    )


def dense_activation(block, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``act(dense(x))`` for a :class:`QFormerIntermediate`."""
    if block.act_name == "gelu" and use_fused(backend, x):
        h = F.linear(x, block.dense.weight)
        # autocast: the bias joins in the matmul's dtype, as F.linear(x, W, b) would add it
        return fused_epilogue.bias_gelu(h, block.dense.bias.to(h.dtype), backend=_epilogue_backend(backend))
    return block.intermediate_act_fn(F.linear(x, block.dense.weight, block.dense.bias))


def feed_forward(intermediate, output, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``output(intermediate(x), x)``: the FFN and its output block.

    With the exact GELU (outside autocast), the GELU output is never kept: ``bias_gelu_linear``
    recomputes it in backward for the second matmul's weight gradient.
    """
    if intermediate.act_name != "gelu" or _autocast(x):
        return output(intermediate(x, backend), x, backend)
    w1, b1, w2 = intermediate.dense.weight, intermediate.dense.bias, output.dense.weight
    if use_fused(backend, x):
        # bias + GELU in the Triton kernel, the second bias in the LayerNorm epilogue
        h = fused_epilogue.bias_gelu_linear(F.linear(x, w1), b1, w2, None, backend=_epilogue_backend(backend))
        return _add_layernorm(output, h, x, backend, has_bias=False)
    h = fused_epilogue.bias_gelu_linear(F.linear(x, w1, b1), None, w2, output.dense.bias, backend="torch")
    return _add_layernorm(output, h, x, backend, has_bias=True)


def _heads(y: torch.Tensor, num_heads: int) -> torch.Tensor:
    # (..., H*D) -> (..., H, D): the layout the attention ops read (head dim contiguous; rows may be strided).
    return y.view(*y.shape[:-1], num_heads, y.shape[-1] // num_heads)


def qkv_projection(proj, x: torch.Tensor, num_heads: int):
    """(q, k, v), each (..., H, D): views into one matmul against the fused ``qkv`` weight."""
    q, k, v = F.linear(x, proj.qkv.weight, proj.qkv.bias).split(proj.all_head_size, dim=-1)
    return _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)


def kv_projection(proj, x: torch.Tensor, num_heads: int):
    """(k, v), each (..., H, D), of a cross-attention block applied to image tokens: one matmul against ``kv``."""
    k, v = F.linear(x, proj.kv.weight, proj.kv.bias).split(proj.all_head_size, dim=-1)
    return _heads(k, num_heads), _heads(v, num_heads)


def query_projection(proj, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q (..., H, D) of a cross-attention block (the keys come from the image K/V cache)."""
    return _heads(F.linear(x, proj.query.weight, proj.query.bias), num_heads)
