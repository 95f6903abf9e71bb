#include <algorithm>
#include <cstdint>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/l2_prefetch.cuh"
#include "cuda/l2_prefetch.h"

namespace mamba3::cuda {
namespace {

constexpr int kThreads = 32;

// Thread i of the grid requests pieces i, i + grid threads, ….
template <bool EvictLast>
__global__ void l2_prefetch_kernel(const char* p, uint64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t policy = 0;
  if constexpr (EvictLast) asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  l2_prefetch_pieces(p, bytes, uint64_t(blockIdx.x) * blockDim.x + threadIdx.x, uint64_t(gridDim.x) * blockDim.x,
                     EvictLast, policy);
#endif
}

}  // namespace

void l2_prefetch(cudaStream_t s, const void* p, size_t bytes, bool evict_last) {
  bytes &= ~size_t(15);
  if (p == nullptr || bytes == 0) return;
  MAMBA3_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "l2_prefetch: address {} is not 16-byte aligned", p);
  const uint64_t pieces = (bytes + kL2PrefetchPieceBytes - 1) / kL2PrefetchPieceBytes;
  // A few requests per thread over up to 64 blocks: the requests spread over many SMs' copy engines.
  const unsigned blocks = unsigned(std::clamp<uint64_t>((pieces + 4 * kThreads - 1) / (4 * kThreads), 1, 64));
  if (evict_last)
    l2_prefetch_kernel<true><<<blocks, kThreads, 0, s>>>(static_cast<const char*>(p), bytes);
  else
    l2_prefetch_kernel<false><<<blocks, kThreads, 0, s>>>(static_cast<const char*>(p), bytes);
  MAMBA3_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mamba3::cuda
