#pragma once
// Backward of y = x·Wᵀ (ops/linear.h): dx = dy·W and dW += dyᵀ·x, all f32 row-major; x (M, K), W (Nout, K),
// dy (M, Nout). Cost 2·M·K·Nout FLOPs each. OpenBLAS sgemm, single-threaded, called from our OpenMP threads on
// disjoint blocks of output rows (so the sums of each output element run in a fixed order: deterministic).
#include <cstdint>

namespace mamba3 {

// dx (M, K) = dy·W, or dx += dy·W when accumulate.
void linear_backward_input(const float* dy, int64_t M, int64_t Nout, const float* W, int64_t K, float* dx,
                           bool accumulate = false);
// dW (Nout, K) += dyᵀ·x.
void linear_backward_weight(const float* dy, int64_t M, int64_t Nout, const float* x, int64_t K, float* dW);
// db (Nout) += Σ_rows dy (float64 accumulation per column).
void bias_backward(const float* dy, int64_t M, int64_t Nout, float* db);

// C (m, n) = op(A)·op(B) + beta·C, rows of C split over the threads.
void gemm_rows_parallel(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace mamba3
