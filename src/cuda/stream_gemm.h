#pragma once
// y (M, N) f32 = x (M, K) · Wᵀ for the decode step's products at 1–128 rows on Hopper: W (bf16, read once) streams
// through the bulk tensor copy engine into a ring of shared-memory stages and the tensor cores (wgmma, batch as the
// instruction's N) multiply it with x. Each tile of weight rows (128 up to 64 batch rows, 256 or 128 in the wide class
// for 65–128) is split over K between the blocks of a thread-block cluster (none when the tiles fill the SMs; at most
// 8), whose parts meet in distributed shared memory and are added in rank order (deterministic, no global scratch).
// linear() uses it by default for 2–64 rows, where the decode step measured 2.5–19 % faster than with cuBLAS or the
// matrix-vector kernel (docs/kernels/stream_gemm.md); 65–128 rows for the folded norms' products by default and for
// every product under MAMBA3_STREAM_GEMM=all (the wide class ran 10–20 % behind cuBLAS per product on an H100; with
// the norms folded the b128 step gains 0.7–1.9 %).
#include <cstddef>
#include <cstdint>

#include "cuda/gemv_small_m.h"

namespace mamba3::cuda {

class Context;

constexpr int64_t kStreamGemmNarrowMaxRows = 64, kStreamGemmMaxRows = 128;

// Whether the kernel takes this product: a compute capability 9.0 device, 1 ≤ m ≤ kStreamGemmMaxRows, N ≥ 1,
// K a multiple of 8, x_stride a multiple of 8, both base pointers 16-byte aligned.
bool stream_gemm_supported(const Context& ctx, int64_t m, int64_t n, int64_t k, int64_t x_stride, const void* w,
                           const void* x);

// W (N, K) bf16 row-major; x (M, K) bf16 with rows x_stride elements apart; y (M, N) f32 with rows y_stride apart.
// Launched under PDL, the kernel requests its first W stages before it waits for the kernel before it (pdl.h): W must
// be memory that no kernel of the stream writes (weights). Throws when !stream_gemm_supported.
void stream_gemm(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                 int64_t x_stride, float* y, int64_t y_stride);

// The GatedMLP's fc1 with its activation in the epilogue: W's rows are (value, gate) pairs (2j, 2j + 1) and
// act (M, N/2) bf16 = bf16(y_2j · silu(y_2j+1)), the bits of stream_gemm followed by gated_silu(). Supported when
// stream_gemm is, N is even and the shape's tiles are not split over K (wide products: the 1.5B fc1) or their split
// tiles are added by the row epilogue (stream_gemm_row_epilogue).
bool stream_gemm_gated_pairs_supported(const Context& ctx, int64_t m, int64_t n, int64_t k, int64_t x_stride,
                                       const void* w, const void* x);
void stream_gemm_gated_pairs(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                             int64_t x_stride, void* act);

// RMSNorm folded into the wide class's products (65–128 rows of a decode step), the way gemv_small_m.h folds it at
// one row: the product P before a norm (out_proj, fc2) adds the residual and writes bf16(v ⊙ g) and partial Σ v²; the
// product C after it (in_proj, fc1) scales its outputs by each batch row's rstd, summing the partials itself (in a
// fixed order: no atomics, no counters). The partials: [stream_gemm_norm_parts(N, K) of P][kStreamGemmMaxRows] f32,
// Σ v² over each of P's tiles per batch row. GemvRowScale's d is the norm's width (C's K).
// Whether the folded forms take this shape (the wide class: 65–128 rows; the calls also need stream_gemm_supported's
// strides and alignments).
bool stream_gemm_folds_norms(const Context& ctx, int64_t m, int64_t n, int64_t k);
int64_t stream_gemm_norm_parts(const Context& ctx, int64_t n, int64_t k);
// P: v = x·Wᵀ + residual → residual (M, N), rows N apart; bf16(v ⊙ out.weight) → out.out16 (M, N); partials.
void stream_gemm_residual_norm(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                               int64_t x_stride, const GemvResidualNorm& out);
// C: y = rstd ⊙ x·Wᵀ, and the gated-pairs form act = bf16(rstd·y_2j · silu(rstd·y_2j+1)).
void stream_gemm_scaled(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                        int64_t x_stride, float* y, int64_t y_stride, const GemvRowScale& in);
void stream_gemm_gated_pairs_scaled(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                                    int64_t x_stride, void* act, const GemvRowScale& in);

// Whether an m-row product ends in the row epilogue (whole batch rows added over the cluster and stored along the
// weight rows; it takes the gated epilogue on split tiles too): the wide class always, the narrow forms under
// the default MAMBA3_STREAM_GEMM_EPILOGUE=rows (=fragments: stores from the accumulators, split tiles' gated epilogue
// refused).
bool stream_gemm_row_epilogue(int64_t m);

// The grid of the wide class (65–128 rows) for an N × K product on this device: weight rows per tile (256 or 128)
// and blocks per tile (tests and benchmarks).
struct StreamGemmWideGrid {
  int tile_rows, split;
};
StreamGemmWideGrid stream_gemm_wide_grid(const Context& ctx, int64_t n, int64_t k);

// Whether linear() routes an m-row bf16 product here (when supported): MAMBA3_STREAM_GEMM = auto or unset: 2–64 rows
// (fewer: the matrix-vector kernel; more: cuBLAS); 0: never (cuBLAS and the matrix-vector kernel); all: every m
// (65–128 rows through the wide form). Read once per process. (fc1 follows the same route with the GatedMLP activation
// fused: linear_gated_silu.)
bool stream_gemm_preferred(int64_t m);
// Whether a decode step of m rows folds its RMSNorms into the wide class's products (stream_gemm_residual_norm,
// stream_gemm_scaled, stream_gemm_gated_pairs_scaled; CudaModel decides per model whether its blocks fold):
// MAMBA3_STREAM_GEMM = auto or unset, and all: 65–128 rows; 0: never. At those rows plain products stay on cuBLAS
// under auto: a step that folds (SISO) gains more by the fold than its products lose against cuBLAS, and a step that
// cannot fold (MIMO) would only lose (docs/kernels/stream_gemm.md, "Forty-first session").
bool stream_gemm_folds_preferred(int64_t m);

}  // namespace mamba3::cuda
