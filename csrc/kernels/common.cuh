// Shared pieces of the attention kernels: swizzled shared-memory tiles, their async loads and
// tensor-core fragment loads, and the per-row view of a key/value segment.
#pragma once

#include <cmath>
#include <cstdint>

#include "../attention_api.h"
#include "ptx.cuh"

namespace mmict {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A tile of ROWS x D elements of 16-bit type in shared memory. Each row is D/8 chunks of 16
// bytes; chunk c of row r lives at chunk slot c ^ (r & 7). Eight consecutive rows read by one
// ldmatrix (same column chunk) then hit eight different 16-byte bank groups instead of one,
// with D = 64 (128 B rows) as with D = 128 (256 B rows).
template <typename T, int ROWS, int D>
struct SmemTile {
  static_assert(D % 64 == 0, "head dim must be a multiple of 64 (8 chunks of 8 elements)");
  static constexpr int kChunks = D / 8;
  static constexpr int kElems = ROWS * D;

  __device__ static __forceinline__ int offset(int row, int col) {
    return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
  }

  // rows [0, ROWS) <- global rows first_row + r (row_ptr(t) gives row t's address); rows with
  // first_row + r >= valid_end are zero-filled.
  template <int NTHREADS, typename RowPtr>
  __device__ static __forceinline__ void load_async(T* smem, int first_row, int valid_end, RowPtr row_ptr, const T* fallback) {
    constexpr int kIters = (ROWS * kChunks + NTHREADS - 1) / NTHREADS;
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      const int i = j * NTHREADS + static_cast<int>(threadIdx.x);
      if (ROWS * kChunks % NTHREADS != 0 && i >= ROWS * kChunks) break;
      const int r = i / kChunks, c = i % kChunks;
      const int t = first_row + r;
      const bool valid = t < valid_end;
      // Out-of-range rows still pass a mapped address (nothing is read from it).
      const T* src = valid ? row_ptr(t) + c * 8 : fallback;
      ptx::cp_async_16(smem + offset(r, c * 8), src, valid);
    }
  }

  // A fragment (16x16, row-major) of rows [row0, row0+16), columns [16*kchunk, 16*kchunk+16).
  __device__ static __forceinline__ void frag_a(uint32_t (&a)[4], const T* smem, int row0, int kchunk) {
    const int lane = threadIdx.x & 31;
    ptx::ldmatrix_x4(a, smem + offset(row0 + (lane & 15), kchunk * 16 + (lane >> 4) * 8));
  }

  // B fragments where the tile's rows are the N dimension (B[k][n] = tile[n][k]): rows
  // [n0, n0+16) are two n-tiles; b[0],b[1] feed n-tile n0/8, b[2],b[3] n-tile n0/8 + 1.
  __device__ static __forceinline__ void frag_b_rows_n(uint32_t (&b)[4], const T* smem, int n0, int kchunk) {
    const int lane = threadIdx.x & 31;
    ptx::ldmatrix_x4(b, smem + offset(n0 + (lane & 7) + ((lane >> 4) << 3), kchunk * 16 + ((lane >> 3) & 1) * 8));
  }

  // B fragments where the tile's rows are the K dimension (B[k][n] = tile[k][n]): rows
  // [k0, k0+16), columns [16*nchunk, 16*nchunk+16) = two n-tiles (b[0],b[1] then b[2],b[3]).
  __device__ static __forceinline__ void frag_b_rows_k(uint32_t (&b)[4], const T* smem, int k0, int nchunk) {
    const int lane = threadIdx.x & 31;
    ptx::ldmatrix_x4_trans(b, smem + offset(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, nchunk * 16 + (lane >> 4) * 8));
  }
};

// Where one query row's keys of one segment live, and which of them it may see.
template <typename T>
struct SegmentView {
  const T* k;  // row t of this (idx, kv head) at k + t * k_row
  const T* v;
  int64_t k_row, v_row;
  int64_t token_base;  // packed varlen: first token of idx in the (total, Hkv, D) tensor; else 0
  int lo, hi;          // valid keys are [lo, hi)
  int causal_offset;   // query i sees key t iff t <= i + causal_offset (when causal)
  bool causal;
};

__device__ __forceinline__ int segment_index(const KvSegment& s, int b) {
  return s.batch_index != nullptr ? static_cast<int>(s.batch_index[b]) : b;
}

template <typename T>
__device__ __forceinline__ SegmentView<T> segment_view(const KvSegment& s, int idx, int kv_head, int len_q) {
  SegmentView<T> view;
  int len;
  int64_t k_off, v_off;
  if (s.cu_seqlens != nullptr) {
    const int start = s.cu_seqlens[idx];
    len = s.cu_seqlens[idx + 1] - start;
    view.token_base = start;
    view.lo = 0;
    view.hi = len;
    k_off = start * s.k_row_stride;
    v_off = start * s.v_row_stride;
  } else {
    len = s.max_len;
    const int n = s.lengths != nullptr ? min(max(s.lengths[idx], 0), len) : len;
    view.token_base = 0;
    view.lo = s.left_pad ? len - n : 0;
    view.hi = s.left_pad ? len : n;
    k_off = idx * s.k_batch_stride;
    v_off = idx * s.v_batch_stride;
  }
  view.k = static_cast<const T*>(s.k) + k_off + kv_head * s.k_head_stride;
  view.v = static_cast<const T*>(s.v) + v_off + kv_head * s.v_head_stride;
  view.k_row = s.k_row_stride;
  view.v_row = s.v_row_stride;
  view.causal = s.causal;
  view.causal_offset = len - len_q;
  return view;
}

// Sum / max over the four lanes of an MMA quad (the lanes that share a C-fragment row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

// Store two adjacent float values as one 32-bit pair of T.
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = ptx::MmaType<T>::pack(lo, hi);
}

// Launch helper: opt in to more than 48 KiB of dynamic shared memory when a kernel needs it.
template <typename Kernel>
inline cudaError_t set_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace mmict
