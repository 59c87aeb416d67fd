"""Cross-attention with the image K/V projections folded into the queries: the CPU path for few queries.

The usual order projects every image token, K = X W_k^T + b_k and V = X W_v^T + b_v (Lk x Din x
H*D multiply-adds each, and as many again for each weight gradient), then attends. M-Hub has few
queries per image (MMICT's driver: 8 to 32, against 257 tokens per frame), and the same function
costs less in the other order, per head h:

    S_h = scale * (Q_h W_k,h) X^T         b_k drops out: it adds Q_h . b_k,h to a whole row of S_h
    O_h = (P_h X) W_v,h^T + rowsum(P_h) b_v,h     (P_h after dropout and its 1 / (1 - p))

:func:`cheaper` decides by the FLOP model below. The backward recomputes Q W_k, S and P X (as the
usual CPU path recomputes P): what it keeps is q, the image tokens (kept by the other layers
anyway), the log-sum-exp and the packed dropout mask, less than the K and V the usual order keeps.
b_k's gradient is exactly zero (each row of dS sums to zero); transformers' is zero up to rounding.
"""

from __future__ import annotations

import torch

from ...ops._seeded_dropout import draw_seed, drop_mask_from_seed, mask_to_save, saved_mask


def _usual_order(lq: int, lk: int, din: int, heads: int, head_dim: int, image_grad: bool, backward: bool):
    """(FLOPs of one image's K/V projections, FLOPs of one row's attention to it) in the usual order."""
    project = 2 * lk * din * heads * head_dim  # one of K / V / dW_k / dW_v / each half of dX
    attend = 2 * heads * lq * lk * head_dim  # one of S / P V / the four backward products / the recompute of S
    if not backward:
        return 2 * project, 2 * attend
    return 4 * project + (2 * project if image_grad else 0), 7 * attend


def flops(lq: int, lk: int, din: int, heads: int, head_dim: int, image_grad: bool, absorbed: bool, backward: bool = True) -> int:
    """Multiply-add FLOPs (x2) of one sample's cross-attention in either order: forward, + backward if ``backward``."""
    h, d = heads, head_dim
    if not absorbed:
        return sum(_usual_order(lq, lk, din, h, d, image_grad, backward))
    small = 2 * h * lq * d * din  # one of Q W_k / (P X) W_v^T / dW_v / d(P X) / dQ / dW_k
    wide = 2 * h * lq * din * lk  # one of S / P X / dP / dA / each half of dX
    forward = 2 * small + 2 * wide
    # the backward: Q W_k, S and P X again, then the gradients
    return forward + (small + 2 * wide + 4 * small + 2 * wide + (2 * wide if image_grad else 0) if backward else 0)


def cheaper(
    lq: int, lk: int, din: int, heads: int, head_dim: int, image_grad: bool, backward: bool = True, rows: int = 1, images: int = 1
) -> bool:
    """Whether ``rows`` rows in the absorbed order do at most 3/4 of the usual order's work (smaller GEMMs run
    slower per FLOP), where the usual order projects each of ``images`` distinct images once (rows sharing
    an image share its K/V) and every row attends."""
    args = (lq, lk, din, heads, head_dim, image_grad)
    project, attend = _usual_order(*args, backward)
    return 4 * rows * flops(*args, absorbed=True, backward=backward) <= 3 * (images * project + rows * attend)


def _by_head(t: torch.Tensor, heads: int, lq: int) -> torch.Tensor:
    # (B, H * Lq, N) -> (H, B * Lq, N), a copy: the per-head weight products batch over heads
    batch, _, n = t.shape
    return t.view(batch, heads, lq, n).transpose(0, 1).reshape(heads, batch * lq, n)


def _by_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    # (H, B * Lq, N) -> (B, H * Lq, N), a copy: the image products batch over samples
    heads, rows, n = t.shape
    return t.view(heads, batch, rows // batch, n).transpose(0, 1).reshape(batch, heads * (rows // batch), n)


def _probabilities(q, x, key_valid, wk, scale):
    """(Q W_k per head as (B, H * Lq, Din), masked scores (B, H * Lq, Lk), q by head (H, B * Lq, D))."""
    batch, lq, heads, dim = q.shape
    qh = q.permute(2, 0, 1, 3).reshape(heads, batch * lq, dim)
    a = _by_sample(torch.bmm(qh, wk.view(heads, dim, -1)), batch)
    scores = torch.baddbmm(a.new_empty(()).expand(batch, heads * lq, x.shape[1]), a, x.transpose(1, 2), beta=0.0, alpha=scale)
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, None, :], float("-inf"))
    return a, scores, qh


