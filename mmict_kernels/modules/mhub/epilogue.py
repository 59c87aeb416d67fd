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
  dense output and, on a CPU, the dropout mask packed 8 to a byte (elsewhere it is drawn again from
  a seed; the GELU is recomputed in backward).
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


class _GatheredLinear(torch.autograd.Function):
    """``F.linear(x.flatten(0, -2)[index], W, b)`` keeping x for backward, not the gathered copy.

    The attention output that the output block reads is kept by the attention itself; a plain
    ``index_select`` + ``F.linear`` would keep a second, gathered copy of it for the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, index, weight, bias):
        ctx.save_for_backward(x, index, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.reshape(-1, x.shape[-1]).index_select(0, index), weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, index, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        dx = dweight = dbias = None
        if needs[0]:
            dx = x2d.new_zeros(x2d.shape).index_add_(0, index, dout.mm(weight)).view(x.shape)
        if needs[2]:
            dweight = dout.t().mm(x2d.index_select(0, index))  # the gather again: cheap next to the GEMM
        if ctx.has_bias and needs[3]:
            dbias = dout.sum(0)
        return dx, None, dweight, dbias


def dense_dropout_residual_layernorm_rows(block, x: torch.Tensor, index: torch.Tensor, residual: torch.Tensor, backend: str):
    """``dense_dropout_residual_layernorm`` over the rows ``index`` of x (flattened to rows); residual: (len(index), W)."""
    if _autocast(x):  # F.linear's own casts
        return dense_dropout_residual_layernorm(block, x.reshape(-1, x.shape[-1]).index_select(0, index), residual, backend)
    h = _GatheredLinear.apply(x, index, block.dense.weight, block.dense.bias)
    return _add_layernorm(block, h, residual, backend, has_bias=True)


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


class _RowBlockLinear(torch.autograd.Function):
    """``F.linear(x, W, b).split(size, -1)`` as one GEMM per row block of the fused weight, on a CPU.

    One GEMM into a (rows x 3A) buffer gives q, k, v as strided views; on a CPU the per-block GEMMs
    write their own (rows x A) outputs as fast (the image K/V's 1536-wide GEMM ran slower in place than
    two 768-wide ones, profiled with 2 threads), and the backward needs no concatenation of dq, dk, dv:
    each block's dW is written into its rows of one weight gradient, and dx accumulates block by block.
    Keeps what ``F.linear`` keeps: x (and the parameters themselves).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, size: int):
        ctx.save_for_backward(x, weight)
        ctx.size, ctx.has_bias = size, bias is not None
        weights = weight.split(size)
        biases = bias.split(size) if bias is not None else [None] * len(weights)
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *douts):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        blocks = [
            (d.reshape(-1, d.shape[-1]), w)
            for d, w in zip(douts, weight.split(ctx.size))
            if d is not None  # an output nobody used
        ]
        dx = dweight = dbias = None
        if needs[0]:
            for i, (d, w) in enumerate(blocks):
                # addmm with out=, not addmm_: the same in-place GEMM, but FlopCounterMode counts it
                dx = d.mm(w) if i == 0 else torch.addmm(dx, d, w, out=dx)
            dx = dx.view(x.shape) if dx is not None else torch.zeros_like(x)
        if needs[1] or (needs[2] and ctx.has_bias):
            dweight = torch.zeros_like(weight) if len(blocks) < len(douts) else torch.empty_like(weight)
            dbias = dweight.new_zeros(weight.shape[0]) if ctx.has_bias else None
            for d, rows, db in zip(douts, dweight.split(ctx.size), dbias.split(ctx.size) if ctx.has_bias else douts):
                if d is None:
                    continue
                d2d = d.reshape(-1, d.shape[-1])
                if needs[1]:
                    torch.mm(d2d.t(), x2d, out=rows)  # dout^T x, F.linear autograd's own layout
                if ctx.has_bias and needs[2]:
                    torch.sum(d2d, dim=0, out=db)
        return dx, (dweight if needs[1] else None), (dbias if needs[2] else None), None


def _projection(linear: torch.nn.Linear, x: torch.Tensor, size: int):
    """``linear(x).split(size, -1)``: per-block GEMMs on a CPU (see _RowBlockLinear), one GEMM elsewhere.

    One GEMM on GPUs, under torch.compile (the compiler plans the split) and under autocast (F.linear's
    own casts).
    """
    weight, bias = linear.weight, linear.bias
    if x.device.type != "cpu" or torch.compiler.is_compiling() or _autocast(x):
        return F.linear(x, weight, bias).split(size, dim=-1)
    return _RowBlockLinear.apply(x, weight, bias, size)


def qkv_projection(proj, x: torch.Tensor, num_heads: int):
    """(q, k, v), each (..., H, D), from the fused ``qkv`` weight (one GEMM, or one per block on a CPU)."""
    q, k, v = _projection(proj.qkv, x, proj.all_head_size)
    return _heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)


def kv_projection(proj, x: torch.Tensor, num_heads: int):
    """(k, v), each (..., H, D), of a cross-attention block applied to image tokens, from the fused ``kv`` weight."""
    k, v = _projection(proj.kv, x, proj.all_head_size)
    return _heads(k, num_heads), _heads(v, num_heads)


def query_projection(proj, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q (..., H, D) of a cross-attention block (the keys come from the image K/V cache)."""
    return _heads(F.linear(x, proj.query.weight, proj.query.bias), num_heads)
