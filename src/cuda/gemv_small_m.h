#pragma once
// y (M, N) f32 = x (M, K) · Wᵀ for a handful of rows (decode at small batch) with bf16 W and x: a memory-bound
// matrix-vector kernel that streams W once at close to the copy bandwidth (cuBLAS's general kernels leave about half
// of it unused at M = 1). One warp (or 2–4 splitting K) per output row, 16-byte loads, f32 accumulation.
#include <cstdint>

#include <cuda_runtime.h>

namespace mamba3::cuda {

constexpr int64_t kGemvMaxRows = 8;

// Whether the kernel handles this shape: 1 ≤ m ≤ kGemvMaxRows, K a multiple of 8, 16-byte aligned rows.
bool gemv_small_m_supported(int64_t m, int64_t k, int64_t x_stride, const void* w, const void* x);

// W (N, K) bf16 row-major; x (M, K) bf16 with rows x_stride elements apart; y (M, N) f32 with rows y_stride apart.
// k_split: warps per output column (1, 2 or 4); 0: gemv_small_m_split's choice.
void gemv_small_m(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                  float* y, int64_t y_stride, int k_split = 0);

// Warps per column the kernel uses for an (N, K) product by default: 4 for narrow products (N ≤ 4096, K ≥ 1024)
// unless MAMBA3_GEMV_KSPLIT=0, else 1. A row's result depends only on (N, K, split), not on M.
int gemv_small_m_split(int64_t n, int64_t k);

}  // namespace mamba3::cuda
