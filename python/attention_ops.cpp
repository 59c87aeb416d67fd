// torch binding of the CUDA attention kernels in csrc/: op schemas (mmict::<op>_cuda_{fwd,bwd}),
// input checks with messages that name the argument, and launches on torch's current stream.
//
// Built into mmict_kernels._C by setup.py. Autograd and fake (meta) implementations are
// registered from Python (mmict_kernels/ops/*/cuda.py) with torch.library.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers)
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "attention_api.h"

namespace {

using at::Tensor;

#define MMICT_CHECK(cond, op, ...) TORCH_CHECK(cond, "mmict::", op, ": ", __VA_ARGS__)

mmict::DType to_dtype(const Tensor& t, const char* op, const char* name) {
  if (t.scalar_type() == at::kHalf) return mmict::DType::kFloat16;
  if (t.scalar_type() == at::kBFloat16) return mmict::DType::kBFloat16;
  MMICT_CHECK(false, op, name, ": expected dtype float16 or bfloat16, got ", t.scalar_type());
  return mmict::DType::kFloat16;
}

void check_float_input(const Tensor& t, const Tensor& q, const char* op, const char* name, int64_t ndim) {
  MMICT_CHECK(t.is_cuda(), op, name, ": expected a CUDA tensor, got device ", t.device());
  MMICT_CHECK(t.device() == q.device(), op, name, ": expected device ", q.device(), " (same as q), got ", t.device());
  MMICT_CHECK(t.scalar_type() == q.scalar_type(), op, name, ": expected dtype ", q.scalar_type(), " (same as q), got ",
              t.scalar_type());
  MMICT_CHECK(t.dim() == ndim, op, name, ": expected a ", ndim, "-D tensor, got shape ", t.sizes());
  MMICT_CHECK(t.numel() == 0 || t.stride(-1) == 1, op, name, ": the last (head) dim must be contiguous, got strides ",
              t.strides());
}

// dout / out of a backward: same checks as an input, but any strides (they are re-laid out).
void check_grad_input(const Tensor& t, const Tensor& q, const char* op, const char* name) {
  MMICT_CHECK(t.device() == q.device(), op, name, ": expected device ", q.device(), " (same as q), got ", t.device());
  MMICT_CHECK(t.scalar_type() == q.scalar_type(), op, name, ": expected dtype ", q.scalar_type(), " (same as q), got ",
              t.scalar_type());
  MMICT_CHECK(t.sizes() == q.sizes(), op, name, ": expected the shape of q ", q.sizes(), ", got ", t.sizes());
}

void check_index_input(const std::optional<Tensor>& t, const Tensor& q, const char* op, const char* name, at::ScalarType dtype,
                       int64_t length) {
  if (!t.has_value()) return;
  MMICT_CHECK(t->device() == q.device(), op, name, ": expected device ", q.device(), " (same as q), got ", t->device());
  MMICT_CHECK(t->scalar_type() == dtype, op, name, ": expected dtype ", dtype, ", got ", t->scalar_type());
  MMICT_CHECK(t->dim() == 1 && t->size(0) == length, op, name, ": expected shape (", length, ",), got ", t->sizes());
}

// cp.async reads 16-byte chunks: keep every head vector 16-byte aligned, copying when needed.
// (An upstream gradient may come in any layout, e.g. expanded with all strides 0 from .sum().)
Tensor aligned(const Tensor& t) {
  if (t.numel() > 0 && t.stride(-1) != 1) return t.contiguous();
  bool ok = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) % 8 == 0 || t.size(d) <= 1);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Strides of a (B, L, H, D) or packed (total, H, D) tensor as (batch, row, head). A dim of size
// 1 is only ever indexed with 0, so its stride is passed as 0: torch may give such a dim any
// stride (aligned() accepts it), and the API's multiple-of-8 check must not refuse it.
void strides_of(const Tensor& t, int64_t& batch, int64_t& row, int64_t& head) {
  auto stride = [&](int64_t d) { return t.size(d) == 1 ? int64_t{0} : t.stride(d); };
  if (t.dim() == 4) {
    batch = stride(0), row = stride(1), head = stride(2);
  } else {
    batch = 0, row = stride(0), head = stride(1);
  }
}

