#pragma once
// Requests a byte range (a matrix product's weights) into the L2 cache ahead of the product that reads it, so that
// the weight stream of a decode step's next product starts while the current kernel runs (docs/kernels/mamba3_cuda.md,
// "Weights requested into L2 ahead of their product").
#include <cuda_runtime.h>

#include <cstddef>

namespace mamba3::cuda {

// Queues on s a kernel that asks the L2 cache for [p, p + bytes) (Hopper's bulk L2 prefetch: a hint, no data is
// returned and nothing is written; the kernel ends once the requests are issued). Bytes past the last whole 16-byte
// unit are not requested. No-op for bytes < 16 or a null p; p must be 16-byte aligned (device allocations are).
// evict_last: the lines are cached with L2's evict-last priority (kept while evict-normal and evict-first lines, such
// as the Mamba-3 state kernels' streams, are replaced), else with the normal one.
void l2_prefetch(cudaStream_t s, const void* p, size_t bytes, bool evict_last = false);

}  // namespace mamba3::cuda
