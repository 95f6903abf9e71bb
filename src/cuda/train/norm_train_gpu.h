#pragma once
// Row norms of GPU training (spec §9.3), f32 in and out, the semantics and eps handling of ops/norm.h and
// ops/norm_backward.h: the forward's row statistics in float64; the backward's per-element terms and each lane's
// partial row sums in f32, the row sums across lanes and the row constants in float64:
//   RMSNorm   y = x·s·w,        s = (mean x² + ε)^−½
//   LayerNorm y = x̂·w + b,      x̂ = (x − mean)·s, s = (var + ε)^−½ (biased variance)
// Backward: RMSNorm dx = s·g − x·s³·mean(g·x), g = dy·w, dw += Σ dy·x·s; LayerNorm dx = s·(g − mean g − x̂·mean(g·x̂)),
// dw += Σ dy·x̂, db += Σ dy. The weight/bias sums are deterministic: per-block f32 partials over fixed row ranges
// (8 rows at the 125M step), then added in a fixed order in float64 (no atomics).
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/device_buffer.h"

namespace mamba3::cuda {

// One queued second stage of norm_backward_gpu: dw (and db) += the column sums of nblocks partial rows of D floats.
struct NormSumJob {
  const float* pw = nullptr;
  const float* pb = nullptr;
  int64_t nblocks = 0, D = 0;
  float* dw = nullptr;
  float* db = nullptr;
};

// The per-block partial sums of norm_backward_gpu (grow-only; reuse one per stream). With `defer`, a backward leaves
// its partials in the buffer and queues its sum instead of launching it; flush_norm_grad_sums launches every queued
// sum at once (a model's backward has one small, 24-block sum per norm: the 125M step's 25 norms took 9 µs each plus
// their launch gaps). The buffer then holds every queued norm's partials, up to `defer_budget_bytes` (a backward that
// would pass it flushes first). dw and db are complete only after the flush; the same bits as without deferral.
struct NormGradScratch {
  DeviceBuffer partial;
  bool defer = false;
  size_t defer_budget_bytes = size_t(192) << 20;
  size_t used_floats = 0;  // of partial, by the queued sums
  std::vector<NormSumJob> queued;
};

// Launches the sums scratch.defer queued (nothing when none), in one launch per kNormSumJobsPerLaunch.
void flush_norm_grad_sums(cudaStream_t s, NormGradScratch& scratch);
// Whether the LM trainer defers its norms' sums (MAMBA3_TRAIN_NORM_SUMS_DEFERRED, "1" or "0", unset: 1; read once).
bool norm_sums_deferred_by_default();

// x, y: (rows, D); b null = RMSNorm. y may alias x.
void norm_forward_gpu(cudaStream_t s, const float* x, int64_t rows, int64_t D, const float* w, const float* b,
                      float eps, float* y);

// The residual stream's step before a norm: res_out = prev + hidden (a copy of prev when hidden is null), then
// y = Norm(res_out) as norm_forward_gpu forms it (the same float64 statistics, summed in another order). res_out
// may alias prev, y may alias hidden; res_out and y must differ. y16 (optional, rows × D bf16 bits): y rounded to
// nearest even as well, for the bf16 mode's products (no separate rounding pass); y may then be null (not written).
// hidden16 (optional, rows × D bf16 bits): hidden given in bf16 (its producer's rounding) instead; hidden null then.
void residual_norm_forward_gpu(cudaStream_t s, const float* prev, const float* hidden, int64_t rows, int64_t D,
                               const float* w, const float* b, float eps, float* res_out, float* y,
                               uint16_t* y16 = nullptr, const uint16_t* hidden16 = nullptr);

// x, dy, dx: (rows, D). dx is written (it may alias dy), or added to when accumulate_dx. dw (D) and db (D) are
// added to; b_or_null and db_or_null are both null for RMSNorm (db_or_null may be null for LayerNorm to skip the
// bias gradient). dx16 (optional, rows × D bf16 bits): the final dx rounded to nearest even as well, for the bf16
// mode's products that read it next (TrainGemm::HeldA with A16).
// dy16 (optional, rows × D bf16 bits): dy given in bf16 (its producer's rounding) instead; dy null then (dx may not
// alias it).
void norm_backward_gpu(cudaStream_t s, const float* x, const float* dy, int64_t rows, int64_t D, const float* w,
                       const float* b_or_null, float eps, float* dx, bool accumulate_dx, float* dw, float* db_or_null,
                       NormGradScratch& scratch, uint16_t* dx16 = nullptr, const uint16_t* dy16 = nullptr);

// Widths D = 32·k (k ≤ 16 in the backward, ≤ 64 in the residual step) run kernels that hold a lane's columns in
// registers, and wider backward rows (D % 4 == 0, one row per warp) a kernel that stages them in shared memory
// (MAMBA3_TRAIN_NORM_STAGED=0 keeps the generic one there), all with the generic kernels' arithmetic and order (the
// same bits); off: the generic kernels everywhere (for the test that compares them). Process-wide, on by default.
void set_norm_register_rows(bool on);

// y[i] += x[i] for n floats.
void add_inplace_gpu(cudaStream_t s, float* y, const float* x, int64_t n);
// dst[i] = src[i] for n floats (ordered on s).
void copy_gpu(cudaStream_t s, float* dst, const float* src, int64_t n);

}  // namespace mamba3::cuda
