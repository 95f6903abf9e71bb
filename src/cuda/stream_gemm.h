#pragma once
// y (M, N) f32 = x (M, K) · Wᵀ for the decode step's products at 1–128 rows on Hopper: W (bf16, read once) streams
// through the bulk tensor copy engine into a ring of shared-memory stages and the tensor cores (wgmma, batch as the
// instruction's N) multiply it with x. A persistent grid of one block per SM splits the (row tile, k-block) work
// evenly ("stream-K"), so every SM streams the same share of W whatever N and K are; the parts of a row tile split
// between blocks are added in block order by a small fix-up kernel (deterministic; no waiting between blocks).
// Opt-in (MAMBA3_STREAM_GEMM): in a decode step it is still slower than cuBLAS — the split tiles' fix-up costs more
// than the weight stream gains (docs/kernels/stream_gemm.md has the measurements and the way forward).
#include <cstddef>
#include <cstdint>

namespace mamba3::cuda {

class Context;

constexpr int64_t kStreamGemmMaxRows = 128;

// Scratch the kernel needs per context (two partial tiles per block), for a device with `sm_count` SMs.
size_t stream_gemm_scratch_bytes(int sm_count);

// Whether the kernel takes this product: a compute capability 9.0 device, 1 ≤ m ≤ kStreamGemmMaxRows, N ≥ 1,
// K a multiple of 8, x_stride a multiple of 8, both base pointers 16-byte aligned.
bool stream_gemm_supported(const Context& ctx, int64_t m, int64_t n, int64_t k, int64_t x_stride, const void* w,
                           const void* x);

// W (N, K) bf16 row-major; x (M, K) bf16 with rows x_stride elements apart; y (M, N) f32 with rows y_stride apart.
// Throws when !stream_gemm_supported.
void stream_gemm(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                 int64_t x_stride, float* y, int64_t y_stride);

// Whether linear() routes m-row bf16 products here (when supported): MAMBA3_STREAM_GEMM = 0 or unset: never (cuBLAS
// and the matrix-vector kernel); 1: from 5 rows on; all: every m. Read once per process.
bool stream_gemm_preferred(int64_t m);

}  // namespace mamba3::cuda
