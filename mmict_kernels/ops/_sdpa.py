"""The ``torch`` backend's attention core: torch's fused SDPA kernels where they apply, a lean dropout path elsewhere.

The readable :mod:`._reference` materialises the scores, the mask and the probabilities, and autograd
keeps them all for backward: fine as an oracle, slow and memory-hungry as the CPU path. Here:

- no dropout, CPU tensors: ``aten._scaled_dot_product_flash_attention_for_cpu``, torch's fused
  (FlashAttention-style) CPU kernel, with the op's mask as an additive mask (0 / -inf). It keeps only
  q, k, v, the output and the log-sum-exp for backward, takes grouped-query K/V as they are, and
  returns the log-sum-exp, which the ops' ``return_lse`` needs (``F.scaled_dot_product_attention``
  does not return it). A row that sees no key gives zeros there; its lse is set to -inf, as in the
  reference.
- attention dropout (training): torch's fused CPU kernels have none (SDPA would fall back to its math
  path, which keeps every intermediate). :class:`_DropoutAttention` computes the attention in plain
  PyTorch but keeps only q, k, v, the output, the log-sum-exp and the keep-mask packed 8 to a byte
  (on a GPU, its seed): the backward recomputes the probabilities from the log-sum-exp
  (FlashAttention's recomputation, in PyTorch) and unpacks the mask (or draws it again).
- anything else (CUDA tensors on the torch backend, the dropout path under ``torch.compile``): the
  reference itself.
"""

from __future__ import annotations

import torch

from ._reference import masked_attention, softmax_dtype
from ._seeded_dropout import draw_seed, drop_mask_from_seed, mask_to_save, saved_mask


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # (B, L, H, D) <-> (B, H, L, D), a view


def _heads_first_copy(t: torch.Tensor) -> torch.Tensor:
    # (B, L, H, D) -> contiguous (B, H, L, D): every batched matmul would otherwise copy the strided
    # operand itself (the (B, H) batch dims of a (B, L, H, D) tensor do not flatten), once per use.
    return t.transpose(1, 2).contiguous()


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _fix_empty_rows(lse: torch.Tensor, mask: torch.Tensor | None, shape) -> torch.Tensor:
    """lse = -inf for rows that see no key (the fused kernel reports 0 there)."""
    if mask is None:
        return lse
    sees_a_key = mask.any(dim=-1).expand(shape)  # (B, H, Lq)
    return lse.masked_fill(~sees_a_key, float("-inf"))


def flash_cpu_attention(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused CPU attention. q (B, Lq, H, D); k, v (B, Lk, Hkv, D); mask bool broadcastable to (B, 1, Lq, Lk)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _heads_first(q),
        _heads_first(k),
        _heads_first(v),
        0.0,
        False,
        attn_mask=_additive_mask(mask, q.dtype),
        scale=scale,
    )
    batch, heads, len_q = out.shape[:3]
    return _heads_first(out), _fix_empty_rows(lse, mask, (batch, heads, len_q))


