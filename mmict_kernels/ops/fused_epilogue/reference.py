"""PyTorch references of the fused layer epilogues (the oracle, and the CPU / ``torch`` backend).

They are written op by op, as transformers' BERT layers compute them, so autograd gives the
gradients; the only shared piece with the kernels is the dropout keep-mask (:mod:`.philox`),
which makes the ``torch`` and ``triton`` backends drop the same elements for a seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .philox import dropout_keep_mask


def bias_dropout_add_layernorm_reference(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + residual) over the last dim (BERT's ``*Output`` block).

    x, residual: (..., hidden); bias, weight, ln_bias: (hidden,). With ``dropout_p > 0`` the
    keep-mask is :func:`dropout_keep_mask` (seed, x.shape, dropout_p); ``seed`` is required then.
    """
    hidden_states = x + bias
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("seed: required when dropout_p > 0 (the keep-mask is drawn from it)")
        keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device)
        hidden_states = torch.where(keep, hidden_states * (1.0 / (1.0 - dropout_p)), torch.zeros_like(hidden_states))
    return F.layer_norm(hidden_states + residual, (x.shape[-1],), weight, ln_bias, eps)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) with the exact (erf) GELU, transformers' ``"gelu"`` activation. bias: (hidden,)."""
    return F.gelu(x + bias)


__all__ = ["bias_dropout_add_layernorm_reference", "bias_gelu_reference", "dropout_keep_mask"]
