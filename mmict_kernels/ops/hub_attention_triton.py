"""Triton attention kernels shared by the M-Hub ops (cross-attention and self-attention).

``hub_cross_attention/triton.py`` and ``hub_self_attention/triton.py`` wrap these kernels as
the custom ops ``mmict::hub_{cross,self}_attention_triton_{fwd,bwd}``; the shared conventions
(constants, dots, casts, tiles, device facts) come from :mod:`mmict_kernels.ops.triton_toolkit`.

One forward kernel and a FlashAttention-2 style backward (delta preprocess, a dK/dV kernel
over key blocks and a dQ kernel over query blocks) cover both ops, because both are
"each query row of sample b attends to a subset of sample b's keys":

- Key layout (``KEYS_*``): dense (B, Lk, H, D) with every key valid, dense with per-sample
  lengths (right padding), or packed (total_k, H, D) with ``cu_seqlens`` offsets.
- Mask mode (``MASK_*``): none (cross-attention, bidirectional self-attention), or the BLIP-2
  unimodal (ITC) / multimodal-causal (ITG) rules, computed from the row index, the key index
  and ``num_query_tokens``; no (L x L) mask tensor exists, and key (or query) blocks that the
  mode hides entirely are never visited.

Why these tile shapes: M-Hub's query side is short (32 learned queries, at most 32 more text
tokens), so query tiles are 16 to 64 rows, and the grid is (query blocks, B * H): 64 samples
x 12 heads already give 768 programs for 132 SMs. Grids are (blocks, H, B): neighbouring
programs share one head's K/V (or Q/dO) in L2, and B, H each stay under CUDA's 65535 limit. The backward does not use atomics: dK/dV
programs own a key block and loop over the few query blocks that see it, dQ programs own a
query block and loop over keys, so gradients are deterministic.

Dropout: Philox (``tl.rand``) keyed by a seed read from a 1-element int64 tensor (drawn from
torch's default generator by the caller, so ``torch.manual_seed`` reproduces it, and no
host sync or recompilation happens per step) and by the element's (b, h, q, k) offset; the
backward regenerates the same keep-mask, and :func:`dropout_keep_mask` exports it for tests.

Accumulation is float32; float32 inputs use IEEE matmuls (not TF32) so they meet the oracle.

Bounds: whatever ``cu_seqlens``/lengths hold (value checks off), a sample's key range is clamped
into the key tensor, so no kernel reads or writes outside its tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_toolkit as tk
from .triton_toolkit import LN2, LOG2E, cast, dot

# How a sample's keys are found (constexpr KEY_LAYOUT).
KEYS_DENSE = tl.constexpr(0)  # k: (B, Lk, H, D), all Lk keys valid
KEYS_DENSE_LENS = tl.constexpr(1)  # k: (B, Lk, H, D), the first key_len[b] keys valid (right padding)
KEYS_PACKED = tl.constexpr(2)  # k: (total_k, H, D), sample b owns rows cu_seqlens[b] : cu_seqlens[b + 1]

# Which (row, key) pairs may attend, besides key validity (constexpr MASK_MODE).
MASK_NONE = tl.constexpr(0)  # every valid key
MASK_UNIMODAL = tl.constexpr(1)  # rows < nq see keys < nq; other rows see keys >= nq
MASK_MM_CAUSAL = tl.constexpr(2)  # rows < nq see keys < nq; other rows i see keys < nq and keys j <= i


# ---------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------
@triton.jit
def _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT: tl.constexpr):
    """(first key row of sample b in K, number of valid keys of sample b), clamped into K's
    seq_len_k rows whatever the offsets or lengths hold (out-of-range values read nothing outside)."""
    if KEY_LAYOUT == KEYS_PACKED:
        start = tl.minimum(tl.maximum(tl.load(KEY_START + b), 0), seq_len_k)
        end = tl.minimum(tl.maximum(tl.load(KEY_START + b + 1), start), seq_len_k)
        length = end - start
    elif KEY_LAYOUT == KEYS_DENSE_LENS:
        start = b * 0
        length = tl.minimum(tl.maximum(tl.load(KEY_LEN + b), 0), seq_len_k)
    else:
        start = b * 0
        length = b * 0 + seq_len_k
    return start, length


@triton.jit
def _allowed(rows, cols, key_len, nq, MASK_MODE: tl.constexpr):
    """Boolean tile, True where row may attend to col; rows/cols come already broadcast-shaped."""
    ok = cols < key_len
    if MASK_MODE == MASK_UNIMODAL:
        ok = ok & ((rows < nq) == (cols < nq))
    elif MASK_MODE == MASK_MM_CAUSAL:
        key_is_query = cols < nq
        ok = ok & tl.where(rows < nq, key_is_query, key_is_query | (cols <= rows))
    return ok


@triton.jit
def _visible_keys(m0, key_len, nq, BLOCK_M: tl.constexpr, MASK_MODE: tl.constexpr):
    """[lo, hi): the keys that rows m0 .. m0 + BLOCK_M - 1 can see (the rest is skipped)."""
    lo = key_len * 0  # key_len is a tensor (see _visible_rows)
    hi = key_len
    if MASK_MODE == MASK_UNIMODAL:
        if m0 + BLOCK_M <= nq:  # only query rows: query keys
            hi = tl.minimum(lo + nq, key_len)
        elif m0 >= nq:  # only text rows: text keys
            lo = tl.minimum(lo + nq, key_len)
    elif MASK_MODE == MASK_MM_CAUSAL:
        if m0 + BLOCK_M <= nq:
            hi = tl.minimum(lo + nq, key_len)
        else:  # text row i sees nothing beyond key i
            hi = tl.minimum(key_len, m0 + BLOCK_M)
    return lo, hi


@triton.jit
def _visible_rows(n0, seq_len_q, nq, BLOCK_N: tl.constexpr, MASK_MODE: tl.constexpr):
    """[lo, hi): the query rows that can see some key of n0 .. n0 + BLOCK_N - 1 (mask mode only)."""
    # Built from n0 (a tensor): ints equal to 1 are specialized to constants, and both branches
    # of a runtime `if` must give tensors of one type.
    lo = n0 * 0
    hi = n0 * 0 + seq_len_q
    if MASK_MODE == MASK_UNIMODAL:
        if n0 + BLOCK_N <= nq:  # only query keys: query rows
            hi = tl.minimum(n0 * 0 + nq, hi)
        elif n0 >= nq:  # only text keys: text rows
            lo = tl.minimum(n0 * 0 + nq, hi)
    elif MASK_MODE == MASK_MM_CAUSAL:
        if n0 >= nq:  # only text keys: rows i >= the first key
            lo = n0
    return lo, hi


@triton.jit
def _dropout_keep(seed, bh, rows, cols, seq_len_q, drop_stride, dropout_p):
    """Keep-mask of the (rows, cols) tile of head bh = b * H + h; rows/cols broadcast-shaped.

    The Philox counter is the element's offset in a (B, H, Lq, drop_stride) array, cols being
    relative to the sample's first key, so the mask does not depend on tile sizes.
    """
    offsets = (bh.to(tl.int64) * seq_len_q + rows) * drop_stride + cols
    return tl.rand(seed, offsets) >= dropout_p


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KEY_START, KEY_LEN, SEED,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    num_heads, seq_len_q, seq_len_k, nq, scale_log2, dropout_p, drop_stride,
    KEY_LAYOUT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * num_heads + h
    key_start, key_len = _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT)

    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len_q
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + key_start.to(tl.int64) * stride_kn + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + key_start.to(tl.int64) * stride_vn + h * stride_vh
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2 (before dropout)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _visible_keys(m0, key_len, nq, BLOCK_M, MASK_MODE)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < key_len
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = dot(q, tl.trans(k), None, DOT_PRECISION) * scale_log2
        s = tl.where(_allowed(rows[:, None], cols[None, :], key_len, nq, MASK_MODE), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], seq_len_q, drop_stride, dropout_p)
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :], mask=col_ok[:, None], other=0.0)
        acc = dot(cast(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0  # rows with no visible key: out 0, lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    if HAS_DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)  # inverted dropout: kept probabilities scale by 1 / (1 - p)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :]
    tl.store(o_ptrs, cast(out, O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_len_q + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                           num_heads, seq_len_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d], the FlashAttention-2 preprocess."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * num_heads + h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    o_offs = b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :]
    do_offs = b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dom + dims[None, :]
    row_ok = rows < seq_len_q
    o = tl.load(O + o_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + do_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seq_len_q + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _lse_log2(LSE, bh, rows, seq_len_q):
    """Row log-sum-exp in log2 units; +inf for rows with no key (and padding) so exp2(s - lse) = 0."""
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len_q + rows, mask=rows < seq_len_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEY_START, KEY_LEN, BLOCK_TABLE, SEED,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    num_heads, batch, seq_len_q, seq_len_k, nq, scale, scale_log2, dropout_p, drop_stride,
    KEY_LAYOUT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (key block, head, sample): dK, dV of that block, looping over the query blocks that see it.

    dK and dV share strides (both are fresh). Packed keys: the grid is (blocks, H) and axis 0
    enumerates every sample's key blocks through BLOCK_TABLE (the first block index of each
    sample, B + 1 entries), so no host-side max length (and no device sync) is needed.
    """
    pid_n = tl.program_id(0)
    if KEY_LAYOUT == KEYS_PACKED:
        h = tl.program_id(1)
        idx = tl.arange(0, BLOCK_B)
        next_first = tl.load(BLOCK_TABLE + 1 + idx, mask=idx < batch, other=2147483647)
        b = tl.sum((next_first <= pid_n).to(tl.int32), 0)  # == batch for a spare program
        active = b < batch
        b = tl.minimum(b, batch - 1)
        n0 = (pid_n - tl.load(BLOCK_TABLE + b)) * BLOCK_N
        key_start, key_len = _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT)
        key_len = tl.where(active, key_len, 0)
        store_len = key_len  # a packed sample owns exactly its keys
    else:
        h = tl.program_id(1)
        b = tl.program_id(2)
        n0 = pid_n * BLOCK_N
        key_start, key_len = _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT)
        store_len = seq_len_k  # padded keys (>= key_len) get zero gradients
    bh = b * num_heads + h

    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < key_len
    k_off = b.to(tl.int64) * stride_kb + key_start.to(tl.int64) * stride_kn + h * stride_kh
    v_off = b.to(tl.int64) * stride_vb + key_start.to(tl.int64) * stride_vn + h * stride_vh
    k = tl.load(K + k_off + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + v_off + cols[:, None] * stride_vn + dims[None, :], mask=col_ok[:, None], other=0.0)
    q_base = b.to(tl.int64) * stride_qb + h * stride_qh
    do_base = b.to(tl.int64) * stride_dob + h * stride_doh
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, hi = _visible_rows(n0, seq_len_q, nq, BLOCK_N, MASK_MODE)
    hi = tl.where(n0 < key_len, hi, lo)  # a block of padding keys sees no query
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_len_q
        q = tl.load(Q + q_base + rows[:, None] * stride_qm + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + do_base + rows[:, None] * stride_dom + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = _lse_log2(LSE, bh, rows, seq_len_q)
        delta = tl.load(DELTA + bh.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=0.0)
        # Transposed tiles (keys x rows) so dK and dV come out of plain dots.
        s_t = dot(k, tl.trans(q), None, DOT_PRECISION) * scale_log2
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where(_allowed(rows[None, :], cols[:, None], key_len, nq, MASK_MODE), p_t, 0.0)
        dp_t = dot(v, tl.trans(do), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = _dropout_keep(seed, bh, rows[None, :], cols[:, None], seq_len_q, drop_stride, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            p_drop_t = tl.where(keep_t, p_t * inv_keep, 0.0)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            p_drop_t = p_t
        dv = dot(cast(p_drop_t, do.dtype), do, dv, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dot(cast(ds_t, q.dtype), q, dk, DOT_PRECISION)

    store_ok = (cols < store_len)[:, None]
    dk_offs = b.to(tl.int64) * stride_dkb + key_start.to(tl.int64) * stride_dkn + h * stride_dkh
    dk_offs = dk_offs + cols[:, None] * stride_dkn + dims[None, :]
    tl.store(DK + dk_offs, cast(dk * scale, DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + dk_offs, cast(dv, DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KEY_START, KEY_LEN, SEED,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    num_heads, seq_len_q, seq_len_k, nq, scale, scale_log2, dropout_p, drop_stride,
    KEY_LAYOUT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, head, sample): dQ of those rows, looping over their visible keys."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * num_heads + h
    key_start, key_len = _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT)

    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len_q
    q_offs = b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :]
    do_offs = b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dom + dims[None, :]
    q = tl.load(Q + q_offs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + do_offs, mask=row_ok[:, None], other=0.0)
    lse = _lse_log2(LSE, bh, rows, seq_len_q)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + key_start.to(tl.int64) * stride_kn + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + key_start.to(tl.int64) * stride_vn + h * stride_vh
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, hi = _visible_keys(m0, key_len, nq, BLOCK_M, MASK_MODE)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < key_len
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = dot(q, tl.trans(k), None, DOT_PRECISION) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(_allowed(rows[:, None], cols[None, :], key_len, nq, MASK_MODE), p, 0.0)
        dp = dot(do, tl.trans(v), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], seq_len_q, drop_stride, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = dot(cast(ds, k.dtype), k, dq, DOT_PRECISION)

    dq_offs = b.to(tl.int64) * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + dims[None, :]
    tl.store(DQ + dq_offs, cast(dq * scale, DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dropout_mask_kernel(SEED, KEEP, seq_len_q, seq_len_k, drop_stride, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """KEEP[bh, i, j] (contiguous (B*H, Lq, Lk) bool) = the kernels' keep decision."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), bh, rows[:, None], cols[None, :], seq_len_q, drop_stride, dropout_p)
    offs = (bh.to(tl.int64) * seq_len_q + rows[:, None]) * seq_len_k + cols[None, :]
    tl.store(KEEP + offs, keep.to(tl.int8), mask=(rows[:, None] < seq_len_q) & (cols[None, :] < seq_len_k))


# ---------------------------------------------------------------------------------------
# Host side: tile choice and launchers
# ---------------------------------------------------------------------------------------
def tiles_for(
    seq_len_q: int, batch_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, align: int = 0
) -> tk.Tiles:
    """Tile sizes by heuristic (no autotuning: the packed dK/dV grid depends on BLOCK_N, and the
    interpreter would run every candidate).

    Query tile: the smallest power of two >= Lq in [16, 64] (32 for float32), halved on a GPU
    while the grid would leave SMs idle (short queries, few samples), since loads are the cost.
    Key tile and warps keep every kernel free of register spills on sm_90 (checked by the
    compile-only harness, ``mmict_kernels.testing``, for fp16/bf16/fp32 and D = 32, 64, 128,
    with and without dropout): float32 uses FMA dots (IEEE, not TF32), whose operand tiles must
    stay small. ``align`` (num_query_tokens of a masked mode, when a multiple of 16): tiles shrink
    until they divide it, so no tile straddles the query/text boundary and whole blocks can be
    skipped (M-Hub's 32 queries + 32 text: 32-row and 32-key tiles, half the unimodal work).
    """
    wide = dtype == torch.float32
    block_m = min(32 if wide else 64, max(16, triton.next_power_of_2(max(seq_len_q, 1))))
    if tk.targets_gpu(device):
        sms = tk.num_sms(device)
        while block_m > 16 and triton.cdiv(seq_len_q, block_m) * batch_heads < 2 * sms:
            block_m //= 2
    if wide:
        block_n = 32 if head_dim <= 64 else 16
    else:
        block_n = 64 if head_dim <= 64 else 32
    if align > 0 and align % 16 == 0:  # shrinking helps only if some tile >= 16 divides align
        while align % block_m:
            block_m //= 2
        while align % block_n:
            block_n //= 2
    num_warps = 8 if wide or head_dim > 64 or block_m > 32 else 4
    return tk.apply_forced(tk.Tiles(block_m, block_n, num_warps))


def _key_strides(k: torch.Tensor, key_layout) -> tuple[int, int, int]:
    if key_layout == KEYS_PACKED:  # (total_k, H, D): no batch stride, rows are offset by cu_seqlens
        return 0, k.stride(0), k.stride(1)
    return tk.strides(k)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_layout: int,
    key_start: torch.Tensor | None,
    key_len: torch.Tensor | None,
    mask_mode: int,
    num_query_tokens: int,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Lq, H, D) contiguous in q's dtype, lse (B, H, Lq) float32.

    ``key_start``: int32 cu_seqlens (B + 1,) for ``KEYS_PACKED``; ``key_len``: int32 (B,) for
    ``KEYS_DENSE_LENS``. ``seed``: 1-element int64 tensor when ``dropout_p > 0``.
    """
    batch, seq_len_q, heads, head_dim = q.shape
    tk.check_attention_inputs("M-Hub attention", q)
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, heads, seq_len_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    seq_len_k = k.shape[0] if key_layout == KEYS_PACKED else k.shape[1]
    align = num_query_tokens if mask_mode != MASK_NONE else 0
    tiles = tiles_for(seq_len_q, batch * heads, head_dim, q.dtype, q.device, align)
    grid = (triton.cdiv(seq_len_q, tiles.block_m), heads, batch)
    has_dropout = dropout_p > 0.0
    _attn_fwd_kernel[grid](
        q, tk.pointer_or(k, q), tk.pointer_or(v, q), out, lse,
        tk.pointer_or(key_start, lse), tk.pointer_or(key_len, lse), tk.pointer_or(seed if has_dropout else None, lse),
        *tk.strides(q), *_key_strides(k, key_layout), *_key_strides(v, key_layout), *tk.strides(out),
        heads, seq_len_q, seq_len_k, num_query_tokens, scale * LOG2E.value, dropout_p, max(seq_len_k, 1),
        KEY_LAYOUT=key_layout, MASK_MODE=mask_mode, HAS_DROPOUT=has_dropout,
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, DOT_PRECISION=tk.dot_precision(q.dtype),
        **tiles.launch(),
    )  # fmt: skip
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    key_layout: int,
    key_start: torch.Tensor | None,
    key_len: torch.Tensor | None,
    mask_mode: int,
    num_query_tokens: int,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (like q), dk, dv (like k, v) contiguous, from the forward's out and lse (no stored P)."""
    batch, seq_len_q, heads, head_dim = q.shape
    tk.check_attention_inputs("M-Hub attention", q)
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:  # the kernels read head-dim vectors
        dout = dout.contiguous()
    do_strides = tk.strides(dout)
    seq_len_k = k.shape[0] if key_layout == KEYS_PACKED else k.shape[1]
    align = num_query_tokens if mask_mode != MASK_NONE else 0
    tiles = tiles_for(seq_len_q, batch * heads, head_dim, q.dtype, q.device, align)
    block_m, block_n = tiles.block_m, tiles.block_n
    has_dropout = dropout_p > 0.0
    precision = tk.dot_precision(q.dtype)
    key_start_arg, key_len_arg = tk.pointer_or(key_start, lse), tk.pointer_or(key_len, lse)
    seed_arg = tk.pointer_or(seed if has_dropout else None, lse)
    common = dict(KEY_LAYOUT=key_layout, MASK_MODE=mask_mode, HAS_DROPOUT=has_dropout, HEAD_DIM=head_dim,
                  BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision, **tiles.launch())  # fmt: skip

    delta = torch.empty_like(lse)
    q_grid = (triton.cdiv(seq_len_q, block_m), heads, batch)
    _attn_bwd_delta_kernel[q_grid](
        out, dout, delta, *tk.strides(out), *do_strides, heads, seq_len_q,
        HEAD_DIM=head_dim, BLOCK_M=block_m,
    )  # fmt: skip
    _attn_bwd_dq_kernel[q_grid](
        q, tk.pointer_or(k, q), tk.pointer_or(v, q), dout, lse, delta, dq, key_start_arg, key_len_arg, seed_arg,
        *tk.strides(q), *_key_strides(k, key_layout), *_key_strides(v, key_layout), *do_strides, *tk.strides(dq),
        heads, seq_len_q, seq_len_k, num_query_tokens, scale, scale * LOG2E.value, dropout_p, max(seq_len_k, 1),
        **common,
    )  # fmt: skip
    if dk.numel() == 0:
        return dq, dk, dv
    if key_layout == KEYS_PACKED:
        # Sample b's key blocks are programs table[b] .. table[b + 1] - 1 of grid axis 0; the
        # grid is sized by the static bound sum_b ceil(len_b / BLOCK_N) <= total_k / BLOCK_N + B.
        # (lengths clamped at 0: decreasing offsets, passed with value checks off, give empty samples)
        blocks = ((key_start[1:] - key_start[:-1]).clamp_min(0) + block_n - 1) // block_n
        table = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
        table[1:] = torch.cumsum(blocks, 0)
        kv_grid = (triton.cdiv(seq_len_k, block_n) + batch, heads)
    else:
        table = lse  # unused
        kv_grid = (triton.cdiv(seq_len_k, block_n), heads, batch)
    _attn_bwd_dkdv_kernel[kv_grid](
        q, k, v, dout, lse, delta, dk, dv, key_start_arg, key_len_arg, table, seed_arg,
        *tk.strides(q), *_key_strides(k, key_layout), *_key_strides(v, key_layout), *do_strides, *_key_strides(dk, key_layout),
        heads, batch, seq_len_q, seq_len_k, num_query_tokens, scale, scale * LOG2E.value, dropout_p, max(seq_len_k, 1),
        BLOCK_B=triton.next_power_of_2(max(batch, 1)), **common,
    )  # fmt: skip
    return dq, dk, dv


def dropout_keep_mask(
    seed: torch.Tensor, batch: int, heads: int, seq_len_q: int, seq_len_k: int, drop_stride: int, dropout_p: float
) -> torch.Tensor:
    """The keep-mask (bool, (B, H, Lq, Lk)) the kernels use for ``seed``; key j of sample b is
    column j (relative to the sample's first key). ``drop_stride``: the kernels' key stride of the
    Philox offsets (Lk of a dense K, total_k of a packed one)."""
    keep = torch.zeros((batch, heads, seq_len_q, seq_len_k), dtype=torch.int8, device=seed.device)
    if keep.numel() > 0:
        grid = (batch * heads, triton.cdiv(seq_len_q, 16), triton.cdiv(seq_len_k, 64))
        _dropout_mask_kernel[grid](seed, keep, seq_len_q, seq_len_k, max(drop_stride, 1), dropout_p, BLOCK_M=16, BLOCK_N=64)
    return keep.bool()


# ---------------------------------------------------------------------------------------
# Custom-op plumbing shared by the two M-Hub ops (their schemas differ, their autograd does not)
# ---------------------------------------------------------------------------------------
def fake_forward(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of (out, lse) for torch.compile: out like q, lse (B, H, Lq) float32."""
    batch, seq_len_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_len_q), dtype=torch.float32)


def fake_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_attention_autograd(fwd_op, bwd_op, num_tensors: int) -> None:
    """Autograd of an M-Hub forward op ``fwd_op(q, k, v, *extra_tensors, *scalars) -> (out, lse)``
    whose backward op is ``bwd_op(dout, q, k, v, out, lse, *extra_tensors, *scalars) -> (dq, dk, dv)``.

    ``num_tensors``: how many leading inputs are tensors (q, k, v and the index/seed tensors).
    lse is a statistic, not differentiated (the package-wide rule, see ``ops/__init__.py``).
    """

    def setup_context(ctx, inputs, output):
        out, lse = output
        ctx.save_for_backward(*inputs[:num_tensors], out, lse)
        ctx.scalars = inputs[num_tensors:]
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        *tensors, out, lse = ctx.saved_tensors
        q, k, v, *extra = tensors
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, *extra, *ctx.scalars)
        return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)

    fwd_op.register_autograd(backward, setup_context=setup_context)
