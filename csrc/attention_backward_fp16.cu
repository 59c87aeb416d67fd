// backward pass of the attention kernels for __half (one translation unit per pass and dtype).
#include "kernels/dispatch.cuh"

namespace mmict {
template cudaError_t backward_impl<__half>(const AttentionArgs&, cudaStream_t);
}  // namespace mmict
