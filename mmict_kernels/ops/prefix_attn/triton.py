"""Triton kernels for demo-prefix attention, forward and backward, as torch.library custom ops.

Each row ``b`` attends to [prefix of its group ``prefix_ids[b]`` ; its own keys] in ONE
online-softmax pass: the kernel walks the group's prefix blocks (read in place from the
(G, Lp, Hkv, D) cache, never gathered, concatenated or repeated per row or per head) and
then the row's own key blocks, merging both into the same running max / sum.

Layout of the work:

* Grouped-query attention is handled by *packing*: the query heads that share one K/V head
  are interleaved into the rows of one M tile (packed row ``r`` = query ``r // GQ``, head
  ``hkv * GQ + r % GQ``). Every K/V block is then loaded once for all of its query heads,
  and a decode step (Lq = 1) still fills a 16-row tile with GQ heads instead of one row.
* Masks are computed from indices, never loaded: prefix key ``j`` is visible iff
  ``j < prefix_lengths[g]``; own key ``j`` iff ``j >= Lk - seqlens_k[b]`` (left padding)
  and, when causal, ``j <= i + Lk - Lq`` (bottom-right aligned). Own-key blocks that are
  entirely masked (left padding, above the diagonal) and prefix blocks past the group's
  length are never visited.
* Backward is FlashAttention-2 style: probabilities are recomputed from the saved
  log-sum-exp, ``delta = rowsum(out * dout)`` is precomputed, one kernel gives dq
  (loop over key blocks) and one gives dk/dv (loop over the packed query rows, which also
  sums over the query heads sharing a K/V head, without atomics). The dk/dv grid runs the
  key blocks of one (row, kv head) next to each other, so the programs that read the same
  Q, dO, lse and delta rows share them in L2.
* Prefix gradients must be summed over every row of a group. Default: each
  (row, kv head, prefix block) program adds its share into a float32 buffer with relaxed
  atomics (only the sum matters, so no memory ordering is asked for): fast, but the order of the additions varies, so dprefix_k / dprefix_v are NOT bitwise
  reproducible (they agree to float32 rounding). ``deterministic=True``: each program
  writes its share to a per-row float32 buffer and a second kernel sums the rows of each
  group in row order, so every result is bitwise identical from run to run (costs
  B x Lp x Hkv x D x 4 bytes per tensor of scratch). dq, dk and dv never use atomics.

Precision follows the reference: matmuls on the input dtype with float32 accumulation
(float32 inputs use IEEE float32 dots, not TF32), softmax in float32, probabilities cast
to the input dtype before the PV product. A query that sees no key at all gives out = 0,
lse = -inf and zero gradients. Supported: float16, bfloat16, float32; head dims 32, 64,
128 (the front-end's backend registry refuses anything else). ``lse`` is not differentiated
(the package-wide rule). No dropout. No double backward.

Bounds: a group id outside [0, G) reads no prefix, lengths are clamped into the tensors: with
value checks off, no input makes a kernel read or write outside its tensors.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import triton_toolkit as tk
from ..triton_toolkit import LN2, LOG2E, cast, dot


# ---------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------
@triton.jit
def _group_of_row(PREFIX_IDS, PREFIX_LENS, b, num_groups, len_p, HAS_PLEN: tl.constexpr):
    """(group g of row b, its valid prefix tokens), both clamped into the cache: a group id
    outside [0, G) reads no prefix (length 0) and lengths are clamped to [0, Lp], so no value a
    caller passes with value checks off makes a kernel read or write outside its tensors."""
    g = tl.load(PREFIX_IDS + b)
    valid = (g >= 0) & (g < num_groups)
    g = tl.where(valid, g, 0)
    if HAS_PLEN:
        plen = tl.minimum(tl.maximum(tl.load(PREFIX_LENS + g), 0), len_p)
    else:
        plen = len_p + g * 0
    return g, tl.where(valid, plen, 0)


@triton.jit
def _own_start(SEQLENS, b, len_k, HAS_SEQLENS: tl.constexpr):
    """First valid own key of row b: left padding, so the first len_k - seqlens_k[b] keys are invalid."""
    if HAS_SEQLENS:
        own_lo = len_k - tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), len_k)
    else:
        own_lo = 0
    return own_lo


@triton.jit
def _row_of(pid_bh, heads, GQ: tl.constexpr):
    """(row b as int64, K/V head hkv) of program pid_bh over B * Hkv."""
    kv_heads = heads // GQ
    return (pid_bh // kv_heads).to(tl.int64), pid_bh % kv_heads


@triton.jit
def _packed_rows(m0, len_q, hkv, GQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed GQA rows m0 .. m0 + BLOCK_M - 1 of K/V head hkv: (valid, query i, head h), row r
    being query r // GQ of head hkv * GQ + r % GQ."""
    rows = m0 + tl.arange(0, BLOCK_M)
    return rows < len_q * GQ, rows // GQ, hkv * GQ + rows % GQ


