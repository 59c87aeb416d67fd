"""CUDA C++ backend of hub cross-attention: ``torch.ops.mmict.hub_cross_attention_{fwd,bwd}``.

The kernels live in ``csrc/`` (FlashAttention-2-style, tensor-core MMA, cp.async pipeline) and
are registered by ``python/attention_ops.cpp`` in the extension ``mmict_kernels._C``. This
module adds what torch.compile and autograd need: a fake (meta) implementation of each op and
the backward formula of the forward op. Importing it without the extension raises ImportError
(the backend registry reports that as the reason the cuda backend is unavailable).
"""

from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (loads the extension: registers torch.ops.mmict.*_cuda_*)

_fwd = torch.ops.mmict.hub_cross_attention_cuda_fwd
_bwd = torch.ops.mmict.hub_cross_attention_cuda_bwd


@torch.library.register_fake("mmict::hub_cross_attention_cuda_fwd")
def _fwd_fake(q, k, v, cu_seqlens_k, seqlens_k, scale, num_splits=0):
    batch, len_q, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((batch, heads, len_q), dtype=torch.float32)


@torch.library.register_fake("mmict::hub_cross_attention_cuda_bwd")
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_k, seqlens_k, scale):
    # The kernel writes contiguous gradients (whatever the strides of q, k, v).
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_k, seqlens_k, scale = inputs[:6]  # then num_splits (forward only)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_k, seqlens_k)
    ctx.scale = scale
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)  # a statistic, on every backend (ops/__init__.py)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_k, seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, cu_seqlens_k, seqlens_k, ctx.scale)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


torch.library.register_autograd("mmict::hub_cross_attention_cuda_fwd", _backward, setup_context=_setup_context)


def hub_cross_attention_cuda(q, k, v, cu_seqlens_k, seqlens_k, scale, dropout_p):
    """(out, lse) of M-Hub cross-attention on the CUDA kernels; arguments as the reference.

    The front-end (:func:`mmict_kernels.ops.hub_cross_attention`) has validated the inputs and
    converted the length tensors to int32; the op re-checks what the kernels rely on. The op
    picks split-KV by itself when B x H is too small to fill the GPU (its ``num_splits``
    argument, default 0 = auto, forces a count).
    """
    if dropout_p > 0.0:
        raise ValueError("dropout_p: the CUDA hub cross-attention has no attention dropout; use backend='triton' or 'torch'")
    return _fwd(q, k, v, cu_seqlens_k, seqlens_k, float(scale))
