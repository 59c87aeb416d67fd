// Backward, FlashAttention-2 style: P is recomputed from the saved lse, never stored.
//
//   dsum kernel:  dsum_i = rowsum(dO_i * O_i)
//   dq kernel:    one CTA per (query tile, head, row), streams K/V like the forward:
//                 dS = P * (dO V^T - dsum),  dQ = scale * dS K
//   dkdv kernel:  one CTA per (key block, kv head, row or prefix group), holds K/V of its block
//                 and streams (Q, dO) tiles of every query head of the GQA group:
//                 dV = P^T dO,  dK = scale * dS^T Q
// dQ gets its own pass (instead of FA2's float atomics from the dkdv pass) so that dq and the
// own-token dk/dv are always deterministic; only the shared-prefix dk/dv can use atomics.
// The dkdv kernel computes S^T = K Q^T directly (warps split the keys), so P^T and dS^T come out
// of the MMA already in the A-fragment layout that dV and dK need.
#pragma once

#include "common.cuh"

namespace mmict {

// ------------------------------------------------------------------------------------------
// dsum = rowsum(dO * O) in float32, one warp per (row, query, head).
template <typename T>
__global__ void __launch_bounds__(128) attention_dsum_kernel(const AttentionArgs args) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, h, i) flattened
  const int lane = threadIdx.x % 32;
  const int64_t total = static_cast<int64_t>(args.batch) * args.heads * args.len_q;
  if (row >= total) return;
  const int i = static_cast<int>(row % args.len_q);
  const int h = static_cast<int>((row / args.len_q) % args.heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(args.len_q) * args.heads));
  const T* o = static_cast<const T*>(args.out) + b * args.out_batch_stride + i * args.out_row_stride + h * args.out_head_stride;
  const T* d_o = static_cast<const T*>(args.dout) + b * args.dout_batch_stride + i * args.dout_row_stride + h * args.dout_head_stride;
  float acc = 0.f;
  for (int d = 2 * lane; d < args.head_dim; d += 64) {
    const float2 x = ptx::MmaType<T>::unpack(*reinterpret_cast<const uint32_t*>(o + d));
    const float2 y = ptx::MmaType<T>::unpack(*reinterpret_cast<const uint32_t*>(d_o + d));
    acc += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) args.dsum[row] = acc;
}

