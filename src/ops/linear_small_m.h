#pragma once
// y = x·Wᵀ for few rows (M ≤ 16, the decode case): memory-bound on W, which is streamed once while every row of x
// stays in cache. Each output element is a fixed-order sum (8 lanes over K, then a fixed lane reduction), so the
// result of a row never depends on M or on how rows are tiled: decoding is batch-invariant (a forked or batched
// sequence gives bit-identical logits). Cost: 2·M·K·N FLOPs, 4·N·K bytes of W.
#include <cstdint>

namespace mamba3 {

constexpr int64_t kSmallM = 16;

void linear_small_m(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y);

}  // namespace mamba3