void set_kv(mmict::KvSegment& s, const Tensor& k, const Tensor& v) {
  s.k = k.data_ptr();
  s.v = v.data_ptr();
  strides_of(k, s.k_batch_stride, s.k_row_stride, s.k_head_stride);
  strides_of(v, s.v_batch_stride, s.v_row_stride, s.v_head_stride);
}

void set_dkv(mmict::KvSegment& s, const Tensor& dk, const Tensor& dv) {
  s.dk = dk.data_ptr();
  s.dv = dv.data_ptr();
  strides_of(dk, s.dk_batch_stride, s.dk_row_stride, s.dk_head_stride);
  strides_of(dv, s.dv_batch_stride, s.dv_row_stride, s.dv_head_stride);
}

mmict::AttentionArgs base_args(const Tensor& q, int64_t kv_heads, double scale, const char* op) {
  mmict::AttentionArgs a;
  a.dtype = to_dtype(q, op, "q");
  a.batch = static_cast<int>(q.size(0));
  a.len_q = static_cast<int>(q.size(1));
  a.heads = static_cast<int>(q.size(2));
  a.head_dim = static_cast<int>(q.size(3));
  a.kv_heads = static_cast<int>(kv_heads);
  a.softmax_scale = static_cast<float>(scale);
  a.q = q.data_ptr();
  strides_of(q, a.q_batch_stride, a.q_row_stride, a.q_head_stride);
  MMICT_CHECK(a.head_dim == 64 || a.head_dim == 128, op, "q: head dim must be 64 or 128, got ", a.head_dim);
  MMICT_CHECK(scale > 0, op, "scale: expected a positive softmax scale, got ", scale);
  return a;
}

void set_outputs(mmict::AttentionArgs& a, const Tensor& out, const Tensor& lse) {
  a.out = out.data_ptr();
  strides_of(out, a.out_batch_stride, a.out_row_stride, a.out_head_stride);
  a.lse = lse.data_ptr<float>();
}

void set_backward(mmict::AttentionArgs& a, const Tensor& dout, const Tensor& dq, const Tensor& dsum) {
  a.dout = dout.data_ptr();
  strides_of(dout, a.dout_batch_stride, a.dout_row_stride, a.dout_head_stride);
  a.dq = dq.data_ptr();
  strides_of(dq, a.dq_batch_stride, a.dq_row_stride, a.dq_head_stride);
  a.dsum = dsum.data_ptr<float>();
}

void launch(const mmict::AttentionArgs& a, bool backward, const char* op) {
  if (const char* why = mmict::attention_segment_error(a, backward)) MMICT_CHECK(false, op, "invalid arguments: ", why);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // = at::cuda::getCurrentCUDAStream()
  const cudaError_t err = backward ? mmict::attention_backward(a, stream) : mmict::attention_forward(a, stream);
  MMICT_CHECK(err == cudaSuccess, op, "kernel launch failed: ", cudaGetErrorString(err));
}

// Forward split-KV: num_splits > 0 forces it (tests), 0 lets the heuristic decide from the GPU's
// SM count. Allocates the float32 workspace when there is more than one split.
struct SplitWorkspace {
  Tensor partial_out, partial_lse;
};

SplitWorkspace plan_splits(mmict::AttentionArgs& a, const Tensor& q, int64_t keys_per_row, int64_t requested, const char* op) {
  MMICT_CHECK(requested >= 0 && requested <= mmict::kMaxSplits, op, "num_splits: expected 0 (auto) to ", mmict::kMaxSplits,
              ", got ", requested);
  int splits = static_cast<int>(requested);
  if (splits == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()) != cudaSuccess) {
      (void)cudaGetLastError();  // no split if the query fails: correct, only maybe slower
      sms = 0;
    }
    splits = mmict::attention_forward_num_splits(a, sms, keys_per_row);
  }
  a.num_splits = splits;
  SplitWorkspace ws;
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    ws.partial_out = at::empty({splits, q.size(0), q.size(2), q.size(1), q.size(3)}, f32);
    ws.partial_lse = at::empty({splits, q.size(0), q.size(2), q.size(1)}, f32);
    a.partial_out = ws.partial_out.data_ptr<float>();
    a.partial_lse = ws.partial_lse.data_ptr<float>();
  }
  return ws;
}

