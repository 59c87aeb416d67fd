// Argument validation and dtype dispatch of the torch-free attention API (attention_api.h).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_api.h"

namespace mmict {

// Defined (and explicitly instantiated) in attention_{forward,backward}_{fp16,bf16}.cu.
template <typename T>
cudaError_t forward_impl(const AttentionArgs& args, cudaStream_t stream);
template <typename T>
cudaError_t backward_impl(const AttentionArgs& args, cudaStream_t stream);

namespace {

// cp.async moves 16-byte chunks: base pointers and every row / head / batch stride must keep
// each head-dim vector 16-byte aligned.
bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }
bool strides_ok(int64_t a, int64_t b, int64_t c) { return a % 8 == 0 && b % 8 == 0 && c % 8 == 0; }

const char* segment_error(const KvSegment& s, bool backward) {
  if (s.k == nullptr || s.v == nullptr) return "a key/value segment has a null k or v pointer";
  if (!aligned16(s.k) || !aligned16(s.v)) return "k/v data pointers must be 16-byte aligned";
  if (!strides_ok(s.k_batch_stride, s.k_row_stride, s.k_head_stride) ||
      !strides_ok(s.v_batch_stride, s.v_row_stride, s.v_head_stride))
    return "k/v strides must be multiples of 8 elements (16 bytes)";
  if (s.max_len < 0) return "segment max_len must be >= 0";
  if (s.batch_index != nullptr && (s.num_batch_index_values <= 0 || s.num_batch_index_values > 65535))
    return "a grouped segment needs 1 <= num_batch_index_values <= 65535 (grid limit)";
  if (!backward) return nullptr;
  const bool atomic = s.batch_index != nullptr && !s.deterministic;
  if (atomic) {
    if (s.dk_accum == nullptr || s.dv_accum == nullptr) return "atomic prefix gradients need dk_accum and dv_accum";
  } else {
    if (s.dk == nullptr || s.dv == nullptr) return "a key/value segment has a null dk or dv pointer";
    if (!aligned16(s.dk) || !aligned16(s.dv)) return "dk/dv data pointers must be 16-byte aligned";
    if (s.dk_row_stride % 2 != 0 || s.dk_head_stride % 2 != 0 || s.dk_batch_stride % 2 != 0 ||
        s.dv_row_stride % 2 != 0 || s.dv_head_stride % 2 != 0 || s.dv_batch_stride % 2 != 0)
      return "dk/dv strides must be even (pairs of elements are stored together)";
  }
  return nullptr;
}

}  // namespace

const char* attention_args_error(const AttentionArgs& a) {
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return "dtype must be float16 or bfloat16";
  if (a.head_dim != 64 && a.head_dim != 128) return "head_dim must be 64 or 128";
  if (a.batch < 0 || a.len_q < 0 || a.heads < 0) return "batch, len_q and heads must be >= 0";
  if (a.kv_heads <= 0 || a.heads % a.kv_heads != 0) return "kv_heads must be >= 1 and divide heads";
  if (a.batch > 65535 || a.heads > 65535 || a.kv_heads > 65535) return "batch and heads must be <= 65535 (grid limits)";
  if (a.num_segments < 1 || a.num_segments > 2) return "num_segments must be 1 or 2";
  if (!(a.softmax_scale > 0.f)) return "softmax_scale must be positive";
  if (a.q == nullptr || a.out == nullptr || a.lse == nullptr) return "q, out and lse must be non-null";
  if (!aligned16(a.q) || !strides_ok(a.q_batch_stride, a.q_row_stride, a.q_head_stride))
    return "q must be 16-byte aligned with strides that are multiples of 8 elements";
  if (!aligned16(a.out) || a.out_batch_stride % 2 != 0 || a.out_row_stride % 2 != 0 || a.out_head_stride % 2 != 0)
    return "out must be 16-byte aligned with even strides";
  if (a.num_splits < 1 || a.num_splits > kMaxSplits) return "num_splits must be in [1, kMaxSplits]";
  if (a.num_splits > 1 && (a.partial_out == nullptr || a.partial_lse == nullptr || !aligned16(a.partial_out)))
    return "num_splits > 1 needs the partial_out (16-byte aligned) and partial_lse workspaces";
  return nullptr;
}

int attention_forward_num_splits(const AttentionArgs& a, int num_sms, int64_t keys_per_row) {
  if (num_sms <= 0 || a.batch <= 0 || a.len_q <= 0 || a.heads <= 0 || keys_per_row <= 0) return 1;
  const int64_t query_tile = a.len_q <= 32 ? 32 : 64;  // as forward_for_head_dim (kernels/dispatch.cuh)
  const int64_t ctas = static_cast<int64_t>(a.batch) * a.heads * ((a.len_q + query_tile - 1) / query_tile);
  // Two resident CTAs per SM is what the D = 128 tiles allow; below that the GPU idles.
  const int64_t target = 2 * static_cast<int64_t>(num_sms);
  if (ctas >= target) return 1;
  // Each split keeps at least 4 key blocks (256 keys): less work than that does not pay for the
  // float32 partial results and the combine kernel.
  const int64_t key_blocks = (keys_per_row + 63) / 64;
  int64_t splits = (target + ctas - 1) / ctas;
  if (splits > key_blocks / 4) splits = key_blocks / 4;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits >= 2 ? static_cast<int>(splits) : 1;
}

static const char* backward_args_error(const AttentionArgs& a) {
  if (a.dout == nullptr || a.dq == nullptr || a.dsum == nullptr) return "dout, dq and dsum must be non-null";
  if (!aligned16(a.dout) || !strides_ok(a.dout_batch_stride, a.dout_row_stride, a.dout_head_stride))
    return "dout must be 16-byte aligned with strides that are multiples of 8 elements";
  if (!aligned16(a.dq) || a.dq_batch_stride % 2 != 0 || a.dq_row_stride % 2 != 0 || a.dq_head_stride % 2 != 0)
    return "dq must be 16-byte aligned with even strides";
  return nullptr;
}

cudaError_t attention_forward(const AttentionArgs& args, cudaStream_t stream) {
  if (attention_args_error(args) != nullptr) return cudaErrorInvalidValue;
  for (int s = 0; s < args.num_segments; ++s)
    if (segment_error(args.segments[s], false) != nullptr) return cudaErrorInvalidValue;
  return args.dtype == DType::kFloat16 ? forward_impl<__half>(args, stream) : forward_impl<__nv_bfloat16>(args, stream);
}

cudaError_t attention_backward(const AttentionArgs& args, cudaStream_t stream) {
  if (attention_args_error(args) != nullptr || backward_args_error(args) != nullptr) return cudaErrorInvalidValue;
  for (int s = 0; s < args.num_segments; ++s)
    if (segment_error(args.segments[s], true) != nullptr) return cudaErrorInvalidValue;
  return args.dtype == DType::kFloat16 ? backward_impl<__half>(args, stream) : backward_impl<__nv_bfloat16>(args, stream);
}

const char* attention_segment_error(const AttentionArgs& args, bool backward) {
  if (const char* why = attention_args_error(args)) return why;
  if (backward)
    if (const char* why = backward_args_error(args)) return why;
  for (int s = 0; s < args.num_segments; ++s)
    if (const char* why = segment_error(args.segments[s], backward)) return why;
  return nullptr;
}

}  // namespace mmict
