#include "ops/linear_small_m.h"

#include <algorithm>

#include "core/parallel.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace mamba3 {

namespace {

// Dot products of MT rows of x with NT rows of W (MT ≤ 4, NT ≤ 3: 12 accumulators + 3 W + 1 x = 16 registers;
// 7 loads feed 12 FMAs), written to y.
template <int MT, int NT>
void tile(const float* x, int64_t K, const float* W, int64_t N, float* y) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 w[NT];
    for (int n = 0; n < NT; ++n) {
      w[n] = _mm256_loadu_ps(W + n * K + k);
      // Pull the next rows of W toward L1 while these are multiplied: a single core's demand misses alone reach
      // only a third of the DRAM bandwidth (measured), prefetching overlaps the stream with the FMAs.
      _mm_prefetch(reinterpret_cast<const char*>(W + (n + NT) * K + k), _MM_HINT_T0);
    }
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int n = 0; n < NT; ++n) acc[m][n] = _mm256_fmadd_ps(xv, w[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[m][n]);
      float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * W[n * K + k];
      y[m * N + n] = s;
    }
#else
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) {
      float lanes[8] = {};
      const int64_t K8 = K / 8 * 8;
      for (int64_t k = 0; k < K8; k += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += x[m * K + k + l] * W[n * K + k + l];
      float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
      for (int64_t k = K8; k < K; ++k) s += x[m * K + k] * W[n * K + k];
      y[m * N + n] = s;
    }
#endif
}

template <int NT>
void rows_block(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NT>(x + m * K, K, W, N, y + m * N);
  switch (M - m) {
    case 3: tile<3, NT>(x + m * K, K, W, N, y + m * N); break;
    case 2: tile<2, NT>(x + m * K, K, W, N, y + m * N); break;
    case 1: tile<1, NT>(x + m * K, K, W, N, y + m * N); break;
    default: break;
  }
}

}  // namespace

void linear_small_m(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y) {
  constexpr int64_t kRowsPerTask = 66;  // rows of W per task: 64·K floats stream through L1/L2
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, [&](int64_t t) {
    const int64_t n0 = t * kRowsPerTask, n1 = std::min(N, n0 + kRowsPerTask);
    int64_t n = n0;
    for (; n + 3 <= n1; n += 3) rows_block<3>(x, M, K, W + n * K, N, y + n);
    if (n1 - n == 2) rows_block<2>(x, M, K, W + n * K, N, y + n);
    if (n1 - n == 1) rows_block<1>(x, M, K, W + n * K, N, y + n);
  });
}

}  // namespace mamba3