void check_lse(const Tensor& lse, const Tensor& q, const char* op) {
  MMICT_CHECK(lse.device() == q.device(), op, "lse: expected device ", q.device(), " (same as q), got ", lse.device());
  MMICT_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
              op, "lse: expected a contiguous float32 (B, H, Lq) tensor from the forward, got ", lse.scalar_type(), " ",
              lse.sizes());
}

// ------------------------------------------------------------------------------------------
// hub cross-attention: one segment (dense with optional right-padding lengths, or packed).

mmict::KvSegment hub_segment(const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens_k,
                             const std::optional<Tensor>& seqlens_k) {
  mmict::KvSegment s;
  set_kv(s, k, v);
  if (cu_seqlens_k.has_value()) {
    s.cu_seqlens = cu_seqlens_k->data_ptr<int32_t>();
    s.max_len = 0;  // the backward sets the longest sample
  } else {
    s.max_len = static_cast<int>(k.size(1));
    if (seqlens_k.has_value()) s.lengths = seqlens_k->data_ptr<int32_t>();
  }
  return s;
}

void check_hub_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens_k,
                      const std::optional<Tensor>& seqlens_k, const char* op) {
  MMICT_CHECK(q.is_cuda(), op, "q: expected a CUDA tensor, got device ", q.device());
  MMICT_CHECK(q.dim() == 4, op, "q: expected (B, Lq, H, D), got shape ", q.sizes());
  to_dtype(q, op, "q");
  MMICT_CHECK(q.stride(-1) == 1 || q.numel() == 0, op, "q: the last (head) dim must be contiguous");
  const int64_t dims = cu_seqlens_k.has_value() ? 3 : 4;
  check_float_input(k, q, op, "k", dims);
  check_float_input(v, q, op, "v", dims);
  MMICT_CHECK(k.sizes() == v.sizes(), op, "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  if (dims == 4) {
    MMICT_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op,
                "k: expected (B, Lk, H, D) with B, H, D of q ", q.sizes(), ", got ", k.sizes());
  } else {
    MMICT_CHECK(k.size(1) == q.size(2) && k.size(2) == q.size(3), op, "k: expected packed (total_k, H, D) with H, D of q ",
                q.sizes(), ", got ", k.sizes());
    MMICT_CHECK(!seqlens_k.has_value(), op, "seqlens_k: only for dense k/v (packed lengths come from cu_seqlens_k)");
  }
  check_index_input(cu_seqlens_k, q, op, "cu_seqlens_k", at::kInt, q.size(0) + 1);
  check_index_input(seqlens_k, q, op, "seqlens_k", at::kInt, q.size(0));
}

