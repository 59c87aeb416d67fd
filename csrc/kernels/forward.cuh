// Forward: one CTA per (query tile, head, row). Each warp owns 16 query rows; the CTA streams
// the key/value blocks of the row's segments (prefix first, then own tokens) through a
// two-stage cp.async pipeline and keeps an online softmax in registers (FlashAttention-2).
#pragma once

#include "common.cuh"

namespace mmict {

template <typename T, int D, int kBlockM, int kBlockN>
struct ForwardConfig {
  static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "tiles are multiples of the 16-row MMA");
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = 32 * kWarps;
  using QTile = SmemTile<T, kBlockM, D>;
  using KvTile = SmemTile<T, kBlockN, D>;
  static constexpr int kSmemBytes = (QTile::kElems + 4 * KvTile::kElems) * static_cast<int>(sizeof(T));
};

// The flattened list of key blocks of one query tile: segment 0's blocks, then segment 1's.
template <typename T>
struct BlockPlan {
  SegmentView<T> view[2];
  int end[2];  // last key any query of the tile may see, + 1 (causal trims it)
  int blocks[2];

  __device__ __forceinline__ int total() const { return blocks[0] + blocks[1]; }
};

template <typename T, int kBlockN>
__device__ __forceinline__ BlockPlan<T> plan_blocks(const AttentionArgs& args, int b, int kv_head, int last_query) {
  BlockPlan<T> plan;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    plan.blocks[s] = 0;
    plan.end[s] = 0;
    plan.view[s] = SegmentView<T>{};
    if (s >= args.num_segments) continue;
    const KvSegment& seg = args.segments[s];
    plan.view[s] = segment_view<T>(seg, segment_index(seg, b), kv_head, args.len_q);
    const SegmentView<T>& v = plan.view[s];
    int end = v.hi;
    if (v.causal) end = min(end, last_query + v.causal_offset + 1);
    plan.end[s] = end;
    plan.blocks[s] = end > v.lo ? (end - v.lo + kBlockN - 1) / kBlockN : 0;
  }
  return plan;
}

