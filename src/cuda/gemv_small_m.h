#pragma once
// y (M, N) f32 = x (M, K) · Wᵀ for a handful of rows (decode at small batch) with bf16 W and x: a memory-bound
// matrix-vector kernel that streams W once at close to the copy bandwidth (cuBLAS's general kernels leave about half
// of it unused at M = 1). One warp (or 2–4 splitting K) per output row, 16-byte loads, f32 accumulation.
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

namespace mamba3::cuda {

constexpr int64_t kGemvMaxRows = 8;
// The rows up to which linear() takes this kernel over cuBLAS. From 5 rows on it is bound by instructions (every row's
// x loads and FMAs per 16-byte weight piece), not by the weight stream: 1.5B decode step on an H200, b4 1.77 ms, b5
// 2.15, b8 2.72, while cuBLAS streams the weights in about 2.1 ms at any small batch (b12 2.13).
constexpr int64_t kGemvPreferredRows = 4;

// Whether the kernel handles this shape: 1 ≤ m ≤ kGemvMaxRows, K a multiple of 8, 16-byte aligned rows.
bool gemv_small_m_supported(int64_t m, int64_t k, int64_t x_stride, const void* w, const void* x);

// Requests of W into L2 made before the kernel waits for the one before it (hints: the same results either way). Off:
// each lane's first window of pieces only, into registers. Bulk: the blocks resident at once also ask L2 for all of W
// between them, up to 3/4 of the device's L2 (bulk requests by one warp per block), so that under PDL more of the
// weight stream runs beside that kernel — measured slower on an H200 (thirty-fifth session), as was each lane asking
// L2 for its own next pieces (prefetch.global.L2; thirty-sixth session, removed).
enum class GemvPrefetch { Off, Bulk };

// W (N, K) bf16 row-major; x (M, K) bf16 with rows x_stride elements apart; y (M, N) f32 with rows y_stride apart.
// Every kernel here is launched under PDL and reads W before it waits for the kernel before it (pdl.h): W must be
// memory that no kernel of the stream writes (weights), or the first reads race with that kernel's writes.
// k_split: warps per output column (1, 2 or 4); 0: gemv_small_m_split's choice. prefetch unset: MAMBA3_GEMV_PREFETCH
// (0 | 1 = Bulk; default 0; read once).
void gemv_small_m(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                  float* y, int64_t y_stride, int k_split = 0, std::optional<GemvPrefetch> prefetch = std::nullopt);

// The GatedMLP's fc1 and activation in one launch: W (N, K) holds N/2 (value, gate) row pairs (rows 2j, 2j + 1);
// act (M, N/2) bf16 = bf16(y_2j · silu(y_2j+1)) where y = x · Wᵀ in f32 — the same bits as gemv_small_m followed by
// gated_silu() (which reads y's columns as the same pairs). N even, 1 ≤ M ≤ kGemvPairsMaxRows; supported shapes
// as for gemv_small_m. Saves the activation kernel's launch per block at batch 1–4.
constexpr int64_t kGemvPairsMaxRows = kGemvPreferredRows;
void gemv_small_m_gated_pairs(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                              int64_t x_stride, void* act, int k_split = 0,
                              std::optional<GemvPrefetch> prefetch = std::nullopt);

// RMSNorm folded into the products at one row (a decode step at batch 1; docs/kernels/mamba3_cuda.md). The add + norm
// between a product P (out_proj, fc2) and the next C (fc1, in_proj) is a kernel whose loads, block reduction and stores
// sit on the step's critical path between the two products. Folded: P's blocks add the residual to their columns and
// write bf16(v · g) and one partial Σ v² per block; every block of C sums the partials itself (a fixed order, so every
// block gets the same bits) and scales its dot products by rstd: y = rstd · W·bf16(v · g) where the norm kernel gives
// W·bf16(v · rstd · g) — another rounding of the same value. No atomics, no counters.
struct GemvNormArgs {  // the kernel's view (both halves; the unused one stays zero)
  float* residual = nullptr;
  const float* weight = nullptr;
  void* out16 = nullptr;  // __nv_bfloat16 on the device
  float* partials_out = nullptr;
  const float* partials_in = nullptr;
  int64_t parts = 0, d = 0;
  float eps = 0.0f;
};
// P's half: residual (N) f32 updated in place; weight (N) the norm's; out16 (N) bf16; partials (gemv_norm_parts(N, K)).
struct GemvResidualNorm {
  float* residual = nullptr;
  const float* weight = nullptr;
  void* out16 = nullptr;
  float* partials = nullptr;
};
// C's half: P's partials, their count, the norm's width d (C's K) and epsilon.
struct GemvRowScale {
  const float* partials = nullptr;
  int64_t parts = 0, d = 0;
  float eps = 0.0f;
};
// The partials a residual-norm product of (N, K) writes: its block count.
int64_t gemv_norm_parts(int64_t n, int64_t k);
// One row x (K) bf16: v = x·Wᵀ + residual → residual; bf16(v ⊙ weight) → out16; partials as above. Nothing else
// written.
void gemv_small_m_residual_norm(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x,
                                const GemvResidualNorm& out);
// One row: y (N) f32 = rstd · x·Wᵀ, and the gated-pairs form act = bf16(rstd·y_2j · silu(rstd·y_2j+1)).
void gemv_small_m_scaled(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, float* y,
                         const GemvRowScale& in);
void gemv_small_m_gated_pairs_scaled(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, void* act,
                                     const GemvRowScale& in);

// Warps per column the kernel uses for an (N, K) product by default: the split (1, 2 or 4; 1 when K < 1024 or
// MAMBA3_GEMV_KSPLIT=0) whose N·split warps fill their last wave on this device best (1.5B: out_proj/fc2 4, in_proj
// 4, fc1 1). A row's result depends only on (N, K, split), not on M.
int gemv_small_m_split(int64_t n, int64_t k);

}  // namespace mamba3::cuda
