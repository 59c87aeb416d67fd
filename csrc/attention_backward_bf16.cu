// backward pass of the attention kernels for __nv_bfloat16 (one translation unit per pass and dtype).
#include "kernels/dispatch.cuh"

namespace mmict {
template cudaError_t backward_impl<__nv_bfloat16>(const AttentionArgs&, cudaStream_t);
}  // namespace mmict
