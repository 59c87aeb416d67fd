// Torch-free entry points of the mmict_kernels attention kernels.
//
// One kernel family serves both ops of the library, because both are "a short block of
// queries attends to one or two key/value segments":
//   hub_cross_attention: one segment, the sample's image tokens (dense with right padding,
//                        or packed varlen through cu_seqlens), no causal mask, H == Hkv.
//   prefix_attention:    segment 0 = the row's group prefix (shared by many rows, selected by
//                        prefix_ids, right padded), segment 1 = the row's own tokens (left
//                        padded, bottom-right causal), grouped-query attention.
// Softmax runs over the union of the segments (one online softmax), so no concatenated K/V
// ever exists. Pointers are raw device pointers, strides are in elements, the last (head)
// dimension is contiguous. Everything runs on the given stream; nothing allocates.
//
// This header includes only the CUDA runtime API, so the C++ binding (python/) and any other
// host code can include it with a plain host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mmict {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// One key/value segment as seen from query row b (b in [0, batch)).
struct KvSegment {
  const void* k = nullptr;  // element (idx, t, hk, d) at k[idx*k_batch_stride + t*k_row_stride + hk*k_head_stride + d]
  const void* v = nullptr;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  // idx = batch_index ? batch_index[b] : b (prefix_ids pick the row's prefix group).
  const int64_t* batch_index = nullptr;
  int num_batch_index_values = 0;  // G for a grouped segment (the backward's grid); else batch
  // Packed varlen (hub cross-attention): tokens of idx are rows [cu_seqlens[idx], cu_seqlens[idx+1])
  // of a (total, Hkv, D) tensor; k_batch_stride is then unused.
  const int32_t* cu_seqlens = nullptr;
  // Padded layout: max_len positions per idx; lengths[idx] of them are valid (all if null):
  // the first ones (right padding) or, with left_pad, the last ones.
  const int32_t* lengths = nullptr;
  int max_len = 0;  // Lk or Lp (packed: the longest sample, only sizes the backward grid)
  bool left_pad = false;
  // Bottom-right causal: query i sees key t iff t <= i + (max_len - len_q).
  bool causal = false;

  // Backward outputs for this segment (same indexing as k / v, type of q). Must be zeroed by the
  // caller: the kernels write only the rows of valid keys that some query sees.
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  // Grouped segment only (batch_index != null): how the rows sharing one idx are summed.
  //   deterministic = true : one CTA per (key block, kv head, idx) loops over the rows of idx in
  //                          ascending order and writes dk/dv once (bitwise reproducible).
  //   deterministic = false: one CTA per (key block, kv head, row) adds into dk_accum/dv_accum
  //                          (float32, contiguous (num_batch_index_values, max_len, Hkv, D),
  //                          zeroed) with atomics; the caller casts them into dk/dv.
  bool deterministic = true;
  float* dk_accum = nullptr;
  float* dv_accum = nullptr;
};

struct AttentionArgs {
  DType dtype = DType::kFloat16;
  int head_dim = 0;  // 64 or 128
  int batch = 0, len_q = 0, heads = 0, kv_heads = 0;
  float softmax_scale = 1.f;

  // (B, Lq, H, D) tensors.
  const void* q = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  void* out = nullptr;  // forward output; backward input
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;  // (B, H, Lq) contiguous float32; forward output, backward input

  KvSegment segments[2];
  int num_segments = 1;

  // Forward split-KV ("flash-decoding"): when B x H x query tiles CTAs cannot fill the GPU (few
  // rows, or one query per row with a long prefix), each row's key blocks are cut into
  // num_splits ranges processed by separate CTAs, whose partial results a combine kernel merges
  // by log-sum-exp. Workspace (float32, contiguous, caller-allocated when num_splits > 1):
  // partial_out (num_splits, B, H, Lq, D) and partial_lse (num_splits, B, H, Lq).
  int num_splits = 1;
  float* partial_out = nullptr;
  float* partial_lse = nullptr;

  // Backward only.
  const void* dout = nullptr;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  void* dq = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  float* dsum = nullptr;  // workspace (B, H, Lq) float32: rowsum(dout * out)
};

// How many key splits the forward should use (1 = none) for a GPU with num_sms multiprocessors,
// given the expected number of keys per row (dense: sum of the segments' max_len; packed:
// total_k / B). Sizes args.partial_out / partial_lse; at most kMaxSplits.
constexpr int kMaxSplits = 16;
int attention_forward_num_splits(const AttentionArgs& args, int num_sms, int64_t keys_per_row);

// Writes out and lse. Returns the first launch error (cudaSuccess otherwise).
cudaError_t attention_forward(const AttentionArgs& args, cudaStream_t stream);

// Writes dq, every segment's dk/dv (or dk_accum/dv_accum) and the dsum workspace.
cudaError_t attention_backward(const AttentionArgs& args, cudaStream_t stream);

// Why args cannot be launched (unsupported dtype / head dim, bad sizes, misaligned pointers or
// strides), or nullptr. attention_forward / attention_backward return cudaErrorInvalidValue
// for the same cases; call this first for a readable message.
const char* attention_args_error(const AttentionArgs& args);
const char* attention_segment_error(const AttentionArgs& args, bool backward);

}  // namespace mmict