# ---------------------------------------------------------------------------------------------
# Attention dropout with recomputation
# ---------------------------------------------------------------------------------------------
def _expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, Hkv, L, D) -> (B, H, L, D) for grouped-query attention (a view when Hkv == H).
    kv_heads = t.shape[1]
    if kv_heads == heads:
        return t
    return t.repeat_interleave(heads // kv_heads, dim=1)


def _scaled_product(a: torch.Tensor, b: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha * a @ b over the (B, H) batch dims, in ``dtype``: the scale rides in the GEMM (baddbmm's alpha)."""
    batch = a.shape[:2]
    a3, b3 = a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])  # views of heads-first copies
    out = torch.baddbmm(a3.new_empty(()).expand(a3.shape[0], a3.shape[1], b3.shape[2]), a3, b3, beta=0.0, alpha=alpha)
    return out.unflatten(0, batch).to(dtype)


class _DropoutAttention(torch.autograd.Function):
    """Attention with dropout on the probabilities; keeps q, k, v, out, lse and the packed mask (not the probabilities).

    Every pass over the (B, H, Lq, Lk) scores runs in place on one buffer, and the softmax scale and
    the dropout's 1 / (1 - p) ride in the GEMMs (alpha) or in the per-row normaliser: on a CPU each
    extra pass (and each fresh buffer) costs as much as the small batched matmuls themselves.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, dropout_p: float, seed: int):
        qh, kh, vh = _heads_first_copy(q), _heads_first_copy(k), _heads_first_copy(v)
        heads = qh.shape[1]
        kh, vh = _expand_kv_heads(kh, heads), _expand_kv_heads(vh, heads)
        acc = softmax_dtype(q.dtype)
        probs = _scaled_product(qh, kh.transpose(-1, -2), scale, acc)  # the scores, turned into P in place
        if mask is not None:
            probs.masked_fill_(~mask, float("-inf"))
        row_max = probs.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # a row that sees nothing: 0
        probs.sub_(row_max).exp_()  # unnormalised; exp(-inf) = 0
        row_sum = probs.sum(dim=-1, keepdim=True)
        lse = (row_max + row_sum.log()).squeeze(-1)  # -inf for a row that sees nothing
        # normalisation, dropout and its 1 / (1 - p) in two passes: dropped entries zeroed, kept ones scaled per row
        drop = drop_mask_from_seed(seed, probs.shape, dropout_p, probs.device)
        probs.masked_fill_(drop, 0.0)
        row_scale = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum)).reciprocal_().mul_(1.0 / (1.0 - dropout_p))
        probs.mul_(row_scale)
        # (B, L, H, D) in memory, as the fused kernel writes it: the caller's reshape to (B, L, H * D) is a view.
        out = _heads_first(torch.matmul(probs.to(v.dtype), vh)).contiguous()
        ctx.save_for_backward(q, k, v, out, lse, mask, mask_to_save(drop))  # packed on a CPU, else redrawn
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, packed_drop = ctx.saved_tensors
        scale, p = ctx.scale, ctx.dropout_p
        qh, kh, vh = _heads_first_copy(q), _heads_first_copy(k), _heads_first_copy(v)
        heads, kv_heads = qh.shape[1], kh.shape[1]
        kh_full, vh_full = _expand_kv_heads(kh, heads), _expand_kv_heads(vh, heads)
        acc = softmax_dtype(q.dtype)
        # P again from the log-sum-exp, in place (a row that sees nothing: lse -inf -> shift +inf -> 0)
        probs = _scaled_product(qh, kh_full.transpose(-1, -2), scale, acc)
        if mask is not None:
            probs.masked_fill_(~mask, float("-inf"))
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        probs.sub_(lse_safe[..., None]).exp_()
        drop = saved_mask(packed_drop, probs.shape, lambda: drop_mask_from_seed(ctx.seed, probs.shape, p, probs.device))
        keep_scale = 1.0 / (1.0 - p)
        douth = _heads_first_copy(dout)
        # dV = (kept P / (1 - p))^T dout, dP = dout V^T / (1 - p) on kept entries: 1 / (1 - p) as the GEMMs' alpha
        dv = _scaled_product(probs.masked_fill(drop, 0.0).to(v.dtype).transpose(-1, -2), douth, keep_scale, v.dtype)
        dprobs = _scaled_product(douth, vh_full.transpose(-1, -2), keep_scale, acc).masked_fill_(drop, 0.0)
        # softmax backward: dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dout * out); scale in the GEMMs.
        delta = (douth.to(acc) * _heads_first(out).to(acc)).sum(-1, keepdim=True)
        dscores = dprobs.sub_(delta).mul_(probs).to(q.dtype)
        dq = _scaled_product(dscores, kh_full, scale, q.dtype)
        dk = _scaled_product(dscores.transpose(-1, -2), qh, scale, q.dtype)
        if kv_heads != heads:  # grouped-query attention: sum the gradients of the query heads sharing a K/V head
            group = heads // kv_heads
            dk = dk.unflatten(1, (kv_heads, group)).sum(2)
            dv = dv.unflatten(1, (kv_heads, group)).sum(2)
        return _heads_first(dq), _heads_first(dk), _heads_first(dv), None, None, None, None


def dropout_attention(q, k, v, mask, scale: float, dropout_p: float, seed: int | None = None):
    """Attention with dropout whose backward recomputes the probabilities; returns (out, lse).

    seed: the keep-mask is ``keep_mask_from_seed(seed, (B, H, Lq, Lk), dropout_p)``
    (``ops/_seeded_dropout.py``); None draws the seed with its ``draw_seed``.
    """
    if seed is None:
        seed = draw_seed()
    return _DropoutAttention.apply(q, k, v, mask, float(scale), float(dropout_p), seed)


def attention(q, k, v, mask, scale: float, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale, masked) v on the fastest path this input allows; returns (out, lse) like the reference.

    q: (B, Lq, H, D); k, v: (B, Lk, Hkv, D) with Hkv dividing H; mask: bool broadcastable to
    (B, 1, Lq, Lk), True where a query may attend to a key (None: everything).
    """
    if dropout_p > 0.0:
        if torch.compiler.is_compiling():
            k, v = (_heads_first(_expand_kv_heads(_heads_first(t), q.shape[2])) for t in (k, v))
            return masked_attention(q, k, v, mask, scale, dropout_p)
        return dropout_attention(q, k, v, mask, scale, dropout_p)
    if q.device.type == "cpu":
        return flash_cpu_attention(q, k, v, mask, scale)
    k, v = (_heads_first(_expand_kv_heads(_heads_first(t), q.shape[2])) for t in (k, v))
    return masked_attention(q, k, v, mask, scale)


__all__ = ["attention", "dropout_attention", "flash_cpu_attention"]