// lse in log2 units as the backward uses it: exp2(s * scale * log2e - lse2) = P. A row that saw
// no key (lse = -inf) and a padding query get +inf, so every P of theirs is exactly 0.
__device__ __forceinline__ float lse_log2_for_backward(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ------------------------------------------------------------------------------------------
template <typename T, int D, int kBlockM, int kBlockN>
struct DqConfig {
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  using QTile = SmemTile<T, kBlockM, D>;
  using KvTile = SmemTile<T, kBlockN, D>;
  static constexpr int kSmemBytes = (2 * QTile::kElems + 4 * KvTile::kElems) * static_cast<int>(sizeof(T));
};

template <typename T, int D, int kBlockM, int kBlockN>
__global__ void __launch_bounds__(DqConfig<T, D, kBlockM, kBlockN>::kThreads) attention_dq_kernel(const AttentionArgs args) {
  using Cfg = DqConfig<T, D, kBlockM, kBlockN>;
  using QTile = typename Cfg::QTile;
  using KvTile = typename Cfg::KvTile;
  using Mma = ptx::MmaType<T>;
  constexpr int kNTiles = kBlockN / 8;
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sdo = sq + QTile::kElems;
  T* sk = sdo + QTile::kElems;     // 2 stages
  T* sv = sk + 2 * KvTile::kElems; // 2 stages

  const int q0 = blockIdx.x * kBlockM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int kv_head = h / (args.heads / args.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, tig = lane % 4;
  const int last_query = min(q0 + kBlockM, args.len_q) - 1;
  const int row_in_tile = warp * 16;

  const T* q = static_cast<const T*>(args.q) + b * args.q_batch_stride + h * args.q_head_stride;
  const T* d_o = static_cast<const T*>(args.dout) + b * args.dout_batch_stride + h * args.dout_head_stride;

  // Same block plan as the forward (segment 0's blocks, then segment 1's).
  SegmentView<T> views[2];
  int ends[2] = {0, 0}, blocks[2] = {0, 0};
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    views[s] = SegmentView<T>{};
    if (s >= args.num_segments) continue;
    const KvSegment& seg = args.segments[s];
    views[s] = segment_view<T>(seg, segment_index(seg, b), kv_head, args.len_q);
    int end = views[s].hi;
    if (views[s].causal) end = min(end, last_query + views[s].causal_offset + 1);
    ends[s] = end;
    blocks[s] = end > views[s].lo ? (end - views[s].lo + kBlockN - 1) / kBlockN : 0;
  }
  const int num_blocks = blocks[0] + blocks[1];

  auto load_kv = [&](int blk, int stage) {
    const bool first = blk < blocks[0];
    const SegmentView<T> v = first ? views[0] : views[1];
    const int end = first ? ends[0] : ends[1];
    const int start = v.lo + (blk - (first ? 0 : blocks[0])) * kBlockN;
    KvTile::template load_async<Cfg::kThreads>(sk + stage * KvTile::kElems, start, end,
                                               [&](int t) { return v.k + t * v.k_row; }, v.k);
    KvTile::template load_async<Cfg::kThreads>(sv + stage * KvTile::kElems, start, end,
                                               [&](int t) { return v.v + t * v.v_row; }, v.v);
  };

  QTile::template load_async<Cfg::kThreads>(sq, q0, args.len_q, [&](int i) { return q + i * args.q_row_stride; }, q);
  QTile::template load_async<Cfg::kThreads>(sdo, q0, args.len_q, [&](int i) { return d_o + i * args.dout_row_stride; }, d_o);
  if (num_blocks > 0) load_kv(0, 0);
  ptx::cp_async_commit();

  const float scale_log2 = args.softmax_scale * kLog2e;
  const int64_t stat_base = (static_cast<int64_t>(b) * args.heads + h) * args.len_q;
  float lse2[2], dsum[2];
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int query = q0 + row_in_tile + group + 8 * rh;
    lse2[rh] = query < args.len_q ? lse_log2_for_backward(args.lse[stat_base + query]) : INFINITY;
    dsum[rh] = query < args.len_q ? args.dsum[stat_base + query] : 0.f;
  }

  float acc_dq[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[i][e] = 0.f;

  for (int blk = 0; blk < num_blocks; ++blk) {
    const int stage = blk & 1;
    if (blk + 1 < num_blocks) load_kv(blk + 1, stage ^ 1);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();
    __syncthreads();
    const T* k_tile = sk + stage * KvTile::kElems;
    const T* v_tile = sv + stage * KvTile::kElems;

    // S = Q K^T and dP = dO V^T (Q and dO fragments re-read from shared memory: keeping both in
    // registers would spill at D = 128).
    float s_acc[kNTiles][4], dp_acc[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s_acc[n][e] = dp_acc[n][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t a_q[4], a_do[4];
      QTile::frag_a(a_q, sq, row_in_tile, kc);
      QTile::frag_a(a_do, sdo, row_in_tile, kc);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bk[4], bv[4];
        KvTile::frag_b_rows_n(bk, k_tile, np * 16, kc);
        KvTile::frag_b_rows_n(bv, v_tile, np * 16, kc);
        Mma::mma(s_acc[2 * np], a_q, bk[0], bk[1]);
        Mma::mma(s_acc[2 * np + 1], a_q, bk[2], bk[3]);
        Mma::mma(dp_acc[2 * np], a_do, bv[0], bv[1]);
        Mma::mma(dp_acc[2 * np + 1], a_do, bv[2], bv[3]);
      }
    }

    const bool first = blk < blocks[0];
    const SegmentView<T> view = first ? views[0] : views[1];
    const int key0 = view.lo + (blk - (first ? 0 : blocks[0])) * kBlockN;
    // dS = P * (dP - dsum), stored over s_acc.
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + n * 8 + 2 * tig + (e & 1);
        const int query = q0 + row_in_tile + group + 8 * (e >> 1);
        const bool visible = key < view.hi && (!view.causal || key <= query + view.causal_offset);
        const float p = visible ? exp2f(s_acc[n][e] * scale_log2 - lse2[e >> 1]) : 0.f;
        s_acc[n][e] = p * (dp_acc[n][e] - dsum[e >> 1]);
      }
    }

    // dQ += dS K (K read transposed: its rows are the reduction dimension here).
#pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
      uint32_t ds_frag[4];
      ds_frag[0] = Mma::pack(s_acc[2 * kc][0], s_acc[2 * kc][1]);
      ds_frag[1] = Mma::pack(s_acc[2 * kc][2], s_acc[2 * kc][3]);
      ds_frag[2] = Mma::pack(s_acc[2 * kc + 1][0], s_acc[2 * kc + 1][1]);
      ds_frag[3] = Mma::pack(s_acc[2 * kc + 1][2], s_acc[2 * kc + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bk[4];
        KvTile::frag_b_rows_k(bk, k_tile, kc * 16, dp);
        Mma::mma(acc_dq[2 * dp], ds_frag, bk[0], bk[1]);
        Mma::mma(acc_dq[2 * dp + 1], ds_frag, bk[2], bk[3]);
      }
    }
    __syncthreads();
  }
  ptx::cp_async_wait<0>();

  T* dq = static_cast<T*>(args.dq) + b * args.dq_batch_stride + h * args.dq_head_stride;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int query = q0 + row_in_tile + group + 8 * rh;
    if (query >= args.len_q) continue;
    T* dst = dq + query * args.dq_row_stride;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d)
      store_pair(dst + d * 8 + 2 * tig, acc_dq[d][2 * rh] * args.softmax_scale, acc_dq[d][2 * rh + 1] * args.softmax_scale);
  }
}