std::tuple<Tensor, Tensor> hub_cross_attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                    const std::optional<Tensor>& cu_seqlens_k,
                                                    const std::optional<Tensor>& seqlens_k, double scale, int64_t num_splits) {
  const char* op = "hub_cross_attention_fwd";
  check_hub_inputs(q_in, k_in, v_in, cu_seqlens_k, seqlens_k, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const std::optional<Tensor> cu = cu_seqlens_k.has_value() ? std::optional<Tensor>(cu_seqlens_k->contiguous()) : std::nullopt;
  const std::optional<Tensor> lens = seqlens_k.has_value() ? std::optional<Tensor>(seqlens_k->contiguous()) : std::nullopt;
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (k.numel() == 0) return {out.zero_(), lse.fill_(-std::numeric_limits<float>::infinity())};  // no image token anywhere
  mmict::AttentionArgs a = base_args(q, q.size(2), scale, op);
  set_outputs(a, out, lse);
  a.segments[0] = hub_segment(k, v, cu, lens);
  a.num_segments = 1;
  const int64_t keys_per_row = cu.has_value() ? k.size(0) / q.size(0) : k.size(1);
  const SplitWorkspace ws = plan_splits(a, q, keys_per_row, num_splits, op);
  launch(a, false, op);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> hub_cross_attention_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                           const Tensor& v_in, const Tensor& out_in, const Tensor& lse,
                                                           const std::optional<Tensor>& cu_seqlens_k,
                                                           const std::optional<Tensor>& seqlens_k, double scale) {
  const char* op = "hub_cross_attention_bwd";
  check_hub_inputs(q_in, k_in, v_in, cu_seqlens_k, seqlens_k, op);
  check_grad_input(dout_in, q_in, op, "dout");
  check_grad_input(out_in, q_in, op, "out");
  check_lse(lse, q_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), out = aligned(out_in), dout = aligned(dout_in);
  const std::optional<Tensor> cu = cu_seqlens_k.has_value() ? std::optional<Tensor>(cu_seqlens_k->contiguous()) : std::nullopt;
  const std::optional<Tensor> lens = seqlens_k.has_value() ? std::optional<Tensor>(seqlens_k->contiguous()) : std::nullopt;
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::zeros(k.sizes(), k.options());  // rows of keys nobody sees keep zero gradients
  Tensor dv = at::zeros(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) return {dq.zero_(), dk, dv};
  Tensor dsum = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  mmict::AttentionArgs a = base_args(q, q.size(2), scale, op);
  set_outputs(a, out, lse);
  set_backward(a, dout, dq, dsum);
  a.segments[0] = hub_segment(k, v, cu, lens);
  if (cu.has_value()) {
    // The dkdv grid needs the longest sample: one device sync, backward of packed inputs only.
    const int64_t b = q.size(0);
    a.segments[0].max_len = static_cast<int>((cu->narrow(0, 1, b) - cu->narrow(0, 0, b)).max().item<int32_t>());
  }
  set_dkv(a.segments[0], dk, dv);
  a.num_segments = 1;
  launch(a, true, op);
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------------------
// prefix attention: segment 0 = the row's group prefix, segment 1 = the row's own tokens.

void check_prefix_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k, const Tensor& prefix_v,
                         const Tensor& prefix_ids, const std::optional<Tensor>& prefix_lengths,
                         const std::optional<Tensor>& seqlens_k, const char* op) {
  MMICT_CHECK(q.is_cuda(), op, "q: expected a CUDA tensor, got device ", q.device());
  MMICT_CHECK(q.dim() == 4, op, "q: expected (B, Lq, H, D), got shape ", q.sizes());
  to_dtype(q, op, "q");
  MMICT_CHECK(q.stride(-1) == 1 || q.numel() == 0, op, "q: the last (head) dim must be contiguous");
  check_float_input(k, q, op, "k", 4);
  check_float_input(v, q, op, "v", 4);
  check_float_input(prefix_k, q, op, "prefix_k", 4);
  check_float_input(prefix_v, q, op, "prefix_v", 4);
  MMICT_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, "k: expected (B, Lk, Hkv, D) with B, D of q ", q.sizes(),
              ", got ", k.sizes());
  MMICT_CHECK(v.sizes() == k.sizes(), op, "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  MMICT_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, "k: the number of K/V heads (", k.size(2),
              ") must divide the number of query heads (", q.size(2), ")");
  MMICT_CHECK(prefix_k.size(0) >= 1 && prefix_k.size(2) == k.size(2) && prefix_k.size(3) == q.size(3), op,
              "prefix_k: expected (G, Lp, Hkv, D) with G >= 1 and Hkv, D of k, got ", prefix_k.sizes());
  MMICT_CHECK(prefix_v.sizes() == prefix_k.sizes(), op, "prefix_v: expected the shape of prefix_k ", prefix_k.sizes(), ", got ",
              prefix_v.sizes());
  check_index_input(prefix_ids, q, op, "prefix_ids", at::kLong, q.size(0));
  check_index_input(prefix_lengths, q, op, "prefix_lengths", at::kInt, prefix_k.size(0));
  check_index_input(seqlens_k, q, op, "seqlens_k", at::kInt, q.size(0));
}

struct PrefixInputs {
  Tensor q, k, v, prefix_k, prefix_v, prefix_ids;
  std::optional<Tensor> prefix_lengths, seqlens_k;
};

PrefixInputs prepare_prefix(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k, const Tensor& prefix_v,
                            const Tensor& prefix_ids, const std::optional<Tensor>& prefix_lengths,
                            const std::optional<Tensor>& seqlens_k) {
  PrefixInputs p{aligned(q), aligned(k), aligned(v), aligned(prefix_k), aligned(prefix_v), prefix_ids.contiguous(),
                 std::nullopt, std::nullopt};
  if (prefix_lengths.has_value()) p.prefix_lengths = prefix_lengths->contiguous();
  if (seqlens_k.has_value()) p.seqlens_k = seqlens_k->contiguous();
  return p;
}

// Segment 0 is the prefix and segment 1 the own tokens; an empty one (Lp == 0 or Lk == 0) is
// left out. Returns the indices of the prefix and own segments (-1 when left out).
std::pair<int, int> set_prefix_segments(mmict::AttentionArgs& a, const PrefixInputs& p, bool causal) {
  const bool has_prefix = p.prefix_k.size(1) > 0;
  const bool has_own = p.k.size(1) > 0;
  a.num_segments = static_cast<int>(has_prefix) + static_cast<int>(has_own);
  if (has_prefix) {
    mmict::KvSegment& pre = a.segments[0];
    set_kv(pre, p.prefix_k, p.prefix_v);
    pre.batch_index = p.prefix_ids.data_ptr<int64_t>();
    pre.num_batch_index_values = static_cast<int>(p.prefix_k.size(0));
    pre.max_len = static_cast<int>(p.prefix_k.size(1));
    if (p.prefix_lengths.has_value()) pre.lengths = p.prefix_lengths->data_ptr<int32_t>();
  }
  const int own_index = has_own ? (has_prefix ? 1 : 0) : -1;
  if (has_own) {
    mmict::KvSegment& own = a.segments[own_index];
    set_kv(own, p.k, p.v);
    own.max_len = static_cast<int>(p.k.size(1));
    own.left_pad = true;
    own.causal = causal;
    if (p.seqlens_k.has_value()) own.lengths = p.seqlens_k->data_ptr<int32_t>();
  }
  return {has_prefix ? 0 : -1, own_index};
}

std::tuple<Tensor, Tensor> prefix_attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                const Tensor& prefix_k_in, const Tensor& prefix_v_in, const Tensor& prefix_ids,
                                                bool causal, double scale, const std::optional<Tensor>& prefix_lengths,
                                                const std::optional<Tensor>& seqlens_k, bool /*deterministic: backward only*/,
                                                int64_t num_splits) {
  const char* op = "prefix_attention_fwd";
  check_prefix_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in, prefix_ids, prefix_lengths, seqlens_k, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const PrefixInputs p = prepare_prefix(q_in, k_in, v_in, prefix_k_in, prefix_v_in, prefix_ids, prefix_lengths, seqlens_k);
  Tensor out = at::empty(p.q.sizes(), p.q.options());
  Tensor lse = at::empty({p.q.size(0), p.q.size(2), p.q.size(1)}, p.q.options().dtype(at::kFloat));
  if (p.q.numel() == 0) return {out, lse};
  mmict::AttentionArgs a = base_args(p.q, p.k.size(2), scale, op);
  set_outputs(a, out, lse);
  set_prefix_segments(a, p, causal);
  if (a.num_segments == 0) return {out.zero_(), lse.fill_(-std::numeric_limits<float>::infinity())};  // no key at all
  const SplitWorkspace ws = plan_splits(a, p.q, p.prefix_k.size(1) + p.k.size(1), num_splits, op);
  launch(a, false, op);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> prefix_attention_bwd(
    const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& prefix_k_in,
    const Tensor& prefix_v_in, const Tensor& prefix_ids, const Tensor& out_in, const Tensor& lse, bool causal, double scale,
    const std::optional<Tensor>& prefix_lengths, const std::optional<Tensor>& seqlens_k, bool deterministic) {
  const char* op = "prefix_attention_bwd";
  check_prefix_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in, prefix_ids, prefix_lengths, seqlens_k, op);
  check_grad_input(dout_in, q_in, op, "dout");
  check_grad_input(out_in, q_in, op, "out");
  check_lse(lse, q_in, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const PrefixInputs p = prepare_prefix(q_in, k_in, v_in, prefix_k_in, prefix_v_in, prefix_ids, prefix_lengths, seqlens_k);
  const Tensor out = aligned(out_in), dout = aligned(dout_in);
  Tensor dq = at::zeros(p.q.sizes(), p.q.options());
  Tensor dk = at::zeros(p.k.sizes(), p.k.options());
  Tensor dv = at::zeros(p.v.sizes(), p.v.options());
  Tensor dprefix_k = at::zeros(p.prefix_k.sizes(), p.prefix_k.options());
  Tensor dprefix_v = at::zeros(p.prefix_v.sizes(), p.prefix_v.options());
  if (p.q.numel() == 0) return {dq, dk, dv, dprefix_k, dprefix_v};
  Tensor dsum = at::empty({p.q.size(0), p.q.size(2), p.q.size(1)}, p.q.options().dtype(at::kFloat));
  mmict::AttentionArgs a = base_args(p.q, p.k.size(2), scale, op);
  set_outputs(a, out, lse);
  set_backward(a, dout, dq, dsum);
  const auto [prefix, own] = set_prefix_segments(a, p, causal);
  if (a.num_segments == 0) return {dq, dk, dv, dprefix_k, dprefix_v};  // nothing attended: all zero
  if (own >= 0) set_dkv(a.segments[own], dk, dv);
  Tensor dk_accum, dv_accum;
  const bool atomic = prefix >= 0 && !deterministic;
  if (prefix >= 0) {
    set_dkv(a.segments[prefix], dprefix_k, dprefix_v);
    a.segments[prefix].deterministic = deterministic;
  }
  if (atomic) {
    dk_accum = at::zeros(p.prefix_k.sizes(), p.prefix_k.options().dtype(at::kFloat));
    dv_accum = at::zeros(p.prefix_v.sizes(), p.prefix_v.options().dtype(at::kFloat));
    a.segments[0].dk_accum = dk_accum.data_ptr<float>();
    a.segments[0].dv_accum = dv_accum.data_ptr<float>();
  }
  launch(a, true, op);
  if (atomic) {
    dprefix_k.copy_(dk_accum);
    dprefix_v.copy_(dv_accum);
  }
  return {dq, dk, dv, dprefix_k, dprefix_v};
}

}  // namespace

