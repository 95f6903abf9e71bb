#pragma once
// Programmatic dependent launch (Hopper): a kernel launched with launch_pdl may start while the kernel before it in
// the stream is still running; it must call pdl_wait() before it reads anything that kernel (or an earlier one)
// writes, and before it writes anything. Code before pdl_wait() may read only immutable data (weights), or data its
// caller promises was written before a plain or graph launch that precedes this kernel (the head decode kernel's
// state rows under MAMBA3_DECODE_EARLY_STATE when the state is marked settled: CudaModel's decode steps start with
// the embedding's plain launch). Kernels call
// pdl_trigger() early so that the next kernel's blocks are scheduled while they run. At batch 1 a decode step is a
// chain of ~220 short kernels, where each launch's latency and each kernel's ramp-up are a large share of the step;
// PDL hides them and lets a matrix-vector product stream its weights before its input exists.
//
// Callers request PDL for small launches only (pdl_small(rows): at most kPdlMaxRows rows or sequences). Measured on
// an H200, 1.5B decode: b1 1.640 ms with PDL vs 1.660 without (second session). Thirty-first session, the decode's
// non-GEMM kernels (add + norm, the state kernels) under PDL or plain at each batch, ms per step: b16 1.655 vs 1.746,
// b32 2.203 vs 2.267, b64 3.303 vs 3.318, b96 4.273 vs 4.247, b128 5.168 vs 5.145 (MIMO: b16 1.784 vs 1.840, b64
// 3.657 vs 3.673), so the threshold is 64. One exception: a decode step whose products are the stream GEMM's at 65–128
// rows (the norms folded) launches its Mamba-3 head kernels under PDL at any batch (Mamba3GpuState::pdl_any_batch;
// H100, forty-first session: b128 6.45 → 6.40 ms). MAMBA3_PDL=0 launches every kernel plainly; read once per process.
// Without the attribute, pdl_wait() and pdl_trigger() do nothing.
//
// Training: every kernel under src/cuda/train calls pdl_wait() first (tests/cuda/test_pdl_wait_first.cpp checks the
// sources) and is launched by launch_train with the attribute, without an early trigger. A chain of dependent kernels
// on an H200 (bench/bench_pdl_chain) took 0.8–1.8 µs less per boundary that way, and an early trigger gained nothing
// more; the training step has ~350 boundaries between its own kernels. MAMBA3_TRAIN_PDL=0 launches them plainly.
#include <utility>

#include <cuda_runtime.h>

#include "cuda/cuda_check.h"

namespace mamba3::cuda {

bool pdl_enabled();
bool train_pdl_enabled();

constexpr int64_t kPdlMaxRows = 64;
// kPdlMaxRows, or MAMBA3_PDL_MAX_ROWS (read once) to measure other thresholds.
int64_t pdl_max_rows();
inline bool pdl_small(int64_t rows) { return rows <= pdl_max_rows(); }

#ifdef __CUDACC__
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The first statement of a training kernel launched beside the kernel before it (instead of pdl_wait()): that kernel
// calls pdl_trigger() right after its own pdl_wait(), so this one starts while it runs, and everything this one reads
// or writes was complete, and not in use, before that kernel began. It calls pdl_wait() before it exits, so that its
// completion implies its predecessor's for the kernels after it (test_pdl_wait_first checks both calls). A marker.
__device__ __forceinline__ void pdl_beside() {}

// Launches `kernel` with the PDL attribute when `use` (and MAMBA3_PDL is not 0), else plainly.
template <typename... KernelArgs, typename... Args>
void launch_pdl(bool use, void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t s,
                Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = s;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = use && pdl_enabled() ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 1;
  MAMBA3_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// A training kernel's launch (the kernel calls pdl_wait() before anything else).
template <typename... KernelArgs, typename... Args>
void launch_train(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t s,
                  Args&&... args) {
  launch_pdl(train_pdl_enabled(), kernel, grid, block, shared_bytes, s, std::forward<Args>(args)...);
}
#endif

}  // namespace mamba3::cuda