// ------------------------------------------------------------------------------------------
template <typename T, int D, int kBlockN, int kBlockM>
struct DkdvConfig {
  static constexpr int kWarps = kBlockN / 16;  // warps split the keys
  static constexpr int kThreads = 32 * kWarps;
  using KvTile = SmemTile<T, kBlockN, D>;
  using QTile = SmemTile<T, kBlockM, D>;
  static constexpr int kSmemBytes =
      (2 * KvTile::kElems + 4 * QTile::kElems) * static_cast<int>(sizeof(T)) + 4 * kBlockM * static_cast<int>(sizeof(float));
};

// Which (row, query head within the GQA group, query tile) the dkdv CTA visits next.
struct DkdvJob {
  int b, r, t;
};

template <typename T, int D, int kBlockN, int kBlockM>
__global__ void __launch_bounds__(DkdvConfig<T, D, kBlockN, kBlockM>::kThreads)
    attention_dkdv_kernel(const AttentionArgs args, const KvSegment seg) {
  using Cfg = DkdvConfig<T, D, kBlockN, kBlockM>;
  using KvTile = typename Cfg::KvTile;
  using QTile = typename Cfg::QTile;
  using Mma = ptx::MmaType<T>;
  constexpr int kMTiles = kBlockM / 8;  // S^T columns (queries) per warp, in 8-wide MMA tiles
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + KvTile::kElems;
  T* sq = sv + KvTile::kElems;       // 2 stages
  T* sdo = sq + 2 * QTile::kElems;   // 2 stages
  float* slse = reinterpret_cast<float*>(sdo + 2 * QTile::kElems);  // 2 stages
  float* sdsum = slse + 2 * kBlockM;                                 // 2 stages

  const int kv_head = blockIdx.y;
  const int heads_per_kv = args.heads / args.kv_heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, tig = lane % 4;
  // Deterministic grouped segment (shared prefix): blockIdx.z is the group and this CTA sums
  // the rows of that group in ascending order. Otherwise blockIdx.z is the query row.
  const bool rows_of_group = seg.batch_index != nullptr && seg.deterministic;
  const int idx = rows_of_group ? static_cast<int>(blockIdx.z) : segment_index(seg, blockIdx.z);
  const SegmentView<T> view = segment_view<T>(seg, idx, kv_head, args.len_q);
  const int key0 = view.lo + static_cast<int>(blockIdx.x) * kBlockN;
  if (key0 >= view.hi) return;

  // Query tiles that can see any key of this block: with the causal mask query i sees key0
  // iff i >= key0 - causal_offset.
  const int num_tiles = (args.len_q + kBlockM - 1) / kBlockM;
  const int first_tile = view.causal ? max(0, key0 - view.causal_offset) / kBlockM : 0;
  if (first_tile >= num_tiles) return;
  auto next_row = [&](int b) {  // next row > b that reads this segment index; batch if none
    if (!rows_of_group) return b < 0 ? static_cast<int>(blockIdx.z) : args.batch;
    for (++b; b < args.batch; ++b)
      if (seg.batch_index[b] == idx) return b;
    return args.batch;
  };
  DkdvJob job{next_row(-1), 0, first_tile};
  if (job.b >= args.batch) return;
  auto advance = [&](DkdvJob& j) {  // false when j was the last job
    if (++j.t < num_tiles) return true;
    j.t = first_tile;
    if (++j.r < heads_per_kv) return true;
    j.r = 0;
    j.b = next_row(j.b);
    return j.b < args.batch;
  };

  KvTile::template load_async<Cfg::kThreads>(sk, key0, view.hi, [&](int t) { return view.k + t * view.k_row; }, view.k);
  KvTile::template load_async<Cfg::kThreads>(sv, key0, view.hi, [&](int t) { return view.v + t * view.v_row; }, view.v);

  auto load_queries = [&](const DkdvJob& j, int stage) {
    const int h = kv_head * heads_per_kv + j.r;
    const int q0 = j.t * kBlockM;
    const T* q = static_cast<const T*>(args.q) + j.b * args.q_batch_stride + h * args.q_head_stride;
    const T* d_o = static_cast<const T*>(args.dout) + j.b * args.dout_batch_stride + h * args.dout_head_stride;
    QTile::template load_async<Cfg::kThreads>(sq + stage * QTile::kElems, q0, args.len_q,
                                              [&](int i) { return q + i * args.q_row_stride; }, q);
    QTile::template load_async<Cfg::kThreads>(sdo + stage * QTile::kElems, q0, args.len_q,
                                              [&](int i) { return d_o + i * args.dout_row_stride; }, d_o);
    const int64_t stat_base = (static_cast<int64_t>(j.b) * args.heads + h) * args.len_q;
    for (int i = threadIdx.x; i < kBlockM; i += Cfg::kThreads) {
      const int query = q0 + i;
      slse[stage * kBlockM + i] = query < args.len_q ? lse_log2_for_backward(args.lse[stat_base + query]) : INFINITY;
      sdsum[stage * kBlockM + i] = query < args.len_q ? args.dsum[stat_base + query] : 0.f;
    }
  };

  load_queries(job, 0);
  ptx::cp_async_commit();

  const float scale_log2 = args.softmax_scale * kLog2e;
  const int key_in_tile = warp * 16;
  float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

  for (int it = 0;; ++it) {
    const int stage = it & 1;
    DkdvJob next = job;
    const bool has_next = advance(next);
    if (has_next) load_queries(next, stage ^ 1);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();
    __syncthreads();
    const T* q_tile = sq + stage * QTile::kElems;
    const T* do_tile = sdo + stage * QTile::kElems;
    const float* lse2 = slse + stage * kBlockM;
    const float* dsum = sdsum + stage * kBlockM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x kBlockM queries.
    float s_acc[kMTiles][4], dp_acc[kMTiles][4];
#pragma unroll
    for (int n = 0; n < kMTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s_acc[n][e] = dp_acc[n][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t a_k[4], a_v[4];
      KvTile::frag_a(a_k, sk, key_in_tile, kc);
      KvTile::frag_a(a_v, sv, key_in_tile, kc);
#pragma unroll
      for (int np = 0; np < kMTiles / 2; ++np) {
        uint32_t bq[4], bdo[4];
        QTile::frag_b_rows_n(bq, q_tile, np * 16, kc);
        QTile::frag_b_rows_n(bdo, do_tile, np * 16, kc);
        Mma::mma(s_acc[2 * np], a_k, bq[0], bq[1]);
        Mma::mma(s_acc[2 * np + 1], a_k, bq[2], bq[3]);
        Mma::mma(dp_acc[2 * np], a_v, bdo[0], bdo[1]);
        Mma::mma(dp_acc[2 * np + 1], a_v, bdo[2], bdo[3]);
      }
    }

    // P^T (into s_acc) and dS^T (into dp_acc). Rows are keys, columns are queries.
    const int q0 = job.t * kBlockM;
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * tig + (e & 1);
        const int key = key0 + key_in_tile + group + 8 * (e >> 1);
        const int query = q0 + col;
        const bool visible = key < view.hi && (!view.causal || key <= query + view.causal_offset);
        const float p = visible ? exp2f(s_acc[n][e] * scale_log2 - lse2[col]) : 0.f;
        s_acc[n][e] = p;
        dp_acc[n][e] = p * (dp_acc[n][e] - dsum[col]);
      }
    }

    // dV += P^T dO and dK += dS^T Q (dO and Q read transposed: queries are the reduction dim).
#pragma unroll
    for (int kc = 0; kc < kBlockM / 16; ++kc) {
      uint32_t p_frag[4], ds_frag[4];
      p_frag[0] = Mma::pack(s_acc[2 * kc][0], s_acc[2 * kc][1]);
      p_frag[1] = Mma::pack(s_acc[2 * kc][2], s_acc[2 * kc][3]);
      p_frag[2] = Mma::pack(s_acc[2 * kc + 1][0], s_acc[2 * kc + 1][1]);
      p_frag[3] = Mma::pack(s_acc[2 * kc + 1][2], s_acc[2 * kc + 1][3]);
      ds_frag[0] = Mma::pack(dp_acc[2 * kc][0], dp_acc[2 * kc][1]);
      ds_frag[1] = Mma::pack(dp_acc[2 * kc][2], dp_acc[2 * kc][3]);
      ds_frag[2] = Mma::pack(dp_acc[2 * kc + 1][0], dp_acc[2 * kc + 1][1]);
      ds_frag[3] = Mma::pack(dp_acc[2 * kc + 1][2], dp_acc[2 * kc + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bdo[4], bq[4];
        QTile::frag_b_rows_k(bdo, do_tile, kc * 16, dp);
        QTile::frag_b_rows_k(bq, q_tile, kc * 16, dp);
        Mma::mma(acc_dv[2 * dp], p_frag, bdo[0], bdo[1]);
        Mma::mma(acc_dv[2 * dp + 1], p_frag, bdo[2], bdo[3]);
        Mma::mma(acc_dk[2 * dp], ds_frag, bq[0], bq[1]);
        Mma::mma(acc_dk[2 * dp + 1], ds_frag, bq[2], bq[3]);
      }
    }
    __syncthreads();
    if (!has_next) break;
    job = next;
  }
  ptx::cp_async_wait<0>();

  // Write this warp's 16 key rows (only valid keys: the caller zeroed the rest).
  const bool atomic = seg.batch_index != nullptr && !seg.deterministic;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int key = key0 + key_in_tile + group + 8 * rh;
    if (key >= view.hi) continue;
    if (atomic) {
      const int64_t base = ((static_cast<int64_t>(idx) * seg.max_len + key) * args.kv_heads + kv_head) * D;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        const int col = d * 8 + 2 * tig;
        atomicAdd(seg.dk_accum + base + col, acc_dk[d][2 * rh] * args.softmax_scale);
        atomicAdd(seg.dk_accum + base + col + 1, acc_dk[d][2 * rh + 1] * args.softmax_scale);
        atomicAdd(seg.dv_accum + base + col, acc_dv[d][2 * rh]);
        atomicAdd(seg.dv_accum + base + col + 1, acc_dv[d][2 * rh + 1]);
      }
    } else {
      // Packed varlen: token_base + key is the row of the (total, Hkv, D) tensor.
      const int64_t token = view.token_base + key;
      const int64_t batch = seg.cu_seqlens != nullptr ? 0 : idx;
      T* dk = static_cast<T*>(seg.dk) + batch * seg.dk_batch_stride + token * seg.dk_row_stride + kv_head * seg.dk_head_stride;
      T* dv = static_cast<T*>(seg.dv) + batch * seg.dv_batch_stride + token * seg.dv_row_stride + kv_head * seg.dv_head_stride;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        const int col = d * 8 + 2 * tig;
        store_pair(dk + col, acc_dk[d][2 * rh] * args.softmax_scale, acc_dk[d][2 * rh + 1] * args.softmax_scale);
        store_pair(dv + col, acc_dv[d][2 * rh], acc_dv[d][2 * rh + 1]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
template <typename T, int D, int kBlockM, int kBlockN>
cudaError_t launch_dq_kernel(const AttentionArgs& args, cudaStream_t stream) {
  using Cfg = DqConfig<T, D, kBlockM, kBlockN>;
  auto kernel = attention_dq_kernel<T, D, kBlockM, kBlockN>;
  cudaError_t err = set_smem(kernel, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((args.len_q + kBlockM - 1) / kBlockM, args.heads, args.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int D, int kBlockN, int kBlockM>
cudaError_t launch_dkdv_kernel(const AttentionArgs& args, const KvSegment& seg, cudaStream_t stream) {
  using Cfg = DkdvConfig<T, D, kBlockN, kBlockM>;
  auto kernel = attention_dkdv_kernel<T, D, kBlockN, kBlockM>;
  cudaError_t err = set_smem(kernel, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const bool rows_of_group = seg.batch_index != nullptr && seg.deterministic;
  const int z = rows_of_group ? seg.num_batch_index_values : args.batch;
  const dim3 grid((seg.max_len + kBlockN - 1) / kBlockN, args.kv_heads, z);
  if (grid.x == 0 || z == 0) return cudaSuccess;
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args, seg);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dsum_kernel(const AttentionArgs& args, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.len_q;
  const unsigned blocks = static_cast<unsigned>((rows + 3) / 4);
  attention_dsum_kernel<T><<<blocks, 128, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace mmict
