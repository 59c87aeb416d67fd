"""Fused layer epilogues of M-Hub's BERT layers: the memory-bound glue around the matmuls.

- :func:`bias_dropout_add_layernorm`: LayerNorm(dropout(x + bias) + residual), the
  ``*SelfOutput`` / ``*Output`` blocks after a bias-free dense matmul.
- :func:`bias_gelu`: gelu(x + bias) (exact erf), the ``*Intermediate`` block.
- :func:`fused_qkv_linear` / :func:`fused_kv_linear`: Q/K/V (K/V) projections as one matmul.
- :func:`bias_gelu_linear`: linear(gelu(x + bias)), keeping x only (the GELU is recomputed in backward).
- :func:`dropout_add_layernorm`: LayerNorm(dropout(h) + residual) with torch's random numbers, keeping
  h only (mask drawn again from a seed, statistics recomputed): the ``torch`` path of FusedMHub.
- :func:`dropout_keep_mask`: the keep-mask the kernels draw for a seed (tests, debugging).

Files: ``reference.py`` (PyTorch, the oracle and the ``torch`` backend), ``philox.py`` (Triton's
``tl.rand`` in PyTorch, so both backends drop the same elements), ``triton_layernorm.py`` and
``triton_gelu.py`` (kernels + ``torch.library`` custom ops ``mmict::*`` with fake and autograd
registrations), ``qkv.py`` (the fused projection, plain PyTorch), ``recompute.py`` (the epilogues
that recompute instead of keeping: GELU + linear, dropout + residual + LayerNorm). This module validates inputs
and dispatches through :mod:`mmict_kernels.backends`.
"""

from __future__ import annotations

import math

import torch

from ... import backends
from .. import checks as C
from .._seeded_dropout import SEED_HIGH
from .philox import dropout_keep_mask
from .qkv import fused_kv_linear, fused_qkv_linear
from .recompute import bias_gelu_linear, dropout_add_layernorm, keep_mask_from_seed
from .reference import bias_dropout_add_layernorm_reference, bias_gelu_reference

LAYERNORM_OP = "bias_dropout_add_layernorm"
GELU_OP = "bias_gelu"
backends.register(LAYERNORM_OP, "torch", __name__ + ".reference", "bias_dropout_add_layernorm_reference", backends.REFERENCE)
backends.register(
    LAYERNORM_OP, "triton", __name__ + ".triton_layernorm", "bias_dropout_add_layernorm_triton", backends.TRITON_ELEMENTWISE
)
backends.register(GELU_OP, "torch", __name__ + ".reference", "bias_gelu_reference", backends.REFERENCE)
backends.register(GELU_OP, "triton", __name__ + ".triton_gelu", "bias_gelu_triton", backends.TRITON_ELEMENTWISE)


def _implementation(op: str, backend: str, *, device_type: str, dtype: torch.dtype, hidden: int, dropout: bool = False):
    """The registered implementation (``backends.resolve``, which torch.compile traces); the hidden size plays the head dim."""
    return backends.resolve(op, backend, device_type=device_type, dtype=dtype, head_dim=hidden, dropout=dropout)[1]


def _check_rows_and_vector(x_name: str, x, vectors: dict) -> int:
    C.check_tensor(x_name, x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{x_name}: expected a (..., hidden) tensor with hidden >= 1, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    for name, v in vectors.items():
        C.check_tensor(name, v)
        if tuple(v.shape) != (hidden,):
            raise ValueError(f"{name}: expected shape ({hidden},) (hidden from {x_name}), got {tuple(v.shape)}")
    C.check_same_dtype_device(x_name, x, **vectors)
    return hidden


def _check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in (torch.int64, torch.int32) or seed.numel() != 1:
            raise TypeError(
                f"seed: expected an int, None, or a one-element int64 tensor, got a {str(seed.dtype).replace('torch.', '')} "
                f"tensor of shape {tuple(seed.shape)}"
            )
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, None, or a one-element int64 tensor, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed}")


def _seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The (checked) seed as a 0-d int64 tensor on ``device``; None draws one."""
    if seed is None:
        # torch's default generator of that device: torch.manual_seed reproduces the draw, no host sync.
        return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(()).to(device=device, dtype=torch.int64)
    return torch.tensor(seed, dtype=torch.int64, device=device)


def bias_dropout_add_layernorm(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    *,
    seed: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + residual) over the last dim, in one pass (BERT output block).

    Args:
        x: (..., hidden) output of a bias-free dense matmul (float16, bfloat16, float32; float64
            on the torch backend). Any number of rows; any hidden size.
        bias: (hidden,) the dense layer's bias.
        residual: same shape as ``x``.
        weight, ln_bias: (hidden,) the LayerNorm's affine parameters.
        eps: LayerNorm epsilon (BERT / Q-Former: 1e-12). Statistics are float32.
        dropout_p: hidden dropout probability; pass 0.0 in eval (``p if module.training else 0.0``).
        seed: with ``dropout_p > 0``, element i of the row-major ``x`` is kept iff
            ``tl.rand(seed, i) >= dropout_p`` (see :func:`dropout_keep_mask`); the same seed gives
            the same mask on every backend, and the backward regenerates it. An int in
            [0, 2**63), a one-element int64 tensor (stays on device: use this under
            ``torch.compile`` / CUDA graphs), or None: drawn from torch's default generator of
            ``x.device``, so ``torch.manual_seed`` reproduces it.
        backend: "auto" (triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        (..., hidden) in x's dtype; differentiable w.r.t. x, bias, residual, weight and ln_bias
        (parameter gradients are reduced in a fixed order: deterministic).
    """
    hidden = _check_rows_and_vector("x", x, {"bias": bias, "weight": weight, "ln_bias": ln_bias})
    C.check_tensor("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual: expected shape {tuple(x.shape)} (same as x), got {tuple(residual.shape)}")
    C.check_same_dtype_device("x", x, residual=residual)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a positive finite float, got {eps}")
    dropout_p = C.check_dropout(dropout_p)
    C.check_backend_name(backend)
    _check_seed(seed)
    seed_t = _seed_tensor(seed, x.device) if dropout_p > 0 else None  # no dropout: no draw, no tensor
    impl = _implementation(LAYERNORM_OP, backend, device_type=x.device.type, dtype=x.dtype, hidden=hidden, dropout=dropout_p > 0)
    return impl(x, bias, residual, weight, ln_bias, float(eps), dropout_p, seed_t)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """gelu(x + bias) with the exact erf GELU (transformers' ``"gelu"``), in one pass.

    Args:
        x: (..., hidden) output of a bias-free dense matmul (float16, bfloat16, float32; float64
            on the torch backend).
        bias: (hidden,).
        backend: "auto" (triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        (..., hidden) in x's dtype; differentiable w.r.t. x and bias (deterministic dbias).
    """
    hidden = _check_rows_and_vector("x", x, {"bias": bias})
    C.check_backend_name(backend)
    impl = _implementation(GELU_OP, backend, device_type=x.device.type, dtype=x.dtype, hidden=hidden)
    return impl(x, bias)


__all__ = [
    "bias_dropout_add_layernorm",
    "bias_dropout_add_layernorm_reference",
    "bias_gelu",
    "bias_gelu_linear",
    "bias_gelu_reference",
    "dropout_add_layernorm",
    "keep_mask_from_seed",
    "dropout_keep_mask",
    "fused_qkv_linear",
    "fused_kv_linear",
]
