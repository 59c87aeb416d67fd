// Tile choices per (dtype, head dim) and the launch order of the forward and backward passes.
// Included by one translation unit per (pass, dtype) so nvcc builds them in parallel.
#pragma once

#include "backward.cuh"
#include "forward.cuh"

namespace mmict {

// 64 keys per block for both head dims: at D = 128 the forward then holds Q + 2 stages of K and
// V in 80 KiB (two CTAs per SM on Hopper and Ampere). Query tiles: 32 rows (2 warps) for the
// short M-Hub query block (32 learned queries) so that B x H CTAs stay busy; 64 rows (4 warps)
// for long queries, which halves how often K/V stream through L2.
constexpr int kBlockKeys = 64;
constexpr int kBackwardQueryTile = 32;

template <typename T, int D>
cudaError_t forward_for_head_dim(const AttentionArgs& args, cudaStream_t stream) {
  if (args.len_q <= 32) return launch_forward_kernel<T, D, 32, kBlockKeys>(args, stream);
  return launch_forward_kernel<T, D, 64, kBlockKeys>(args, stream);
}

template <typename T>
cudaError_t forward_impl(const AttentionArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.len_q == 0 || args.heads == 0) return cudaSuccess;
  return args.head_dim == 64 ? forward_for_head_dim<T, 64>(args, stream) : forward_for_head_dim<T, 128>(args, stream);
}

template <typename T, int D>
cudaError_t backward_for_head_dim(const AttentionArgs& args, cudaStream_t stream) {
  cudaError_t err = launch_dsum_kernel<T>(args, stream);
  if (err != cudaSuccess) return err;
  err = launch_dq_kernel<T, D, kBackwardQueryTile, kBlockKeys>(args, stream);
  if (err != cudaSuccess) return err;
  for (int s = 0; s < args.num_segments; ++s) {
    err = launch_dkdv_kernel<T, D, kBlockKeys, kBackwardQueryTile>(args, args.segments[s], stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t backward_impl(const AttentionArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.len_q == 0 || args.heads == 0) return cudaSuccess;
  return args.head_dim == 64 ? backward_for_head_dim<T, 64>(args, stream) : backward_for_head_dim<T, 128>(args, stream);
}

}  // namespace mmict