// Schemas. Shapes: q (B, Lq, H, D); hub k/v (B, Lk, H, D) or packed (total_k, H, D) with
// int32 cu_seqlens_k (B+1,); prefix k/v (B, Lk, Hkv, D), prefix_k/v (G, Lp, Hkv, D), int64
// prefix_ids (B,), int32 prefix_lengths (G,) and seqlens_k (B,); lse (B, H, Lq) float32.
// prefix_attention_fwd takes `deterministic` only so that its autograd formula (registered in
// Python from the forward's inputs) knows how to sum the prefix gradients; the forward ignores it.
// num_splits (forwards): 0 = choose split-KV from the GPU size, n >= 1 = exactly n key splits.
// A fragment of the `mmict` namespace: the Triton custom ops (registered from Python) live there too.
TORCH_LIBRARY_FRAGMENT(mmict, m) {
  m.def(
      "hub_cross_attention_cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_k, Tensor? seqlens_k, float scale,"
      " int num_splits=0) -> (Tensor out, Tensor lse)");
  m.def(
      "hub_cross_attention_cuda_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_k,"
      " Tensor? seqlens_k, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "prefix_attention_cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor prefix_ids, bool causal,"
      " float scale, Tensor? prefix_lengths, Tensor? seqlens_k, bool deterministic, int num_splits=0)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "prefix_attention_cuda_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor prefix_ids,"
      " Tensor out, Tensor lse, bool causal, float scale, Tensor? prefix_lengths, Tensor? seqlens_k, bool deterministic)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, Tensor dprefix_v)");
}

TORCH_LIBRARY_IMPL(mmict, CUDA, m) {
  m.impl("hub_cross_attention_cuda_fwd", &hub_cross_attention_fwd);
  m.impl("hub_cross_attention_cuda_bwd", &hub_cross_attention_bwd);
  m.impl("prefix_attention_cuda_fwd", &prefix_attention_fwd);
  m.impl("prefix_attention_cuda_bwd", &prefix_attention_bwd);
}

#ifndef MMICT_KERNELS_CUDA_ARCHS
#define MMICT_KERNELS_CUDA_ARCHS ""  // setup.py defines it: the architectures this build embeds SASS for
#endif

// `import mmict_kernels._C` loads this library, which runs the registrations above; the Python
// module holds one attribute, `cuda_archs` ("90a;80"): the backend registry refuses the cuda
// backend on a GPU that none of them runs on (no PTX is embedded to JIT from).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of mmict_kernels (torch.ops.mmict.*_cuda_*)",
                                          -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "cuda_archs", MMICT_KERNELS_CUDA_ARCHS) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