class _AbsorbedCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, x, key_valid, kv_weight, kv_bias, scale: float, dropout_p: float, seed: int):
        batch, lq, heads, dim = q.shape
        width = heads * dim
        wk, wv = kv_weight[:width], kv_weight[width:]
        _, probs, _ = _probabilities(q, x, key_valid, wk, scale)
        row_max = probs.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # a row that sees nothing
        probs.sub_(row_max).exp_()
        row_sum = probs.sum(dim=-1, keepdim=True)
        lse = row_max + row_sum.log()  # -inf for a row that sees nothing
        drop = None
        if dropout_p > 0.0:
            drop = drop_mask_from_seed(seed, probs.shape, dropout_p, probs.device)
            probs.masked_fill_(drop, 0.0)
        keep_scale = 1.0 / (1.0 - dropout_p)
        probs.mul_(torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum)).reciprocal_().mul_(keep_scale))
        out = torch.bmm(_by_head(torch.bmm(probs, x), heads, lq), wv.view(heads, dim, -1).transpose(1, 2))
        if kv_bias is not None:
            out.add_(_by_head(probs.sum(-1, keepdim=True), heads, lq) * kv_bias[width:].view(heads, 1, dim))
        ctx.save_for_backward(q, x, key_valid, kv_weight, kv_bias, lse, mask_to_save(drop) if drop is not None else None)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return out.view(heads, batch, lq, dim).permute(1, 2, 0, 3).contiguous()

    @staticmethod
    def backward(ctx, dout):
        q, x, key_valid, kv_weight, kv_bias, lse, packed_drop = ctx.saved_tensors
        batch, lq, heads, dim = q.shape
        width = heads * dim
        wk, wv = kv_weight[:width], kv_weight[width:]
        keep_scale = 1.0 / (1.0 - ctx.dropout_p)
        a, probs, qh = _probabilities(q, x, key_valid, wk, ctx.scale)
        probs.sub_(torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))).exp_()  # P, undropped
        drop = None
        if ctx.dropout_p > 0.0:
            shape = probs.shape
            drop = saved_mask(packed_drop, shape, lambda: drop_mask_from_seed(ctx.seed, shape, ctx.dropout_p, probs.device))
        kept = probs.masked_fill(drop, 0.0).mul_(keep_scale) if drop is not None else probs
        doh = dout.permute(2, 0, 1, 3).reshape(heads, batch * lq, dim)  # (H, B * Lq, D)
        pxh = _by_head(torch.bmm(kept, x), heads, lq)  # (H, B * Lq, Din), recomputed
        dweight = torch.empty_like(kv_weight)
        torch.bmm(doh.transpose(1, 2), pxh, out=dweight[width:].view(heads, dim, -1))  # dW_v
        dpx = _by_sample(torch.bmm(doh, wv.view(heads, dim, -1)), batch)  # (B, H * Lq, Din)
        dkept = torch.bmm(dpx, x.transpose(1, 2))  # (B, H * Lq, Lk)
        dbias = None
        if kv_bias is not None:
            dkept.add_(_by_sample((doh * kv_bias[width:].view(heads, 1, dim)).sum(-1, keepdim=True), batch))
            rows = _by_head(kept.sum(-1, keepdim=True), heads, lq)  # (H, B * Lq, 1)
            dbias = torch.cat([torch.zeros_like(kv_bias[:width]), (rows * doh).sum(1).reshape(width)])
        dprobs = dkept.masked_fill_(drop, 0.0).mul_(keep_scale) if drop is not None else dkept
        dscores = dprobs.sub_((probs * dprobs).sum(-1, keepdim=True)).mul_(probs)  # softmax backward
        dah = _by_head(torch.bmm(dscores, x), heads, lq).mul_(ctx.scale)  # (H, B * Lq, Din)
        dq = torch.bmm(dah, wk.view(heads, dim, -1).transpose(1, 2))  # (H, B * Lq, D)
        torch.bmm(qh.transpose(1, 2), dah, out=dweight[:width].view(heads, dim, -1))  # dW_k
        dx = None
        if ctx.needs_input_grad[1]:
            dx = torch.baddbmm(torch.bmm(kept.transpose(1, 2), dpx), dscores.transpose(1, 2), a, alpha=ctx.scale)
        dq = dq.view(heads, batch, lq, dim).permute(1, 2, 0, 3)
        return dq, dx, None, dweight, dbias, None, None, None


def absorbed_cross_attention(q, x, key_valid, kv_weight, kv_bias, scale: float, dropout_p: float = 0.0):
    """softmax(scale q K^T, key mask) V with K, V = x @ kv_weight^T + kv_bias split in halves, without forming K or V.

    q: (B, Lq, H, D) projected queries; x: (B, Lk, Din) image tokens; key_valid: (B, Lk) bool or None;
    kv_weight: (2 H D, Din), the fused K/V weight (``projections.py``); kv_bias: (2 H D,) or None.
    Returns (B, Lq, H, D); a row that sees no key gives zeros. Gradients reach q, x, kv_weight and kv_bias.
    """
    seed = draw_seed() if dropout_p > 0.0 else 0
    return _AbsorbedCrossAttention.apply(q, x, key_valid, kv_weight, kv_bias, float(scale), float(dropout_p), seed)


__all__ = ["absorbed_cross_attention", "cheaper", "flops"]
