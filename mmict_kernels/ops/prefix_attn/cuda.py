"""CUDA C++ backend of demo-prefix attention: ``torch.ops.mmict.prefix_attention_{fwd,bwd}``.

One kernel launch attends every row to [its group's prefix ; its own tokens] with one online
softmax (no concatenation, no per-row prefix copy); the backward sums the prefix gradients over
the rows of each group, with float atomics (default) or a fixed-order per-group loop
(``deterministic=True``, bitwise reproducible). This module registers the fake (meta)
implementations and the autograd formula. Importing it without ``mmict_kernels._C`` raises
ImportError (the backend registry reports why the cuda backend is unavailable).
"""

from __future__ import annotations

import torch

from ... import _C  # noqa: F401  (loads the extension: registers torch.ops.mmict.*_cuda_*)

_fwd = torch.ops.mmict.prefix_attention_cuda_fwd
_bwd = torch.ops.mmict.prefix_attention_cuda_bwd


@torch.library.register_fake("mmict::prefix_attention_cuda_fwd")
def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale, prefix_lengths, seqlens_k, deterministic, num_splits=0):
    batch, len_q, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((batch, heads, len_q), dtype=torch.float32)


@torch.library.register_fake("mmict::prefix_attention_cuda_bwd")
def _bwd_fake(dout, q, k, v, prefix_k, prefix_v, prefix_ids, out, lse, causal, scale, prefix_lengths, seqlens_k, deterministic):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, prefix_k, prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale, prefix_lengths, seqlens_k, deterministic = inputs[:11]
    out, lse = output
    ctx.num_inputs = len(inputs)  # + num_splits (forward only)
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_ids, out, lse, prefix_lengths, seqlens_k)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
    ctx.mark_non_differentiable(lse)  # a statistic, on every backend (ops/__init__.py)


def _backward(ctx, dout, dlse):
    q, k, v, prefix_k, prefix_v, prefix_ids, out, lse, prefix_lengths, seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dprefix_k, dprefix_v = _bwd(
        dout,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_ids,
        out,
        lse,
        ctx.causal,
        ctx.scale,
        prefix_lengths,
        seqlens_k,
        ctx.deterministic,
    )
    return (dq, dk, dv, dprefix_k, dprefix_v) + (None,) * (ctx.num_inputs - 5)


torch.library.register_autograd("mmict::prefix_attention_cuda_fwd", _backward, setup_context=_setup_context)


def prefix_attention_cuda(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale, prefix_lengths, seqlens_k, deterministic):
    """(out, lse) of demo-prefix attention on the CUDA kernels; arguments as the reference.

    The front-end (:func:`mmict_kernels.ops.prefix_attention`) has validated the inputs
    (int64 prefix_ids, int32 prefix_lengths / seqlens_k); the op re-checks what the kernels rely on.
    Split-KV (for decoding: one query per row against a long prefix) is chosen by the op from the
    GPU size; its ``num_splits`` argument (default 0 = auto) forces a count.
    """
    return _fwd(
        q, k, v, prefix_k, prefix_v, prefix_ids, bool(causal), float(scale), prefix_lengths, seqlens_k, bool(deterministic)
    )