@triton.jit
def _load_rows(X, b, i_pos, h, stride_b, stride_m, stride_h, offs_d, valid):
    """(rows, HEAD_DIM) tile of (query i_pos, head h) pairs of row b (int64) of a (B, Lq, H, D) tensor."""
    ptrs = X + b * stride_b + i_pos[:, None] * stride_m + h[:, None] * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None], other=0.0)


@triton.jit
def _contiguous_rows(b, i_pos, h, len_q, heads, HEAD_DIM: tl.constexpr):
    """Offsets of the (query i_pos, head h) rows of row b (int64) in a contiguous (B, Lq, H, D) tensor."""
    return ((b * len_q + i_pos) * heads + h) * HEAD_DIM


@triton.jit
def _store_rows(X, b, i_pos, h, len_q, heads, offs_d, valid, x, HEAD_DIM: tl.constexpr):
    """x into the (query i_pos, head h) rows of row b of a contiguous (B, Lq, H, D) tensor."""
    rows = _contiguous_rows(b, i_pos, h, len_q, heads, HEAD_DIM)
    tl.store(X + rows[:, None] + offs_d[None, :], cast(x, X.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _load_keys(base, cols, stride_n, offs_d, ok):
    """(BLOCK_N, HEAD_DIM) key (or value) tile ``cols`` of one head; keys not ``ok`` read 0."""
    return tl.load(base + cols[:, None] * stride_n + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _row_stats(LSE, DELTA, b, h, i_pos, heads, len_q, valid):
    """(lse in base-2 units, delta) of (query i_pos, head h) of row b; LSE and DELTA are contiguous (B, H, Lq).

    lse = -inf (the query sees nothing) becomes 0, so that exp2(masked - lse) stays 0."""
    off = (b * heads + h) * len_q + i_pos
    lse = tl.load(LSE + off, mask=valid, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse * LOG2E), tl.load(DELTA + off, mask=valid, other=0.0)


@triton.jit
def _own_keys_seen(pid_m, len_q, len_k, CAUSAL: tl.constexpr, GQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """(diag, n_end): own key j is visible to query i iff j <= i + diag (bottom-right causal
    alignment, or never binding), and no query of tile pid_m sees an own key >= n_end."""
    if CAUSAL:
        diag = len_k - len_q
        last_i = tl.minimum(len_q - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // GQ)
        n_end = tl.minimum(len_k, last_i + diag + 1)
    else:
        diag = len_k
        n_end = len_k
    return diag, n_end


@triton.jit
def _query_block(
    Q, PREFIX_IDS, PREFIX_LENS, SEQLENS, sqb, sqm, sqh, len_q, len_k, len_p, num_groups, heads,
    GQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_PLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr,
):  # fmt: skip
    """The start of a program over (row x kv head, packed query block) = program ids (0, 1): (row b,
    kv head hkv, group g, its prefix length, the first valid own key, the packed rows, the Q tile).
    B * Hkv is on axis 0 because CUDA caps axes 1 and 2 at 65535 programs."""
    b, hkv = _row_of(tl.program_id(0), heads, GQ)
    g, plen = _group_of_row(PREFIX_IDS, PREFIX_LENS, b, num_groups, len_p, HAS_PLEN)
    own_lo = _own_start(SEQLENS, b, len_k, HAS_SEQLENS)
    row_valid, i_pos, h = _packed_rows(tl.program_id(1) * BLOCK_M, len_q, hkv, GQ, BLOCK_M)
    q = _load_rows(Q, b, i_pos, h, sqb, sqm, sqh, tl.arange(0, HEAD_DIM), row_valid)
    return b, hkv, g, plen, own_lo, row_valid, i_pos, h, q


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _fwd_key_range(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, n_begin, n_end, lo, hi, diag, i_pos, offs_n, offs_d, qk_scale,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [n_begin, n_end): key j visible iff lo <= j < hi and j <= i + diag.

    m_i is kept in base-2 units of the scaled scores (qk_scale includes log2(e)).
    """
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + offs_n
        in_range = (cols >= lo) & (cols < hi)
        k = _load_keys(k_base, cols, stride_kn, offs_d, in_range)
        s = dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        visible = in_range[None, :] & (cols[None, :] <= i_pos[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_keys(v_base, cols, stride_vn, offs_d, in_range)
        acc = dot(cast(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefix_attn_fwd_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, PREFIX_LENS, SEQLENS, OUT, LSE,
    sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, spkg, spkn, spkh, spvg, spvn, spvh,
    len_q, len_k, len_p, num_groups, heads, qk_scale,
    GQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(1)
    b, hkv, g, plen, own_lo, row_valid, i_pos, h, q = _query_block(
        Q, PREFIX_IDS, PREFIX_LENS, SEQLENS, sqb, sqm, sqh, len_q, len_k, len_p, num_groups, heads,
        GQ, HEAD_DIM, BLOCK_M, HAS_PLEN, HAS_SEQLENS,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # 1) the group's shared prefix, read in place: fully visible up to its length (diag = Lp never binds).
    acc, m_i, l_i = _fwd_key_range(
        acc, m_i, l_i, q, PK + g * spkg + hkv * spkh, PV + g * spvg + hkv * spvh, spkn, spvn,
        0, plen, 0, plen, len_p, i_pos, offs_n, offs_d, qk_scale, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    # 2) the row's own keys: start at the first block holding a valid (non-padding) key and,
    #    when causal, stop after the last key the tile's last query can see.
    diag, n_end = _own_keys_seen(pid_m, len_q, len_k, CAUSAL, GQ, BLOCK_M)
    n_begin = (own_lo // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_key_range(
        acc, m_i, l_i, q, K + b * skb + hkv * skh, V + b * svb + hkv * svh, skn, svn,
        n_begin, n_end, own_lo, len_k, diag, i_pos, offs_n, offs_d, qk_scale, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0  # nothing visible: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)  # base 2 -> natural log
    _store_rows(OUT, b, i_pos, h, len_q, heads, offs_d, row_valid, out, HEAD_DIM)
    tl.store(LSE + (b * heads + h) * len_q + i_pos, lse, mask=row_valid)  # LSE is contiguous (B, H, Lq)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(OUT, DO, DELTA, sdb, sdm, sdh, len_q, heads, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta[b, h, i] = sum_d out * dout: the softmax-backward row term."""
    b, h = _row_of(tl.program_id(0), heads, 1)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = i < len_q
    offs_d = tl.arange(0, HEAD_DIM)
    out_rows = _contiguous_rows(b, i, h, len_q, heads, HEAD_DIM)
    o = tl.load(OUT + out_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + i[:, None] * sdm + offs_d[None, :], mask=valid[:, None], other=0.0)
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + (b * heads + h) * len_q + i, delta, mask=valid)


@triton.jit
def _dq_key_range(
    dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, n_begin, n_end, lo, hi, diag, i_pos, offs_n, offs_d,
    qk_scale, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + offs_n
        in_range = (cols >= lo) & (cols < hi)
        k = _load_keys(k_base, cols, stride_kn, offs_d, in_range)
        v = _load_keys(v_base, cols, stride_vn, offs_d, in_range)
        s = dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
        visible = in_range[None, :] & (cols[None, :] <= i_pos[:, None] + diag)
        p = tl.where(visible, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v), None, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = dot(cast(ds, k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.jit
def _prefix_attn_bwd_dq_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, PREFIX_LENS, SEQLENS, DO, LSE, DELTA, DQ,
    sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, spkg, spkn, spkh, spvg, spvn, spvh, sdb, sdm, sdh,
    len_q, len_k, len_p, num_groups, heads, qk_scale, sm_scale,
    GQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(1)
    b, hkv, g, plen, own_lo, row_valid, i_pos, h, q = _query_block(
        Q, PREFIX_IDS, PREFIX_LENS, SEQLENS, sqb, sqm, sqh, len_q, len_k, len_p, num_groups, heads,
        GQ, HEAD_DIM, BLOCK_M, HAS_PLEN, HAS_SEQLENS,
    )  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    do = _load_rows(DO, b, i_pos, h, sdb, sdm, sdh, offs_d, row_valid)
    lse2, delta = _row_stats(LSE, DELTA, b, h, i_pos, heads, len_q, row_valid)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_key_range(
        dq, q, do, lse2, delta, PK + g * spkg + hkv * spkh, PV + g * spvg + hkv * spvh, spkn, spvn,
        0, plen, 0, plen, len_p, i_pos, offs_n, offs_d, qk_scale, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    diag, n_end = _own_keys_seen(pid_m, len_q, len_k, CAUSAL, GQ, BLOCK_M)
    dq = _dq_key_range(
        dq, q, do, lse2, delta, K + b * skb + hkv * skh, V + b * svb + hkv * svh, skn, svn,
        (own_lo // BLOCK_N) * BLOCK_N, n_end, own_lo, len_k, diag, i_pos, offs_n, offs_d, qk_scale, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    _store_rows(DQ, b, i_pos, h, len_q, heads, offs_d, row_valid, dq * sm_scale, HEAD_DIM)


@triton.jit
def _dkdv_query_range(
    k, v, cols, in_range, Q, DO, LSE, DELTA, b, hkv, sqb, sqm, sqh, sdb, sdm, sdh, m_begin, m_end, len_q, heads, diag,
    qk_scale, GQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv (unscaled dk) of one key block over packed query rows [m_begin, m_end) of row b.

    Works on transposed scores (keys x queries) so no probability tile is ever transposed.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        row_valid, i_pos, h = _packed_rows(m0, len_q, hkv, GQ, BLOCK_M)
        q = _load_rows(Q, b, i_pos, h, sqb, sqm, sqh, offs_d, row_valid)
        do = _load_rows(DO, b, i_pos, h, sdb, sdm, sdh, offs_d, row_valid)
        lse2, delta = _row_stats(LSE, DELTA, b, h, i_pos, heads, len_q, row_valid)
        s_t = dot(k, tl.trans(q), None, DOT_PRECISION) * qk_scale
        visible = in_range[:, None] & row_valid[None, :] & (cols[:, None] <= i_pos[None, :] + diag)
        p_t = tl.where(visible, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv = dot(cast(p_t, do.dtype), do, dv, DOT_PRECISION)
        dp_t = dot(v, tl.trans(do), None, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dot(cast(ds_t, q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
    Q, K, V, PK, PV, PREFIX_IDS, PREFIX_LENS, SEQLENS, DO, LSE, DELTA, DK, DV, DPK, DPV,
    sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, spkg, spkn, spkh, spvg, spvn, spvh, sdb, sdm, sdh,
    len_q, len_k, len_p, num_groups, heads, n_prefix_blocks, qk_scale, sm_scale,
    GQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PLEN: tl.constexpr, HAS_SEQLENS: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCKS_ON_X: tl.constexpr,
):  # fmt: skip
    """One program per (key block, row, kv head): the first n_prefix_blocks key blocks are the
    group's prefix (this row's share of its gradient), the rest are the row's own keys.

    BLOCKS_ON_X: the grid is (key blocks, B * Hkv), so the key blocks of one (row, kv head), which
    all read that row's Q, dO, lse and delta, are launched side by side and share them in L2.
    Otherwise (B * Hkv, key blocks), for B * Hkv beyond the 65535 programs CUDA allows on axis 1."""
    if BLOCKS_ON_X:
        pid_n = tl.program_id(0)
        b, hkv = _row_of(tl.program_id(1), heads, GQ)
    else:
        pid_n = tl.program_id(1)
        b, hkv = _row_of(tl.program_id(0), heads, GQ)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_rows = len_q * GQ
    kv_row = (heads // GQ) * HEAD_DIM  # DK/DV/DPK/DPV are contiguous (.., L, Hkv, D)

    if pid_n < n_prefix_blocks:
        g, plen = _group_of_row(PREFIX_IDS, PREFIX_LENS, b, num_groups, len_p, HAS_PLEN)
        n0 = pid_n * BLOCK_N
        cols = n0 + offs_n
        in_range = cols < plen
        k = _load_keys(PK + g * spkg + hkv * spkh, cols, spkn, offs_d, in_range)
        v = _load_keys(PV + g * spvg + hkv * spvh, cols, spvn, offs_d, in_range)
        m_end = tl.where(n0 < plen, n_rows, 0)  # a block past the group's prefix length has no gradient
        dk, dv = _dkdv_query_range(
            k, v, cols, in_range, Q, DO, LSE, DELTA, b, hkv, sqb, sqm, sqh, sdb, sdm, sdh, 0, m_end, len_q, heads, len_p,
            qk_scale, GQ, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        dk = dk * sm_scale
        if DETERMINISTIC:
            # This row's share goes to its own slot (B, Lp, Hkv, D); _sum_rows_by_group_kernel adds
            # the rows of each group in row order. Every column < Lp is written (zeros past plen).
            off = (b * len_p + cols)[:, None] * kv_row + hkv * HEAD_DIM + offs_d[None, :]
            tl.store(DPK + off, dk, mask=(cols < len_p)[:, None])
            tl.store(DPV + off, dv, mask=(cols < len_p)[:, None])
        else:
            # Only the sum matters, not the order or visibility of the additions: relaxed atomics
            # (no fences around each one, unlike the default acq_rel).
            off = (g * len_p + cols)[:, None] * kv_row + hkv * HEAD_DIM + offs_d[None, :]
            tl.atomic_add(DPK + off, dk, mask=in_range[:, None], sem="relaxed")
            tl.atomic_add(DPV + off, dv, mask=in_range[:, None], sem="relaxed")
    else:
        own_lo = _own_start(SEQLENS, b, len_k, HAS_SEQLENS)
        n0 = (pid_n - n_prefix_blocks) * BLOCK_N
        cols = n0 + offs_n
        in_range = (cols >= own_lo) & (cols < len_k)
        k = _load_keys(K + b * skb + hkv * skh, cols, skn, offs_d, in_range)
        v = _load_keys(V + b * svb + hkv * svh, cols, svn, offs_d, in_range)
        if CAUSAL:
            diag = len_k - len_q
            first_i = tl.maximum(n0 - diag, 0)  # earlier queries cannot see this block
            m_begin = ((first_i * GQ) // BLOCK_M) * BLOCK_M
        else:
            diag = len_k
            m_begin = 0
        m_end = tl.where(n0 + BLOCK_N <= own_lo, 0, n_rows)  # all left padding: skip
        dk, dv = _dkdv_query_range(
            k, v, cols, in_range, Q, DO, LSE, DELTA, b, hkv, sqb, sqm, sqh, sdb, sdm, sdh, m_begin, m_end, len_q, heads, diag,
            qk_scale, GQ, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        off = (b * len_k + cols)[:, None] * kv_row + hkv * HEAD_DIM + offs_d[None, :]
        tl.store(DK + off, cast(dk * sm_scale, DK.dtype.element_ty), mask=(cols < len_k)[:, None])
        tl.store(DV + off, cast(dv, DV.dtype.element_ty), mask=(cols < len_k)[:, None])


@triton.jit
def _sum_rows_by_group_kernel(PART, PREFIX_IDS, OUT, batch, row_numel, BLOCK: tl.constexpr):
    """OUT[g] = sum over b with prefix_ids[b] == g of PART[b], always added in increasing b."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.program_id(1)
    acc = tl.zeros([BLOCK], tl.float32)
    part = PART + offs
    for b in range(0, batch):
        limit = tl.where(tl.load(PREFIX_IDS + b) == g, row_numel, 0)  # rows of other groups load nothing
        acc += tl.load(part, mask=offs < limit, other=0.0)
        part += row_numel  # pointer walk: no b * row_numel product to overflow int32
    tl.store(OUT + g.to(tl.int64) * row_numel + offs, cast(acc, OUT.dtype.element_ty), mask=offs < row_numel)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def tiles_for(
    dtype: torch.dtype, head_dim: int, packed_rows: int, backward: bool, arch: tuple[int, int] | None = None
) -> tk.Tiles:
    """Tiles of the attention kernels (the delta and group-sum kernels use their own 1-D blocks).

    Chosen by compiling every kernel for sm_90 and sm_80 (the compile-only harness,
    ``mmict_kernels.testing``) and reading ptxas' register use: the largest tiles with no register
    spills (not timed on a GPU yet). The M tile shrinks to the packed rows for short decode rows
    (min 16, the smallest tl.dot). float32 (IEEE dots run on FMA units, operands live in registers)
    needs much smaller tiles than 16-bit MMA. ``arch``: the compute capability launches compile for
    (``triton_toolkit.capability``); before sm_90 (A100: MMA operands in registers, no wgmma) some
    16-bit tiles shrink, see :func:`_sm80_tiles`. Tests shrink them with
    :func:`~mmict_kernels.ops.triton_toolkit.force_tiles`.
    """
    rows = max(16, triton.next_power_of_2(packed_rows))
    if dtype == torch.float32:
        tiles = tk.Tiles(min(32, rows), 16, 8, 1 if backward else 2)
    elif backward and head_dim == 128:
        # dK/dV holds a key block's K, V and their float32 gradients: 64 keys x 128 dims spilled
        # (255 registers, 44/76 B spill stores/loads at llm2048); 32 keys fit in 146 registers.
        # Short rows (16-row tiles, the MMICT step): 32-key tiles compile with a small spill under
        # Triton 3.6 (dQ 80 registers, 8/4 B; dK/dV 168, 4/4 B), 16-key tiles with none (80 / 126).
        block_m = min(64, rows)
        tiles = tk.Tiles(block_m, 16 if block_m == 16 else 32, 8 if block_m == 64 else 4, 2)
    elif backward:
        tiles = tk.Tiles(min(64, rows), 64, 4, 2)
    else:
        block_m = min(128, rows)
        tiles = tk.Tiles(block_m, 64, 8 if block_m == 128 else 4, 3)
    if arch is not None and arch < (9, 0) and dtype != torch.float32:
        tiles = _sm80_tiles(tiles, head_dim, backward)
    return tk.apply_forced(tiles)


def _sm80_tiles(tiles: tk.Tiles, head_dim: int, backward: bool) -> tk.Tiles:
    """The sm_90 tiles that spill on sm_80, shrunk (ptxas, Triton 3.9, bf16; spill stores/loads per thread).

    Forward at D = 128: 64-row tiles with 4 warps reached 255 registers (32/32 B; GQA-4 36/24 B), 8
    warps fit in 178; 16- and 32-row tiles with 64 keys spilled 4/4 B (8/8 B under Triton 3.6),
    32 keys fit in 96. Backward at D = 128: the deterministic dK/dV with 32 keys capped at 128
    registers (16/12 B), 16 keys fit in 100 (dQ 172); at D = 64 with 64 keys, GQ = 7's dQ and
    dK/dV reached 255 (up to 56/60 B), 32 keys fit in 184.
    """
    if not backward and head_dim == 128:
        if tiles.block_m == 64:
            return dataclasses.replace(tiles, num_warps=8)
        if tiles.block_m <= 32:
            return dataclasses.replace(tiles, block_n=32)
    if backward and tiles.block_m == 64:
        if head_dim == 128:
            return dataclasses.replace(tiles, block_n=16)
        if head_dim == 64:
            return dataclasses.replace(tiles, block_n=32)
    return tiles


DELTA_ROWS = 64  # rows per program of the delta kernel
MAX_GRID_YZ = 65535  # programs CUDA allows along grid axes 1 and 2
GROUP_SUM_BLOCK = 1024  # elements per program of the deterministic group sum


def _flags(q, prefix_lengths, seqlens_k, causal, gq, tiles) -> dict:
    """The constexpr arguments and launch options the three attention kernels share."""
    return dict(GQ=gq, HEAD_DIM=q.shape[-1], BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, CAUSAL=causal,
                HAS_PLEN=prefix_lengths is not None, HAS_SEQLENS=seqlens_k is not None,
                DOT_PRECISION=tk.dot_precision(q.dtype), **tiles.launch())  # fmt: skip


def _inputs(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k) -> tuple:
    """The leading pointer arguments of the attention kernels (unused optional tensors become placeholders, never read)."""
    return (
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_ids,
        tk.pointer_or(prefix_lengths, prefix_ids),
        tk.pointer_or(seqlens_k, prefix_ids),
    )


def _fwd(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, causal, scale):
    tk.check_attention_inputs("prefix_attention", q)
    batch, len_q, heads, head_dim = q.shape
    len_k, kv_heads = k.shape[1], k.shape[2]
    num_groups, len_p = prefix_k.shape[0], prefix_k.shape[1]
    gq = heads // kv_heads
    out = torch.empty((batch, len_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, len_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    tiles = tiles_for(q.dtype, head_dim, len_q * gq, backward=False, arch=tk.capability(q.device))
    _prefix_attn_fwd_kernel[(batch * kv_heads, triton.cdiv(len_q * gq, tiles.block_m))](
        *_inputs(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k), out, lse,
        *tk.strides(q), *tk.strides(k), *tk.strides(v), *tk.strides(prefix_k), *tk.strides(prefix_v),
        len_q, len_k, len_p, num_groups, heads, scale * LOG2E.value,
        **_flags(q, prefix_lengths, seqlens_k, causal, gq, tiles),
    )  # fmt: skip
    return out, lse


def _bwd(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, out, lse, causal, scale, deterministic):
    batch, len_q, heads, head_dim = q.shape
    len_k, kv_heads = k.shape[1], k.shape[2]
    num_groups, len_p = prefix_k.shape[0], prefix_k.shape[1]
    gq = heads // kv_heads
    dev = q.device
    dq = torch.empty((batch, len_q, heads, head_dim), dtype=q.dtype, device=dev)
    dk = torch.empty((batch, len_k, kv_heads, head_dim), dtype=k.dtype, device=dev)
    dv = torch.empty_like(dk)
    prefix_shape = (num_groups, len_p, kv_heads, head_dim)
    if batch * kv_heads * head_dim == 0 or len_q == 0:
        # No query: nothing flows anywhere.
        z = lambda shape, dt: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
        return dq, z(dk.shape, k.dtype), z(dv.shape, v.dtype), z(prefix_shape, prefix_k.dtype), z(prefix_shape, prefix_v.dtype)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()

    delta = torch.empty((batch, heads, len_q), dtype=torch.float32, device=dev)
    _bwd_delta_kernel[(batch * heads, triton.cdiv(len_q, DELTA_ROWS))](
        out, dout, delta, *tk.strides(dout), len_q, heads, HEAD_DIM=head_dim, BLOCK=DELTA_ROWS, num_warps=4
    )

    inputs = _inputs(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k)
    strides = (*tk.strides(q), *tk.strides(k), *tk.strides(v), *tk.strides(prefix_k), *tk.strides(prefix_v), *tk.strides(dout))
    tiles = tiles_for(q.dtype, head_dim, len_q * gq, backward=True, arch=tk.capability(q.device))
    flags = _flags(q, prefix_lengths, seqlens_k, causal, gq, tiles)
    qk_scale = scale * LOG2E.value
    _prefix_attn_bwd_dq_kernel[(batch * kv_heads, triton.cdiv(len_q * gq, tiles.block_m))](
        *inputs, dout, lse, delta, dq, *strides, len_q, len_k, len_p, num_groups, heads, qk_scale, scale, **flags
    )

    # Prefix gradients accumulate in float32: per group with atomics, or per row then summed in order.
    scratch_rows = batch if deterministic else num_groups
    alloc = torch.empty if deterministic else torch.zeros  # the per-row kernel writes every element
    dpk32 = alloc((scratch_rows, len_p, kv_heads, head_dim), dtype=torch.float32, device=dev)
    dpv32 = alloc((scratch_rows, len_p, kv_heads, head_dim), dtype=torch.float32, device=dev)
    n_prefix_blocks = triton.cdiv(len_p, tiles.block_n)
    n_blocks = n_prefix_blocks + triton.cdiv(len_k, tiles.block_n)  # key blocks of one (row, kv head)
    blocks_on_x = batch * kv_heads <= MAX_GRID_YZ  # key blocks fastest: neighbours share Q / dO in L2
    grid = (n_blocks, batch * kv_heads) if blocks_on_x else (batch * kv_heads, n_blocks)
    if n_blocks > 0:
        _prefix_attn_bwd_dkdv_kernel[grid](
            *inputs, dout, lse, delta, dk, dv, dpk32, dpv32, *strides,
            len_q, len_k, len_p, num_groups, heads, n_prefix_blocks, qk_scale, scale,
            DETERMINISTIC=deterministic, BLOCKS_ON_X=blocks_on_x, **flags,
        )  # fmt: skip

    if deterministic:
        dpk = torch.empty(prefix_shape, dtype=prefix_k.dtype, device=dev)
        dpv = torch.empty(prefix_shape, dtype=prefix_v.dtype, device=dev)
        row_numel = len_p * kv_heads * head_dim
        if row_numel > 0:
            reduce_grid = (triton.cdiv(row_numel, GROUP_SUM_BLOCK), num_groups)
            _sum_rows_by_group_kernel[reduce_grid](dpk32, prefix_ids, dpk, batch, row_numel, BLOCK=GROUP_SUM_BLOCK)
            _sum_rows_by_group_kernel[reduce_grid](dpv32, prefix_ids, dpv, batch, row_numel, BLOCK=GROUP_SUM_BLOCK)
    else:
        dpk, dpv = dpk32.to(prefix_k.dtype), dpv32.to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv


# ---------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile; fake kernels give the shapes)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("mmict::prefix_attention_triton_fwd", mutates_args=())
def prefix_attention_triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_ids: torch.Tensor,
    prefix_lengths: torch.Tensor | None,
    seqlens_k: torch.Tensor | None,
    causal: bool,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). ``deterministic`` only matters to the backward (it is an input so autograd sees it)."""
    return _fwd(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, causal, scale)


@prefix_attention_triton_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, causal, scale, deterministic):
    batch, len_q, heads, head_dim = q.shape
    return q.new_empty((batch, len_q, heads, head_dim)), q.new_empty((batch, heads, len_q), dtype=torch.float32)


@torch.library.custom_op("mmict::prefix_attention_triton_bwd", mutates_args=())
def prefix_attention_triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_ids: torch.Tensor,
    prefix_lengths: torch.Tensor | None,
    seqlens_k: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v); dprefix_* summed over the rows of each group."""
    return _bwd(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, out, lse, causal, scale, deterministic)


@prefix_attention_triton_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, out, lse, causal, scale, deterministic):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        prefix_k.new_empty(prefix_k.shape),
        prefix_v.new_empty(prefix_v.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, causal, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, out, lse)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic
    ctx.mark_non_differentiable(lse)  # a statistic, as on every backend (ops/__init__.py)


def _backward(ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    grads = prefix_attention_triton_bwd(
        dout,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        prefix_ids,
        prefix_lengths,
        seqlens_k,
        out,
        lse,
        ctx.causal,
        ctx.scale,
        ctx.deterministic,
    )
    return (*grads, None, None, None, None, None, None)


prefix_attention_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention_triton(q, k, v, prefix_k, prefix_v, prefix_ids, causal, scale, prefix_lengths, seqlens_k, deterministic):
    """Backend entry point for :func:`mmict_kernels.ops.prefix_attention` (inputs already validated).

    Returns (out (B, Lq, H, D) in q's dtype, lse (B, H, Lq) float32). Differentiable w.r.t. q, k,
    v, prefix_k, prefix_v (lse is a statistic, not differentiated). With ``deterministic=False`` the prefix gradients
    are summed with float32 atomics (not bitwise reproducible); ``True`` makes every gradient
    bitwise reproducible.
    """
    return prefix_attention_triton_fwd(
        q, k, v, prefix_k, prefix_v, prefix_ids, prefix_lengths, seqlens_k, bool(causal), float(scale), bool(deterministic)
    )
