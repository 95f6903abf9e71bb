#pragma once
// Device side of the bulk L2 prefetch (l2_prefetch.h): a thread's share of the requests for a byte range.
#include <cstdint>

namespace mamba3::cuda {

constexpr uint32_t kL2PrefetchPieceBytes = 32 * 1024;  // one bulk request; a multiple of 16

// Requests pieces first, first + step, … of [p, p + bytes) into L2 (the last piece cut to the range's end). p must be
// 16-byte aligned and bytes a multiple of 16. A hint (Hopper's cp.async.bulk.prefetch.L2): nothing is returned or
// written, and the thread moves on once the request is issued. `policy` is an L2 cache policy from createpolicy,
// used when `with_policy`. No-op before sm_90.
__device__ __forceinline__ void l2_prefetch_pieces(const char* p, uint64_t bytes, uint64_t first, uint64_t step,
                                                   bool with_policy = false, uint64_t policy = 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint64_t pieces = (bytes + kL2PrefetchPieceBytes - 1) / kL2PrefetchPieceBytes;
  for (uint64_t i = first; i < pieces; i += step) {
    const uint64_t start = i * kL2PrefetchPieceBytes;
    const uint32_t size = bytes - start < kL2PrefetchPieceBytes ? uint32_t(bytes - start) : kL2PrefetchPieceBytes;
    if (with_policy)
      asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(p + start), "r"(size),
                   "l"(policy)
                   : "memory");
    else
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + start), "r"(size) : "memory");
  }
#endif
}

}  // namespace mamba3::cuda
