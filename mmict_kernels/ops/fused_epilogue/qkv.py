"""Fused Q/K/V (or K/V) projection: one matmul with the weights concatenated along the output dim.

Why: three (rows x hidden) @ (hidden x hidden) matmuls read ``x`` three times and launch three
GEMMs that are small at M-Hub's row counts (32 queries + text per sample); one GEMM against
[Wq; Wk; Wv] reads ``x`` once, and its backward produces ``dx`` in one GEMM instead of three
plus two accumulations. For the cross-attention K/V of the image tokens (257 per frame x 1408
features) the saved read of ``x`` is the large one.

The concatenated weight is cached per set of weight tensors and rebuilt whenever one of them
changes (``_version`` bumps on every in-place update, e.g. an optimizer step; ``data_ptr``
changes when ``.data`` is swapped), so several calls in one step (demonstrations, queries,
objectives) pay for the concatenation once. The gradients flow back to the original weights
through a small autograd.Function (one dW GEMM, split into views) that keeps the parts, not the
copy, for backward. FusedMHub does not use these functions: it stores its Q/K/V weights fused
(``modules/mhub/projections.py``), so it has no copy at all. Under ``torch.compile``
the plain ``torch.cat`` path is traced instead (the compiler sees through it).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .. import checks as C

_MAX_CACHED = 256  # sets of weights (a 12-layer M-Hub uses 12 QKV + 6 cross K/V)
_CACHE: dict[tuple[int, ...], tuple[tuple, tuple, torch.Tensor, torch.Tensor | None]] = {}


def _stamp(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def _concat(weights: list[torch.Tensor], biases: list[torch.Tensor] | None):
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights], dim=0)
        bias = torch.cat([b.detach() for b in biases], dim=0) if biases is not None else None
    return weight, bias


def _cached_concat(weights: list[torch.Tensor], biases: list[torch.Tensor] | None):
    """The detached concatenation, reused while every part is the same, unchanged tensor."""
    tensors = weights + (biases or [])
    if any(t.is_inference() for t in tensors):
        return _concat(weights, biases)  # inference tensors have no version counter: no safe cache
    key = tuple(id(t) for t in tensors)
    stamps = tuple(_stamp(t) for t in tensors)
    hit = _CACHE.get(key)
    # ids and data pointers are reused after a tensor dies: the weakrefs prove it is the same one.
    if hit is not None and hit[1] == stamps and all(ref() is t for ref, t in zip(hit[0], tensors)):
        return hit[2], hit[3]
    weight, bias = _concat(weights, biases)
    if len(_CACHE) >= _MAX_CACHED:
        _CACHE.pop(next(iter(_CACHE)))  # oldest first
    _CACHE[key] = (tuple(weakref.ref(t) for t in tensors), stamps, weight, bias)
    for t in tensors:  # free the copy as soon as any part dies
        weakref.finalize(t, _CACHE.pop, key, None)
    return weight, bias


class _ConcatLinear(torch.autograd.Function):
    """F.linear with a precomputed (detached) concatenated weight; gradients go to the parts.

    Keeps x and the parts (the parameters themselves), never the concatenated copy: the backward
    concatenates them again for dx (a transient copy, freed right after).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, split_sizes, n_biases, *parts):
        ctx.save_for_backward(x, *parts[: len(split_sizes)])
        ctx.split_sizes = split_sizes
        ctx.n_biases = n_biases
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # Under autocast the forward ran F.linear in the low-precision dtype; the backward is
        # outside autocast, so compute in dout's dtype and return each gradient in its input's dtype.
        low = dout.dtype
        dx = (dout @ torch.cat([w.detach() for w in weights]).to(low)).to(x.dtype) if needs[0] else None
        dout2d = dout.reshape(-1, dout.shape[-1])
        n_weights = len(ctx.split_sizes)
        dweights = [None] * n_weights
        if any(needs[5 : 5 + n_weights]):
            dw = (dout2d.t() @ x.reshape(-1, x.shape[-1]).to(low)).to(weights[0].dtype)
            dweights = list(dw.split(ctx.split_sizes, dim=0))
        dbiases = [None] * ctx.n_biases
        if ctx.n_biases and any(needs[5 + n_weights :]):
            dbiases = list(dout2d.sum(dim=0).to(weights[0].dtype).split(ctx.split_sizes))
        return (dx, None, None, None, None, *dweights, *dbiases)


def _check(x: torch.Tensor, weights: dict, biases: dict) -> bool:
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected a (..., in_features) tensor, got shape {tuple(x.shape)}")
    for name, w in weights.items():
        C.check_tensor(name, w, ndim=2)
        if w.shape[1] != x.shape[-1]:
            raise ValueError(f"{name}: expected shape (out_features, {x.shape[-1]}) (in_features from x), got {tuple(w.shape)}")
        C.check_same_dtype_device("x", x, **{name: w})
    given = [b is not None for b in biases.values()]
    if any(given) and not all(given):
        raise ValueError(f"{', '.join(biases)}: pass all biases or none (got some None)")
    for (name, b), w in zip(biases.items(), weights.values()):
        if b is not None:
            C.check_tensor(name, b, ndim=1)
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"{name}: expected shape ({w.shape[0]},) (out_features of its weight), got {tuple(b.shape)}")
            C.check_same_dtype_device("x", x, **{name: b})
    return all(given)


def _fused_linear(x, weights: list, biases: list | None) -> tuple[torch.Tensor, ...]:
    split_sizes = [w.shape[0] for w in weights]
    if torch.compiler.is_compiling():
        weight = torch.cat(weights, dim=0)
        bias = torch.cat(biases, dim=0) if biases is not None else None
        out = F.linear(x, weight, bias)
    else:
        weight, bias = _cached_concat(weights, biases)
        out = _ConcatLinear.apply(x, weight, bias, split_sizes, len(biases or []), *weights, *(biases or []))
    return tuple(out.split(split_sizes, dim=-1))


def fused_qkv_linear(x, wq, bq, wk, bk, wv, bv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv) with one matmul.

    x: (..., in_features); w*: (out_*, in_features) as in ``nn.Linear``; b*: (out_*,) or all None.
    Returns three (..., out_*) views into one (..., out_q + out_k + out_v) buffer (last dim
    contiguous, rows strided), differentiable w.r.t. x and every weight and bias.
    """
    has_bias = _check(x, {"wq": wq, "wk": wk, "wv": wv}, {"bq": bq, "bk": bk, "bv": bv})
    return _fused_linear(x, [wq, wk, wv], [bq, bk, bv] if has_bias else None)


def fused_kv_linear(x, wk, bk, wv, bv) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ wk.T + bk, x @ wv.T + bv) with one matmul: the cross-attention K/V of image tokens."""
    has_bias = _check(x, {"wk": wk, "wv": wv}, {"bk": bk, "bv": bv})
    return _fused_linear(x, [wk, wv], [bk, bv] if has_bias else None)


__all__ = ["fused_qkv_linear", "fused_kv_linear"]
