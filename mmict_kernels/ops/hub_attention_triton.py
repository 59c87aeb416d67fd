"""Triton attention kernels shared by the M-Hub ops (cross-attention and self-attention).

``hub_cross_attention/triton.py`` and ``hub_self_attention/triton.py`` wrap these kernels as
the custom ops ``mmict::hub_{cross,self}_attention_triton_{fwd,bwd}``; the shared conventions
(constants, dots, casts, tiles, device facts) come from :mod:`mmict_kernels.ops.triton_toolkit`.

One forward kernel and one backward cover both ops, because both are "each query row of
sample b attends to a subset of sample b's keys". The backward for short queries (Lq <=
``SHORT_QUERY_MAX``: M-Hub's 32 queries, or 32 queries + 32 text) is one program per
(head, sample) holding every query row: it reads Q, dO and O once, each key block's K and V
once, writes that block's dK and dV and accumulates dQ in registers. Longer queries take a
FlashAttention-2 style backward (delta preprocess, a dK/dV kernel over key blocks, a dQ kernel
over query blocks).

- Key layout (``KEYS_*``): dense (B, Lk, H, D) with every key valid, dense with per-sample
  lengths (right padding), or packed (total_k, H, D) with ``cu_seqlens`` offsets.
- Mask mode (``MASK_*``): none (cross-attention, bidirectional self-attention), or the BLIP-2
  unimodal (ITC) / multimodal-causal (ITG) rules, computed from the row index, the key index
  and ``num_query_tokens``; no (L x L) mask tensor exists, and key (or query) blocks that the
  mode hides entirely are never visited (forward and the long-query backward).

Why these tile shapes: M-Hub's query side is short (32 learned queries, at most 32 more text
tokens), so query tiles are 16 to 64 rows, and the grid is (query blocks, B * H): 64 samples
x 12 heads already give 768 programs for 132 SMs. Grids are (blocks, H, B): neighbouring
programs share one head's K/V (or Q/dO) in L2, and B, H each stay under CUDA's 65535 limit.
No backward uses atomics (the short one owns all of a head's rows; dK/dV programs own a key
block and loop over the few query blocks that see it, dQ programs own a query block and loop
over keys), so gradients are deterministic.

Dropout: Philox keyed by a seed read from a 1-element int64 tensor (drawn from torch's default
generator by the caller, so ``torch.manual_seed`` reproduces it, and no host sync or
recompilation happens per step). One ``tl.randint4x`` call decides 4 neighbouring keys of a
row (its counter: the (b, h, q, key // 4) offset), so a tile draws a quarter of the Philox
rounds that one call per element did; the decisions depend on the element only, so the
backward regenerates the forward's keep-mask whatever its tiles, and :func:`dropout_keep_mask`
exports it for tests.

Accumulation is float32; float32 inputs use IEEE matmuls (not TF32) so they meet the oracle.

Bounds: whatever ``cu_seqlens``/lengths hold (value checks off), a sample's key range is clamped
into the key tensor, so no kernel reads or writes outside its tensors.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import triton_toolkit as tk
from .triton_toolkit import LN2, LOG2E, cast, dot, dropout_seed

# How a sample's keys are found (constexpr KEY_LAYOUT).
KEYS_DENSE = tl.constexpr(0)  # k: (B, Lk, H, D), all Lk keys valid
KEYS_DENSE_LENS = tl.constexpr(1)  # k: (B, Lk, H, D), the first key_len[b] keys valid (right padding)
KEYS_PACKED = tl.constexpr(2)  # k: (total_k, H, D), sample b owns rows cu_seqlens[b] : cu_seqlens[b + 1]

# Which (row, key) pairs may attend, besides key validity (constexpr MASK_MODE).
MASK_NONE = tl.constexpr(0)  # every valid key
MASK_UNIMODAL = tl.constexpr(1)  # rows < nq see keys < nq; other rows see keys >= nq
MASK_MM_CAUSAL = tl.constexpr(2)  # rows < nq see keys < nq; other rows i see keys < nq and keys j <= i

DROP_LANES = tl.constexpr(4)  # dropout keep decisions per Philox call (tl.randint4x gives 4 words)


@dataclasses.dataclass(frozen=True)
class Keys:
    """Which keys each query row of sample b sees: the key layout (``KEYS_*``) with its index
    tensor, and the mask mode (``MASK_*``) with the number of query tokens it splits on."""

    layout: int
    start: torch.Tensor | None = None  # int32 cu_seqlens (B + 1,) for KEYS_PACKED
    length: torch.Tensor | None = None  # int32 valid keys per sample (B,) for KEYS_DENSE_LENS
    mask_mode: int = MASK_NONE
    num_query_tokens: int = 0

    def seq_len(self, k: torch.Tensor) -> int:
        """Rows of the key tensor: Lk of a dense (B, Lk, H, D) one, total_k of a packed (total_k, H, D) one."""
        return k.shape[0] if self.layout == KEYS_PACKED else k.shape[1]

    def align(self) -> int:
        """What tiles should divide (see :func:`tiles_for`): the query/text edge of a masked mode."""
        return self.num_query_tokens if self.mask_mode != MASK_NONE else 0

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, row, head) strides of a key-shaped tensor (no batch stride when packed: rows are offset by cu_seqlens)."""
        return (0, t.stride(0), t.stride(1)) if self.layout == KEYS_PACKED else tk.strides(t)

    def pointers(self, like: torch.Tensor, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The KEY_START, KEY_LEN and SEED kernel arguments (placeholders where unused)."""
        return tk.pointer_or(self.start, like), tk.pointer_or(self.length, like), tk.pointer_or(seed, like)


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
def _head_ptr(X, b, first_row, h, stride_b, stride_row, stride_h):
    """Pointer to row ``first_row`` of head h of sample b (int64 offsets: B x L x H x D may pass 2^31)."""
    return X + b.to(tl.int64) * stride_b + tl.cast(first_row, tl.int64) * stride_row + h * stride_h


@triton.jit
def _load_tile(base, idx, dims, stride_row, ok):
    """(len(idx), HEAD_DIM) tile of rows ``idx`` from ``base`` (a :func:`_head_ptr`); rows not ``ok`` read 0."""
    return tl.load(base + idx[:, None] * stride_row + dims[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _store_tile(base, idx, dims, stride_row, ok, x):
    tl.store(base + idx[:, None] * stride_row + dims[None, :], cast(x, base.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _query_block(
    Q, K, V, KEY_START, KEY_LEN, SEED,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    num_heads, seq_len_q, seq_len_k, nq,
    KEY_LAYOUT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The start of a program over (query block, head, sample) = program ids (0, 1, 2): (b, h,
    bh = b * H + h, the sample's key count, rows, dims, row_ok, the Q tile, the K and V pointers of
    the sample's first key, the dropout seed, [lo, hi) of the keys these rows can see)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    key_start, key_len = _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT)
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len_q
    q = _load_tile(_head_ptr(Q, b, 0, h, stride_qb, stride_qm, stride_qh), rows, dims, stride_qm, row_ok)
    k_base = _head_ptr(K, b, key_start, h, stride_kb, stride_kn, stride_kh)
    v_base = _head_ptr(V, b, key_start, h, stride_vb, stride_vn, stride_vh)
    lo, hi = _visible_keys(m0, key_len, nq, BLOCK_M, MASK_MODE)
    seed = dropout_seed(SEED, HAS_DROPOUT)
    return b, h, b * num_heads + h, key_len, rows, dims, row_ok, q, k_base, v_base, seed, lo, hi


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
    """[lo, hi): the keys that rows m0 .. m0 + BLOCK_M - 1 can see (the rest is skipped).

    lo is a multiple of DROP_LANES, so every key tile starts on a dropout lane group."""
    lo = key_len * 0  # key_len is a tensor (see _visible_rows)
    hi = key_len
    if MASK_MODE == MASK_UNIMODAL:
        if m0 + BLOCK_M <= nq:  # only query rows: query keys
            hi = tl.minimum(lo + nq, key_len)
        elif m0 >= nq:  # only text rows: text keys
            lo = (tl.minimum(lo + nq, key_len) // DROP_LANES) * DROP_LANES
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
def _dropout_keep(seed, bh, rows, col0, seq_len_q, drop_stride, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask (BLOCK_M, BLOCK_N) of head bh = b * H + h: ``rows`` x keys col0 .. col0 + BLOCK_N - 1
    of the sample (keys relative to its first key; col0 a multiple of DROP_LANES).

    One Philox call (``tl.randint4x``) decides the DROP_LANES = 4 neighbouring keys 4g .. 4g + 3
    of one row: its counter is that group's offset in a (B, H, Lq, ceil(drop_stride / 4)) array,
    and its four outputs are the four keys in order. The decisions depend on the element only,
    never on the tile sizes, so every kernel and the exported mask agree.
    """
    groups = col0 // DROP_LANES + tl.arange(0, BLOCK_N // DROP_LANES)
    counters = (bh.to(tl.int64) * seq_len_q + rows[:, None]) * tl.cdiv(drop_stride, DROP_LANES) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # join(join(r0, r2), join(r1, r3))[m, g, i, j] = r_(2i + j): the reshape puts lane 2i + j at key 4g + 2i + j.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_N])
    # Keep with probability 1 - p: 31 uniform bits against p * 2^31 (integer compare, no float conversion).
    threshold = tl.minimum(dropout_p * 2147483648.0, 2147483520.0).to(tl.int32)
    return (bits >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _lse_log2(LSE, bh, rows, seq_len_q):
    """Row log-sum-exp in log2 units; +inf for rows with no key (and padding) so exp2(s - lse) = 0."""
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len_q + rows, mask=rows < seq_len_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _bwd_tile_t(
    q, k, v, do, lse, delta, rows, col0, key_len, nq, seed, bh, seq_len_q, drop_stride, dropout_p, scale_log2,
    MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """(P_drop^T, dS^T), (keys x rows) float32, of the key tile col0 .. col0 + BLOCK_N - 1 against the
    query tile ``rows``: dV += P_drop^T dO and dK += dS^T Q come out of plain dots. Probabilities are
    recomputed from the row log-sum-exp (log2 units, see :func:`_lse_log2`)."""
    cols = col0 + tl.arange(0, BLOCK_N)
    s_t = dot(k, tl.trans(q), None, DOT_PRECISION) * scale_log2
    p_t = tl.math.exp2(s_t - lse[None, :])
    p_t = tl.where(_allowed(rows[None, :], cols[:, None], key_len, nq, MASK_MODE), p_t, 0.0)
    dp_t = dot(v, tl.trans(do), None, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, rows, col0, seq_len_q, drop_stride, dropout_p, BLOCK_M, BLOCK_N)
        keep_t = tl.trans(keep)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_drop_t = tl.where(keep_t, p_t * inv_keep, 0.0)
        dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
    else:
        p_drop_t = p_t
    ds_t = p_t * (dp_t - delta[None, :])
    return p_drop_t, ds_t


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KEY_START, KEY_LEN, SEED,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    num_heads, seq_len_q, seq_len_k, nq, scale_log2, dropout_p, drop_stride,
    KEY_LAYOUT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    b, h, bh, key_len, rows, dims, row_ok, q, k_base, v_base, seed, lo, hi = _query_block(
        Q, K, V, KEY_START, KEY_LEN, SEED,
        stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        num_heads, seq_len_q, seq_len_k, nq, KEY_LAYOUT, MASK_MODE, HAS_DROPOUT, HEAD_DIM, BLOCK_M,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2 (before dropout)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < key_len
        k = _load_tile(k_base, cols, dims, stride_kn, col_ok)
        s = dot(q, tl.trans(k), None, DOT_PRECISION) * scale_log2
        s = tl.where(_allowed(rows[:, None], cols[None, :], key_len, nq, MASK_MODE), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, rows, start_n, seq_len_q, drop_stride, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_base, cols, dims, stride_vn, col_ok)
        acc = dot(cast(p, v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0  # rows with no visible key: out 0, lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    if HAS_DROPOUT:
        l_safe = l_safe * (1.0 - dropout_p)  # inverted dropout: kept probabilities scale by 1 / (1 - p)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    _store_tile(_head_ptr(O, b, 0, h, stride_ob, stride_om, stride_oh), rows, dims, stride_om, row_ok, acc / l_safe[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_len_q + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------
# Backward for short queries: one program per (head, sample)
# ---------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_short_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV, KEY_START, KEY_LEN, SEED,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh,
    num_heads, seq_len_q, seq_len_k, nq, scale, scale_log2, dropout_p, drop_stride,
    KEY_LAYOUT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ, dK, dV of one (head, sample) whose Lq <= BLOCK_M query rows fit one tile.

    Q, dO and O are read once (delta = rowsum(dO * O) is computed here), each key block's K and V
    once: its dK and dV are final when the block is done, dQ accumulates over the key blocks in
    registers. No atomics, so the gradients are deterministic; the dropout keep-mask of a tile
    is drawn once for the three gradients. dK and dV share strides (both are fresh).
    """
    h = tl.program_id(0)
    b = tl.program_id(1)
    bh = b * num_heads + h
    key_start, key_len = _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT)
    if KEY_LAYOUT == KEYS_PACKED:
        store_len = key_len  # a packed sample owns exactly its keys
    else:
        store_len = seq_len_k  # padded keys (>= key_len) get zero gradients

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len_q
    q = _load_tile(_head_ptr(Q, b, 0, h, stride_qb, stride_qm, stride_qh), rows, dims, stride_qm, row_ok)
    do = _load_tile(_head_ptr(DO, b, 0, h, stride_dob, stride_dom, stride_doh), rows, dims, stride_dom, row_ok)
    o = _load_tile(_head_ptr(O, b, 0, h, stride_ob, stride_om, stride_oh), rows, dims, stride_om, row_ok)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = _lse_log2(LSE, bh, rows, seq_len_q)
    k_base = _head_ptr(K, b, key_start, h, stride_kb, stride_kn, stride_kh)
    v_base = _head_ptr(V, b, key_start, h, stride_vb, stride_vn, stride_vh)
    dk_base = _head_ptr(DK, b, key_start, h, stride_dkb, stride_dkn, stride_dkh)
    dv_base = _head_ptr(DV, b, key_start, h, stride_dkb, stride_dkn, stride_dkh)
    seed = dropout_seed(SEED, HAS_DROPOUT)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, key_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < key_len
        k = _load_tile(k_base, cols, dims, stride_kn, col_ok)
        v = _load_tile(v_base, cols, dims, stride_vn, col_ok)
        p_drop_t, ds_t = _bwd_tile_t(
            q, k, v, do, lse, delta, rows, start_n, key_len, nq, seed, bh, seq_len_q, drop_stride, dropout_p, scale_log2,
            MASK_MODE, HAS_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        store_ok = cols < store_len
        _store_tile(dv_base, cols, dims, stride_dkn, store_ok, dot(cast(p_drop_t, do.dtype), do, None, DOT_PRECISION))
        ds_t = cast(ds_t, q.dtype)
        _store_tile(dk_base, cols, dims, stride_dkn, store_ok, dot(ds_t, q, None, DOT_PRECISION) * scale)
        dq = dot(tl.trans(ds_t), k, dq, DOT_PRECISION)
    # Padding keys of a dense sample (key_len <= j < Lk) see no query: zero gradients.
    zeros = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_n in range(tl.cdiv(key_len, BLOCK_N) * BLOCK_N, store_len, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        _store_tile(dk_base, cols, dims, stride_dkn, cols < store_len, zeros)
        _store_tile(dv_base, cols, dims, stride_dkn, cols < store_len, zeros)
    _store_tile(_head_ptr(DQ, b, 0, h, stride_dqb, stride_dqm, stride_dqh), rows, dims, stride_dqm, row_ok, dq * scale)


# ---------------------------------------------------------------------------------------
# Backward for longer queries: delta preprocess, dK/dV over key blocks, dQ over query blocks
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
    row_ok = rows < seq_len_q
    o = _load_tile(_head_ptr(O, b, 0, h, stride_ob, stride_om, stride_oh), rows, dims, stride_om, row_ok)
    do = _load_tile(_head_ptr(DO, b, 0, h, stride_dob, stride_dom, stride_doh), rows, dims, stride_dom, row_ok)
    tl.store(DELTA + bh.to(tl.int64) * seq_len_q + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEY_START, KEY_LEN, BLOCK_TABLE, SEED,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
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
    h = tl.program_id(1)
    if KEY_LAYOUT == KEYS_PACKED:
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
        b = tl.program_id(2)
        n0 = pid_n * BLOCK_N
        key_start, key_len = _sample_keys(b, KEY_START, KEY_LEN, seq_len_k, KEY_LAYOUT)
        store_len = seq_len_k  # padded keys (>= key_len) get zero gradients
    bh = b * num_heads + h

    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < key_len
    k = _load_tile(_head_ptr(K, b, key_start, h, stride_kb, stride_kn, stride_kh), cols, dims, stride_kn, col_ok)
    v = _load_tile(_head_ptr(V, b, key_start, h, stride_vb, stride_vn, stride_vh), cols, dims, stride_vn, col_ok)
    q_base = _head_ptr(Q, b, 0, h, stride_qb, stride_qm, stride_qh)
    do_base = _head_ptr(DO, b, 0, h, stride_dob, stride_dom, stride_doh)
    seed = dropout_seed(SEED, HAS_DROPOUT)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, hi = _visible_rows(n0, seq_len_q, nq, BLOCK_N, MASK_MODE)
    hi = tl.where(n0 < key_len, hi, lo)  # a block of padding keys sees no query
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_len_q
        q = _load_tile(q_base, rows, dims, stride_qm, row_ok)
        do = _load_tile(do_base, rows, dims, stride_dom, row_ok)
        lse = _lse_log2(LSE, bh, rows, seq_len_q)
        delta = tl.load(DELTA + bh.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=0.0)
        p_drop_t, ds_t = _bwd_tile_t(
            q, k, v, do, lse, delta, rows, n0, key_len, nq, seed, bh, seq_len_q, drop_stride, dropout_p, scale_log2,
            MASK_MODE, HAS_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
        dv = dot(cast(p_drop_t, do.dtype), do, dv, DOT_PRECISION)
        dk = dot(cast(ds_t, q.dtype), q, dk, DOT_PRECISION)

    store_ok = cols < store_len
    _store_tile(_head_ptr(DK, b, key_start, h, stride_dkb, stride_dkn, stride_dkh), cols, dims, stride_dkn, store_ok, dk * scale)
    _store_tile(_head_ptr(DV, b, key_start, h, stride_dkb, stride_dkn, stride_dkh), cols, dims, stride_dkn, store_ok, dv)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KEY_START, KEY_LEN, SEED,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    num_heads, seq_len_q, seq_len_k, nq, scale, scale_log2, dropout_p, drop_stride,
    KEY_LAYOUT: tl.constexpr, MASK_MODE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (query block, head, sample): dQ of those rows, looping over their visible keys."""
    b, h, bh, key_len, rows, dims, row_ok, q, k_base, v_base, seed, lo, hi = _query_block(
        Q, K, V, KEY_START, KEY_LEN, SEED,
        stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        num_heads, seq_len_q, seq_len_k, nq, KEY_LAYOUT, MASK_MODE, HAS_DROPOUT, HEAD_DIM, BLOCK_M,
    )  # fmt: skip
    do = _load_tile(_head_ptr(DO, b, 0, h, stride_dob, stride_dom, stride_doh), rows, dims, stride_dom, row_ok)
    lse = _lse_log2(LSE, bh, rows, seq_len_q)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len_q + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < key_len
        k = _load_tile(k_base, cols, dims, stride_kn, col_ok)
        v = _load_tile(v_base, cols, dims, stride_vn, col_ok)
        s = dot(q, tl.trans(k), None, DOT_PRECISION) * scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(_allowed(rows[:, None], cols[None, :], key_len, nq, MASK_MODE), p, 0.0)
        dp = dot(do, tl.trans(v), None, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, rows, start_n, seq_len_q, drop_stride, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = dot(cast(ds, k.dtype), k, dq, DOT_PRECISION)

    _store_tile(_head_ptr(DQ, b, 0, h, stride_dqb, stride_dqm, stride_dqh), rows, dims, stride_dqm, row_ok, dq * scale)


@triton.jit
def _dropout_mask_kernel(SEED, KEEP, seq_len_q, seq_len_k, drop_stride, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """KEEP[bh, i, j] (contiguous (B*H, Lq, Lk) bool) = the kernels' keep decision."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(2) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), bh, rows, col0, seq_len_q, drop_stride, dropout_p, BLOCK_M, BLOCK_N)
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


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: Keys, *, scale: float, dropout_p: float, seed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Lq, H, D) contiguous in q's dtype, lse (B, H, Lq) float32. ``seed``: 1-element int64
    tensor when ``dropout_p > 0``."""
    batch, seq_len_q, heads, head_dim = q.shape
    tk.check_attention_inputs("M-Hub attention", q)
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, heads, seq_len_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    seq_len_k = keys.seq_len(k)
    tiles = tiles_for(seq_len_q, batch * heads, head_dim, q.dtype, q.device, keys.align())
    has_dropout = dropout_p > 0.0
    _attn_fwd_kernel[(triton.cdiv(seq_len_q, tiles.block_m), heads, batch)](
        q, tk.pointer_or(k, q), tk.pointer_or(v, q), out, lse, *keys.pointers(lse, seed if has_dropout else None),
        *tk.strides(q), *keys.strides(k), *keys.strides(v), *tk.strides(out),
        heads, seq_len_q, seq_len_k, keys.num_query_tokens, scale * LOG2E.value, dropout_p, max(seq_len_k, 1),
        KEY_LAYOUT=keys.layout, MASK_MODE=keys.mask_mode, HAS_DROPOUT=has_dropout,
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, DOT_PRECISION=tk.dot_precision(q.dtype),
        **tiles.launch(),
    )  # fmt: skip
    return out, lse


SHORT_QUERY_MAX = 96  # up to this Lq (M-Hub: 32 queries, or 32 + 32 text) the backward is one kernel


def short_backward_tiles(
    seq_len_q: int, head_dim: int, dtype: torch.dtype, device: torch.device | None = None
) -> tk.Tiles | None:
    """Tiles of the one-program-per-(head, sample) backward, or None where Lq needs the three-kernel one.

    Every query row sits in one tile (BLOCK_M: the power of two >= Lq, at least 16, the smallest
    tl.dot). Tiles, warps and stages as the compile-only harness showed free of register spills on
    sm_90 for fp16/bf16/fp32, D = 32, 64, 128, with and without dropout, and on sm_80 up to 64 rows:
    16-key tiles (dQ and the Q, dO rows of every query stay live over the whole loop), 8 warps from
    64 x 64 (4 warps reach 255 registers there on sm_80); 128 rows only for 16-bit inputs on sm_90
    (float32's FMA dots keep their operands in registers, and sm_80's MMA operands too: both spill),
    float32 without load pipelining. A forced key tile (``force_tiles``) applies.
    """
    block_m = max(16, triton.next_power_of_2(max(seq_len_q, 1)))
    wide = dtype == torch.float32
    arch = tk.capability(device) if device is not None else None
    max_rows = 64 if wide or (arch is not None and arch < (9, 0)) else 128
    if seq_len_q > SHORT_QUERY_MAX or block_m > max_rows:
        return None
    num_warps = 8 if wide or block_m * head_dim >= 64 * 64 else 4
    tiles = tk.Tiles(block_m, 16, num_warps, 1 if wide else 2)
    return dataclasses.replace(tiles, block_n=tk.apply_forced(tiles).block_n)


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, keys: Keys,
    *, scale: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dq (like q), dk, dv (like k, v) contiguous, from the forward's out and lse (no stored P).

    Lq <= ``SHORT_QUERY_MAX``: one kernel, one program per (head, sample) reading K and V once;
    longer queries: the delta preprocess, a dQ kernel over query blocks and a dK/dV kernel over key
    blocks. Both are deterministic (no atomics)."""
    batch, seq_len_q, heads, head_dim = q.shape
    tk.check_attention_inputs("M-Hub attention", q)
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:  # the kernels read head-dim vectors
        dout = dout.contiguous()
    seq_len_k = keys.seq_len(k)
    has_dropout = dropout_p > 0.0
    key_args = keys.pointers(lse, seed if has_dropout else None)
    strides_qkv = (*tk.strides(q), *keys.strides(k), *keys.strides(v))
    scalars = (seq_len_q, seq_len_k, keys.num_query_tokens, scale, scale * LOG2E.value, dropout_p, max(seq_len_k, 1))
    flags = dict(KEY_LAYOUT=keys.layout, MASK_MODE=keys.mask_mode, HAS_DROPOUT=has_dropout, HEAD_DIM=head_dim,
                 DOT_PRECISION=tk.dot_precision(q.dtype))  # fmt: skip

    short = short_backward_tiles(seq_len_q, head_dim, q.dtype, q.device)
    if short is not None:
        _attn_bwd_short_kernel[(heads, batch)](
            q, tk.pointer_or(k, q), tk.pointer_or(v, q), out, dout, lse, dq, tk.pointer_or(dk, q), tk.pointer_or(dv, q),
            *key_args, *strides_qkv, *tk.strides(out), *tk.strides(dout), *tk.strides(dq), *keys.strides(dk),
            heads, *scalars, BLOCK_M=short.block_m, BLOCK_N=short.block_n, **flags, **short.launch(),
        )  # fmt: skip
        return dq, dk, dv

    tiles = tiles_for(seq_len_q, batch * heads, head_dim, q.dtype, q.device, keys.align())
    flags.update(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **tiles.launch())
    delta = torch.empty_like(lse)
    q_grid = (triton.cdiv(seq_len_q, tiles.block_m), heads, batch)
    _attn_bwd_delta_kernel[q_grid](
        out, dout, delta, *tk.strides(out), *tk.strides(dout), heads, seq_len_q, HEAD_DIM=head_dim, BLOCK_M=tiles.block_m
    )
    _attn_bwd_dq_kernel[q_grid](
        q, tk.pointer_or(k, q), tk.pointer_or(v, q), dout, lse, delta, dq, *key_args,
        *strides_qkv, *tk.strides(dout), *tk.strides(dq), heads, *scalars, **flags,
    )  # fmt: skip
    if dk.numel() == 0:
        return dq, dk, dv
    if keys.layout == KEYS_PACKED:
        # Sample b's key blocks are programs table[b] .. table[b + 1] - 1 of grid axis 0; the
        # grid is sized by the static bound sum_b ceil(len_b / BLOCK_N) <= total_k / BLOCK_N + B.
        # Lengths in int64 and clamped into [0, total_k], as the kernel clamps them (offsets passed
        # with value checks off may decrease or jump near the int32 limits): the table stays increasing.
        lengths = (keys.start[1:].long() - keys.start[:-1].long()).clamp(0, seq_len_k)
        blocks = (lengths + tiles.block_n - 1) // tiles.block_n
        table = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
        table[1:] = torch.cumsum(blocks, 0)
        kv_grid = (triton.cdiv(seq_len_k, tiles.block_n) + batch, heads)
    else:
        table = lse  # unused
        kv_grid = (triton.cdiv(seq_len_k, tiles.block_n), heads, batch)
    _attn_bwd_dkdv_kernel[kv_grid](
        q, k, v, dout, lse, delta, dk, dv, key_args[0], key_args[1], table, key_args[2],
        *strides_qkv, *tk.strides(dout), *keys.strides(dk), heads, batch, *scalars,
        BLOCK_B=triton.next_power_of_2(max(batch, 1)), **flags,
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
