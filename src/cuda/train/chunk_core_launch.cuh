#pragma once
// Host side shared by the training chunk cores (mamba3_train_fwd_core.cu, mamba3_train_bwd_core.cu): the shapes they
// are compiled for, the dispatch from runtime (N, P) to those instances, and the launch of one 128-thread block per
// (sequence, head, chunk) with its dynamic shared memory.
#include <type_traits>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mma_bf16.cuh"

namespace mamba3::cuda::train_detail {

constexpr int kCoreRows = 64;  // chunk rows every core takes

// The bf16 mode, 64-row chunks, N ∈ {32, 64, 128}, P ∈ {32, 64}.
inline bool core_shape_supported(const BatchedParams& p) {
  const int N = p.d.N, P = p.d.P;
  return p.bf16 && p.rows == kCoreRows && (N == 32 || N == 64 || N == 128) && (P == 32 || P == 64);
}

// f(std::integral_constant<int, N>, std::integral_constant<int, P>) for the instance of p's (N, P)
// (core_shape_supported must hold).
template <typename F>
void dispatch_core_shape(const BatchedParams& p, F&& f) {
  using std::integral_constant;
  const int N = p.d.N, P = p.d.P;
  if (N == 128 && P == 64) return f(integral_constant<int, 128>{}, integral_constant<int, 64>{});
  if (N == 128 && P == 32) return f(integral_constant<int, 128>{}, integral_constant<int, 32>{});
  if (N == 64 && P == 64) return f(integral_constant<int, 64>{}, integral_constant<int, 64>{});
  if (N == 64 && P == 32) return f(integral_constant<int, 64>{}, integral_constant<int, 32>{});
  if (N == 32 && P == 64) return f(integral_constant<int, 32>{}, integral_constant<int, 64>{});
  return f(integral_constant<int, 32>{}, integral_constant<int, 32>{});
}

// One block of mma_bf16::kCoreThreads per (sequence, head, chunk), `bytes` of dynamic shared memory (opted in above
// the 48 KB default). `what` names the core in errors.
template <typename... KArgs, typename... Args>
void launch_core(void (*kernel)(KArgs...), const char* what, cudaStream_t s, const BatchedParams& p, size_t bytes,
                 Args... args) {
  if (bytes > 48 * 1024)
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  const int64_t blocks = int64_t(p.d.B) * p.d.H * p.nc;
  MAMBA3_CHECK(blocks <= 0x7fffffff, "{}: {} blocks exceed the grid", what, blocks);
  launch_train(kernel, unsigned(blocks), mma_bf16::kCoreThreads, bytes, s, args...);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda::train_detail
