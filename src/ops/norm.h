#pragma once
// Row norms of the residual stream (spec §9.3), f32: RMSNorm y = x·(mean x² + ε)^−½·w;
// LayerNorm y = (x − mean)·(var + ε)^−½·w + b (biased variance). Cost: 2 reads + 1 write of each row.
#include <cstdint>

namespace mamba3 {

// x, y: (rows, D); bias null for RMSNorm. y may alias x.
void rmsnorm(const float* x, int64_t rows, int64_t D, const float* w, float eps, float* y);
void layernorm(const float* x, int64_t rows, int64_t D, const float* w, const float* b, float eps, float* y);

}  // namespace mamba3
