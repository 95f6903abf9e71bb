#include "ops/norm.h"

#include <cmath>

#include "core/parallel.h"

namespace mamba3 {

void rmsnorm(const float* x, int64_t rows, int64_t D, const float* w, float eps, float* y) {
  parallel_for(rows, [&](int64_t r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    double ss = 0;  // double accumulation: rows are long (d_model) and the cost is negligible
    for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
    const float s = float(1.0 / std::sqrt(ss / double(D) + eps));
    for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * s * w[i];
  });
}

void layernorm(const float* x, int64_t rows, int64_t D, const float* w, const float* b, float eps, float* y) {
  parallel_for(rows, [&](int64_t r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    double sum = 0, ss = 0;
    for (int64_t i = 0; i < D; ++i) sum += xr[i];
    const double mean = sum / double(D);
    for (int64_t i = 0; i < D; ++i) ss += (xr[i] - mean) * (xr[i] - mean);
    const float s = float(1.0 / std::sqrt(ss / double(D) + eps));
    const float m = float(mean);
    for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - m) * s * w[i] + (b ? b[i] : 0.0f);
  });
}

}  // namespace mamba3