template <typename T, int D, int kBlockM, int kBlockN>
__global__ void __launch_bounds__(ForwardConfig<T, D, kBlockM, kBlockN>::kThreads)
    attention_forward_kernel(const AttentionArgs args) {
  using Cfg = ForwardConfig<T, D, kBlockM, kBlockN>;
  using QTile = typename Cfg::QTile;
  using KvTile = typename Cfg::KvTile;
  using Mma = ptx::MmaType<T>;
  constexpr int kNTiles = kBlockN / 8;  // S columns per warp, in 8-wide MMA tiles
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + QTile::kElems;              // 2 stages
  T* sv = sk + 2 * KvTile::kElems;         // 2 stages

  // blockIdx.x = query tile * num_splits + split: the splits of one tile are neighbours.
  const int split = static_cast<int>(blockIdx.x) % args.num_splits;
  const int q0 = (static_cast<int>(blockIdx.x) / args.num_splits) * kBlockM;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int kv_head = h / (args.heads / args.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, tig = lane % 4;
  const int last_query = min(q0 + kBlockM, args.len_q) - 1;

  const T* q = static_cast<const T*>(args.q) + b * args.q_batch_stride + h * args.q_head_stride;
  const BlockPlan<T> plan = plan_blocks<T, kBlockN>(args, b, kv_head, last_query);
  // This CTA's share of the row's key blocks: [block_begin, block_end).
  const int per_split = (plan.total() + args.num_splits - 1) / args.num_splits;
  const int block_begin = min(split * per_split, plan.total());
  const int block_end = min(block_begin + per_split, plan.total());

  auto load_kv = [&](int blk, int stage) {
    // Selects, not a dynamic index, so the plan stays in registers.
    const bool first = blk < plan.blocks[0];
    const SegmentView<T> v = first ? plan.view[0] : plan.view[1];
    const int end = first ? plan.end[0] : plan.end[1];
    const int start = v.lo + (blk - (first ? 0 : plan.blocks[0])) * kBlockN;
    KvTile::template load_async<Cfg::kThreads>(sk + stage * KvTile::kElems, start, end,
                                               [&](int t) { return v.k + t * v.k_row; }, v.k);
    KvTile::template load_async<Cfg::kThreads>(sv + stage * KvTile::kElems, start, end,
                                               [&](int t) { return v.v + t * v.v_row; }, v.v);
  };

  QTile::template load_async<Cfg::kThreads>(sq, q0, args.len_q, [&](int i) { return q + i * args.q_row_stride; }, q);
  if (block_begin < block_end) load_kv(block_begin, 0);
  ptx::cp_async_commit();

  const float scale_log2 = args.softmax_scale * kLog2e;
  float acc_o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[i][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // in log2 units (scores * scale * log2(e))
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums (quad-reduced at the end)
  // Q fragments stay in registers at D = 64; at D = 128 they would push the kernel into spills,
  // so they are re-read from shared memory (ldmatrix is cheap next to the K/V stream).
  constexpr bool kQInRegisters = D <= 64;
  uint32_t q_frag[kQInRegisters ? D / 16 : 1][4];
  const int row_in_tile = warp * 16;

  for (int blk = block_begin; blk < block_end; ++blk) {
    const int stage = (blk - block_begin) & 1;
    if (blk + 1 < block_end) load_kv(blk + 1, stage ^ 1);
    ptx::cp_async_commit();  // possibly empty: keeps "wait for all but the newest group" exact
    ptx::cp_async_wait<1>();
    __syncthreads();
    if constexpr (kQInRegisters) {
      if (blk == block_begin) {
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) QTile::frag_a(q_frag[kc], sq, row_in_tile, kc);
      }
    }
    const T* k_tile = sk + stage * KvTile::kElems;
    const T* v_tile = sv + stage * KvTile::kElems;

    // S = Q K^T for this warp's 16 rows x kBlockN keys.
    float s_acc[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s_acc[n][e] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t a_q[4];
      if constexpr (kQInRegisters) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a_q[e] = q_frag[kc][e];
      } else {
        QTile::frag_a(a_q, sq, row_in_tile, kc);
      }
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t bk[4];
        KvTile::frag_b_rows_n(bk, k_tile, np * 16, kc);
        Mma::mma(s_acc[2 * np], a_q, bk[0], bk[1]);
        Mma::mma(s_acc[2 * np + 1], a_q, bk[2], bk[3]);
      }
    }

    // Mask (segment length, causal) and scale into log2 units.
    const bool first = blk < plan.blocks[0];
    const SegmentView<T> view = first ? plan.view[0] : plan.view[1];
    const int key0 = view.lo + (blk - (first ? 0 : plan.blocks[0])) * kBlockN;
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + n * 8 + 2 * tig + (e & 1);
        const int query = q0 + row_in_tile + group + 8 * (e >> 1);
        const bool visible = key < view.hi && (!view.causal || key <= query + view.causal_offset);
        s_acc[n][e] = visible ? s_acc[n][e] * scale_log2 : -INFINITY;
      }
    }

    // Online softmax update of the two rows this lane holds (group and group + 8).
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) mx = fmaxf(mx, fmaxf(s_acc[n][2 * rh], s_acc[n][2 * rh + 1]));
      mx = quad_max(mx);
      const float new_max = fmaxf(row_max[rh], mx);
      // A row that has seen nothing yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
      const float base = new_max == -INFINITY ? 0.f : new_max;
      const float alpha = exp2f(row_max[rh] - base);
      row_max[rh] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        s_acc[n][2 * rh] = exp2f(s_acc[n][2 * rh] - base);
        s_acc[n][2 * rh + 1] = exp2f(s_acc[n][2 * rh + 1] - base);
        sum += s_acc[n][2 * rh] + s_acc[n][2 * rh + 1];
      }
      row_sum[rh] = row_sum[rh] * alpha + sum;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        acc_o[d][2 * rh] *= alpha;
        acc_o[d][2 * rh + 1] *= alpha;
      }
    }

    // O += P V: P's C fragments become A fragments in registers.
#pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
      uint32_t p_frag[4];
      p_frag[0] = Mma::pack(s_acc[2 * kc][0], s_acc[2 * kc][1]);
      p_frag[1] = Mma::pack(s_acc[2 * kc][2], s_acc[2 * kc][3]);
      p_frag[2] = Mma::pack(s_acc[2 * kc + 1][0], s_acc[2 * kc + 1][1]);
      p_frag[3] = Mma::pack(s_acc[2 * kc + 1][2], s_acc[2 * kc + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        KvTile::frag_b_rows_k(bv, v_tile, kc * 16, dp);
        Mma::mma(acc_o[2 * dp], p_frag, bv[0], bv[1]);
        Mma::mma(acc_o[2 * dp + 1], p_frag, bv[2], bv[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next prefetch overwrites it
  }
  ptx::cp_async_wait<0>();

  // Epilogue: normalise, write out and lse. A row that saw no key has sum 0: out 0, lse -inf.
  // With splits, the same goes (in float32) to this split's slice of the workspace.
  const int64_t row_base = (static_cast<int64_t>(b) * args.heads + h) * args.len_q;
  const bool partial = args.num_splits > 1;
  T* out = static_cast<T*>(args.out) + b * args.out_batch_stride + h * args.out_head_stride;
  float* lse = partial ? args.partial_lse + split * static_cast<int64_t>(args.batch) * args.heads * args.len_q + row_base
                       : args.lse + row_base;
  float* partial_out = partial ? args.partial_out + (split * static_cast<int64_t>(args.batch) * args.heads * args.len_q + row_base) * D
                               : nullptr;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const float total = quad_sum(row_sum[rh]);
    const float inv = total > 0.f ? 1.f / total : 0.f;
    const int query = q0 + row_in_tile + group + 8 * rh;
    if (query < args.len_q) {
      if (partial) {
        float* dst = partial_out + static_cast<int64_t>(query) * D;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d)
          *reinterpret_cast<float2*>(dst + d * 8 + 2 * tig) = make_float2(acc_o[d][2 * rh] * inv, acc_o[d][2 * rh + 1] * inv);
      } else {
        T* dst = out + query * args.out_row_stride;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d)
          store_pair(dst + d * 8 + 2 * tig, acc_o[d][2 * rh] * inv, acc_o[d][2 * rh + 1] * inv);
      }
      if (tig == 0) lse[query] = total > 0.f ? (row_max[rh] + log2f(total)) * kLn2 : -INFINITY;
    }
  }
}

// Merge the splits of each (row, head, query): lse = log sum_s exp(lse_s), out = sum_s
// exp(lse_s - lse) out_s. Splits that saw no key have lse_s = -inf and weigh 0; a query that
// saw none at all gets out 0, lse -inf. One warp per query, lanes over the head dim.
template <typename T, int D>
__global__ void __launch_bounds__(128) attention_combine_splits_kernel(const AttentionArgs args) {
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.len_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, h, i) flattened
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float max_lse = -INFINITY;
  for (int s = 0; s < args.num_splits; ++s) max_lse = fmaxf(max_lse, args.partial_lse[s * rows + row]);
  const int i = static_cast<int>(row % args.len_q);
  const int h = static_cast<int>((row / args.len_q) % args.heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(args.len_q) * args.heads));
  T* out = static_cast<T*>(args.out) + b * args.out_batch_stride + i * args.out_row_stride + h * args.out_head_stride;
  constexpr int kPerLane = D / 32;  // 2 or 4 consecutive elements per lane
  float acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.f;
  float total = 0.f;
  if (max_lse != -INFINITY) {
    for (int s = 0; s < args.num_splits; ++s) {
      const float w = __expf(args.partial_lse[s * rows + row] - max_lse);
      total += w;
      const float* src = args.partial_out + (s * rows + row) * D + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[e] += w * src[e];
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
  for (int e = 0; e < kPerLane; e += 2) store_pair(out + lane * kPerLane + e, acc[e] * inv, acc[e + 1] * inv);
  if (lane == 0) args.lse[row] = total > 0.f ? max_lse + logf(total) : -INFINITY;
}

template <typename T, int D, int kBlockM, int kBlockN>
cudaError_t launch_forward_kernel(const AttentionArgs& args, cudaStream_t stream) {
  using Cfg = ForwardConfig<T, D, kBlockM, kBlockN>;
  auto kernel = attention_forward_kernel<T, D, kBlockM, kBlockN>;
  cudaError_t err = set_smem(kernel, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(((args.len_q + kBlockM - 1) / kBlockM) * args.num_splits, args.heads, args.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  err = cudaGetLastError();
  if (err != cudaSuccess || args.num_splits <= 1) return err;
  const int64_t rows = static_cast<int64_t>(args.batch) * args.heads * args.len_q;
  attention_combine_splits_kernel<T, D><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace mmict
