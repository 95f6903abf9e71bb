#pragma once
// y = x·Wᵀ (PyTorch Linear without bias): x (M, K), W (Nout, K), y (M, Nout), all f32 row-major.
// Cost 2·M·K·Nout FLOPs; reads 4·Nout·K weight bytes. M ≤ 16 (decode) goes through our batch-invariant
// bandwidth-bound kernel (linear_small_m.h), larger M through OpenBLAS sgemm.
#include <cstdint>

namespace mamba3 {

void linear(const float* x, int64_t M, int64_t K, const float* W, int64_t Nout, float* y);
// OpenBLAS is switched to one thread on first use: parallelism comes from our OpenMP threads only.
void use_single_threaded_blas();
// The plain reference: loops, float64 accumulation.
void linear_reference(const float* x, int64_t M, int64_t K, const float* W, int64_t Nout, float* y);

}  // namespace mamba3
