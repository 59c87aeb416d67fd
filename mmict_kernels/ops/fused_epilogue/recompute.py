"""Layer epilogues that keep less for backward by recomputing what is cheap.

- :func:`bias_gelu_linear`: ``linear(gelu(x + bias), weight2, bias2)``, the FFN's GELU and second
  matmul. Autograd of the two ops apart keeps both ``x + bias`` (for GELU's backward) and
  ``gelu(x + bias)`` (for ``dW2``), two (rows x intermediate) tensors, the largest activations of a
  BERT layer. Here only ``x`` is kept; the backward recomputes the GELU (one elementwise pass).
  GELU runs on the ``torch`` backend (``F.gelu`` / ``aten.gelu_backward``) or on the Triton kernels
  of ``triton_gelu.py``.
- :func:`dropout_add_layernorm`: ``LayerNorm(dropout(h) + residual)`` with torch's random numbers
  (the ``torch`` path of FusedMHub: ``nn.Dropout``'s rate and scaling). Autograd of the ops apart
  keeps the dropout mask (a float tensor on CPU) and the LayerNorm input; here the LayerNorm input
  (and its two per-row statistics) is kept, and the mask, drawn from a private generator seeded
  from torch's default one, packed 8 to a byte on a CPU (1/32 of the float mask; elsewhere it is
  drawn again in backward from the seed). No recomputation beyond the mask
  (on a CPU every extra pass over a (rows x hidden) tensor costs a parallel region; the Triton
  kernel, which rebuilds its input anyway, recomputes the statistics too).

Under ``torch.compile`` both run as plain ops (the compiler plans what to keep); under autocast the
callers use the plain ops too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import backends
from .. import checks as C
from .._seeded_dropout import draw_seed, keep_mask_from_seed, mask_to_save, saved_mask

GELU_OP = "bias_gelu"


# ---------------------------------------------------------------------------------------------
# GELU + linear
# ---------------------------------------------------------------------------------------------
def _gelu_torch(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias)


def _gelu_backward_torch(da: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None):
    u = x if bias is None else x + bias
    # in place: da is the backward's own scratch tensor (see _BiasGeluLinear.backward)
    dx = torch.ops.aten.gelu_backward.grad_input(da, u, grad_input=da)
    dbias = None if bias is None else dx.reshape(-1, dx.shape[-1]).sum(0)
    return dx, dbias


def _gelu_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    from .triton_gelu import _fwd_op

    return _fwd_op(x.reshape(-1, x.shape[-1]).contiguous(), bias.contiguous()).reshape(x.shape)


def _gelu_backward_triton(da: torch.Tensor, x: torch.Tensor, bias: torch.Tensor):
    from .triton_gelu import _bwd_op

    hidden = x.shape[-1]
    dx, dbias = _bwd_op(da.reshape(-1, hidden).contiguous(), x.reshape(-1, hidden).contiguous(), bias.contiguous())
    return dx.reshape(x.shape), dbias.to(bias.dtype)


_GELU = {"torch": (_gelu_torch, _gelu_backward_torch), "triton": (_gelu_triton, _gelu_backward_triton)}


class _BiasGeluLinear(torch.autograd.Function):
    """out = a @ weight^T + bias2 with a = gelu(x + bias); keeps x (not a) for backward."""

    @staticmethod
    def forward(ctx, x, bias, weight, bias2, backend: str):
        gelu, _ = _GELU[backend]
        a = gelu(x, bias)
        ctx.save_for_backward(x, bias, weight)
        ctx.backend = backend
        ctx.has_bias2 = bias2 is not None
        return F.linear(a, weight, bias2)

    @staticmethod
    def backward(ctx, dout):
        x, bias, weight = ctx.saved_tensors
        gelu, gelu_backward = _GELU[ctx.backend]
        needs = ctx.needs_input_grad
        dout2d = dout.reshape(-1, dout.shape[-1])
        dweight = dbias2 = dx = dbias = a = None
        if needs[2]:
            a = gelu(x, bias).reshape(-1, x.shape[-1])  # recomputed: the one thing this function does not keep
            # dout^T a, as F.linear's autograd computes it: the gradient comes out in the weight's own
            # layout (a transposed result would be copied into that layout when accumulated)
            dweight = dout2d.t().mm(a)
        if ctx.has_bias2 and needs[3]:
            dbias2 = dout2d.sum(0)
        if needs[0] or needs[1]:
            # dout @ W into the recomputed GELU's buffer (no longer needed), and GELU's backward in
            # place there: one (rows x K) tensor for the whole backward, as few fresh pages as can be
            da = dout2d.mm(weight) if a is None else torch.mm(dout2d, weight, out=a)
            dx, dbias = gelu_backward(da.view(x.shape), x, bias)
        return dx, dbias, dweight, dbias2, None


def bias_gelu_linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias2: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear(gelu(x + bias), weight, bias2)`` (exact erf GELU), keeping only ``x`` for backward.

    Args:
        x: (..., K) the first matmul's output (float16, bfloat16, float32; float64 on the torch backend).
        bias: (K,) or None (then ``x`` already holds the bias; the torch backend only).
        weight: (N, K) the second matmul's weight (``nn.Linear`` layout); bias2: (N,) or None.
        backend: "auto" (triton on CUDA, torch on CPU), "triton" or "torch": where the GELU runs.

    Returns:
        (..., N) in x's dtype; differentiable w.r.t. x, bias, weight and bias2. The backward
        recomputes ``gelu(x + bias)`` for ``dW`` instead of keeping it.
    """
    C.check_tensor("x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected a (..., K) tensor with K >= 1, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    C.check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != hidden:
        raise ValueError(f"weight: expected shape (N, {hidden}) (K from x), got {tuple(weight.shape)}")
    vectors = {"weight": weight}
    if bias is not None:
        C.check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != hidden:
            raise ValueError(f"bias: expected shape ({hidden},) (K from x), got {tuple(bias.shape)}")
        vectors["bias"] = bias
    if bias2 is not None:
        C.check_tensor("bias2", bias2, ndim=1)
        if bias2.shape[0] != weight.shape[0]:
            raise ValueError(f"bias2: expected shape ({weight.shape[0]},) (N from weight), got {tuple(bias2.shape)}")
        vectors["bias2"] = bias2
    C.check_same_dtype_device("x", x, **vectors)
    C.check_backend_name(backend)
    name, _ = backends.resolve(GELU_OP, backend, device_type=x.device.type, dtype=x.dtype, head_dim=hidden)
    if name == "triton" and bias is None:
        bias = x.new_zeros(hidden)  # the kernels add a bias vector
    if torch.compiler.is_compiling():
        gelu, _ = _GELU[name]
        return F.linear(gelu(x, bias), weight, bias2)
    return _BiasGeluLinear.apply(x, bias, weight, bias2, name)


# ---------------------------------------------------------------------------------------------
# dropout + residual + LayerNorm with torch's random numbers
# ---------------------------------------------------------------------------------------------
class _DropoutAdd(torch.autograd.Function):
    """z = dropout(h) + residual, keeping for backward the keep-mask packed 8 to a byte (on a GPU: its seed).

    On a CPU, unpacking the mask costs ~1/10 of drawing it again (torch's CPU generator is
    single-threaded); elsewhere the seed draws it again and nothing is kept.
    """

    @staticmethod
    def forward(ctx, h, residual, dropout_p: float, seed: int):
        ctx.dropout_p, ctx.seed = dropout_p, seed
        keep = keep_mask_from_seed(seed, h.shape, dropout_p, h.device)
        ctx.save_for_backward(mask_to_save(keep))
        return torch.addcmul(residual, h, keep, value=1.0 / (1.0 - dropout_p))  # one pass: residual + h * keep / (1 - p)

    @staticmethod
    def backward(ctx, dz):
        dh = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            keep = saved_mask(packed, dz.shape, lambda: keep_mask_from_seed(ctx.seed, dz.shape, ctx.dropout_p, dz.device))
            dh = torch.where(keep, dz * (1.0 / (1.0 - ctx.dropout_p)), 0.0)
        return dh, (dz if ctx.needs_input_grad[1] else None), None, None


def dropout_add_layernorm(
    h: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """``LayerNorm(dropout(h) + residual)`` over the last dim, keeping one (rows x hidden) tensor for backward.

    The ops apart keep the dropout mask (a float tensor on CPU, as large as ``h``) and the
    LayerNorm input; here what is kept is LayerNorm's own (its input and two statistics per row)
    and, on a CPU, the keep-mask packed 8 to a byte (elsewhere it is drawn again from its seed in
    backward). (``h`` and ``residual`` are not kept:
    the dropout's backward needs neither.) Without dropout it is the plain ``LayerNorm(h + residual)``.

    Args:
        h: (..., hidden) the dense layer's output, bias included; residual: same shape.
        weight, ln_bias: (hidden,) the LayerNorm's affine parameters (or None).
        eps: LayerNorm epsilon; dropout_p: hidden dropout probability (0.0 in eval).
        seed: the dropout seed (an int in [0, 2**62)); None draws one from torch's default generator,
            so ``torch.manual_seed`` reproduces the step. The keep-mask is :func:`keep_mask_from_seed`.

    Returns:
        (..., hidden) in h's dtype; differentiable w.r.t. h, residual, weight and ln_bias.
    """
    C.check_tensor("h", h, dtypes=C.FLOAT_DTYPES)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h: expected a (..., hidden) tensor with hidden >= 1, got shape {tuple(h.shape)}")
    if residual.shape != h.shape:
        raise ValueError(f"residual: expected shape {tuple(h.shape)} (same as h), got {tuple(residual.shape)}")
    dropout_p = C.check_dropout(dropout_p)
    if dropout_p <= 0.0:
        z = h + residual
    elif torch.compiler.is_compiling():
        z = F.dropout(h, dropout_p) + residual  # traced as plain ops (the compiler's own RNG and memory plan)
    else:
        z = _DropoutAdd.apply(h, residual, dropout_p, draw_seed() if seed is None else seed)
    return F.layer_norm(z, (z.shape[-1],), weight, ln_bias, eps)


__all__ = ["bias_gelu_linear", "dropout_add_layernorm", "keep_mask_from_seed"]
