#pragma once
// Backward of the row norms of ops/norm.h (spec §9.3), f32 in and out, float64 inside each row.
// RMSNorm y = x·s·w, s = (mean x² + ε)^−½:  dw += Σ dy·x·s;  dx = s·g − x·s³·mean(g·x), g = dy·w.
// LayerNorm y = x̂·w + b, x̂ = (x − mean)·s:  db += Σ dy;  dw += Σ dy·x̂;  dx = s·(g − mean(g) − x̂·mean(g·x̂)).
// Rows run in parallel; the weight/bias sums are formed per fixed block of rows and added in block order, so the
// result does not depend on the thread count.
#include <cstdint>

namespace mamba3 {

// x, dy, dx: (rows, D). dx is written, or added to when accumulate. dw (and db) are added to; b/db null for RMSNorm.
void rmsnorm_backward(const float* x, const float* dy, int64_t rows, int64_t D, const float* w, float eps, float* dx,
                      float* dw, bool accumulate = false);
void layernorm_backward(const float* x, const float* dy, int64_t rows, int64_t D, const float* w, float eps, float* dx,
                        float* dw, float* db, bool accumulate = false);

}  // namespace mamba3
