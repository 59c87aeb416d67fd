// Host-only checks of csrc/attention_api (no GPU needed, no kernel launched): argument
// validation messages, invalid launches refused before touching the device, and the split-KV
// heuristic. Built and run by scripts/compile_csrc.sh (CMake target mmict_api_host_test).
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "attention_api.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

void expect_error(const mmict::AttentionArgs& a, bool backward, const char* needle) {
  const char* why = mmict::attention_segment_error(a, backward);
  if (why == nullptr || std::strstr(why, needle) == nullptr) {
    std::fprintf(stderr, "FAIL: expected an error containing '%s', got '%s'\n", needle, why ? why : "(none)");
    ++failures;
  }
}

alignas(16) uint16_t buffer[1024];  // stands in for device memory: only addresses are looked at

mmict::AttentionArgs valid_hub_args() {
  mmict::AttentionArgs a;
  a.dtype = mmict::DType::kBFloat16;
  a.head_dim = 64;
  a.batch = 2, a.len_q = 32, a.heads = 12, a.kv_heads = 12;
  a.softmax_scale = 0.125f;
  a.q = buffer, a.out = buffer, a.lse = reinterpret_cast<float*>(buffer);
  a.q_batch_stride = 32 * 12 * 64, a.q_row_stride = 12 * 64, a.q_head_stride = 64;
  a.out_batch_stride = a.q_batch_stride, a.out_row_stride = a.q_row_stride, a.out_head_stride = 64;
  mmict::KvSegment& s = a.segments[0];
  s.k = buffer, s.v = buffer;
  s.k_batch_stride = s.v_batch_stride = 257 * 12 * 64;
  s.k_row_stride = s.v_row_stride = 12 * 64;
  s.k_head_stride = s.v_head_stride = 64;
  s.max_len = 257;
  a.num_segments = 1;
  return a;
}

}  // namespace

int main() {
  mmict::AttentionArgs a = valid_hub_args();
  expect(mmict::attention_segment_error(a, false) == nullptr, "valid forward arguments are accepted");

  mmict::AttentionArgs bad = a;
  bad.head_dim = 96;
  expect_error(bad, false, "head_dim");
  expect(mmict::attention_forward(bad, nullptr) == cudaErrorInvalidValue, "an invalid forward is refused before launching");
  bad = a;
  bad.kv_heads = 5;
  expect_error(bad, false, "kv_heads");
  bad = a;
  bad.q = reinterpret_cast<const char*>(buffer) + 2;
  expect_error(bad, false, "16-byte aligned");
  bad = a;
  bad.segments[0].k_row_stride = 12 * 64 + 4;
  expect_error(bad, false, "multiples of 8");
  bad = a;
  bad.num_splits = 2;  // no workspace
  expect_error(bad, false, "workspace");
  expect_error(a, true, "dout");  // a backward needs dout / dq / dsum
  expect(mmict::attention_backward(a, nullptr) == cudaErrorInvalidValue, "an invalid backward is refused before launching");
  bad = a;
  bad.segments[0].batch_index = reinterpret_cast<const int64_t*>(buffer);
  bad.segments[0].num_batch_index_values = 1;
  bad.segments[0].deterministic = false;
  bad.dout = buffer, bad.dq = buffer, bad.dsum = reinterpret_cast<float*>(buffer);
  bad.dout_batch_stride = bad.dq_batch_stride = a.q_batch_stride;
  bad.dout_row_stride = bad.dq_row_stride = a.q_row_stride;
  bad.dout_head_stride = bad.dq_head_stride = 64;
  expect_error(bad, true, "dk_accum");

  // Split-KV heuristic on a 132-SM GPU.
  expect(mmict::attention_forward_num_splits(a, 132, 257) == 1, "hub with few key blocks: no split");
  mmict::AttentionArgs decode = a;
  decode.batch = 2, decode.len_q = 1, decode.heads = 4;
  expect(mmict::attention_forward_num_splits(decode, 132, 2500) == 10, "decode, 40 key blocks: 10 splits of 4 blocks");
  expect(mmict::attention_forward_num_splits(decode, 132, 100000) == mmict::kMaxSplits, "very long prefix: capped");
  mmict::AttentionArgs big = a;
  big.batch = 64;
  expect(mmict::attention_forward_num_splits(big, 132, 100000) == 1, "enough CTAs: no split");
  expect(mmict::attention_forward_num_splits(decode, 0, 2500) == 1, "unknown SM count: no split");

  if (failures == 0) std::printf("api_host_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
