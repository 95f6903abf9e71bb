#include "ops/linear_backward.h"

#include <cblas.h>

#include <algorithm>
#include <vector>

#include "ops/parallel_work.h"
#include "ops/linear.h"

namespace mamba3 {

void gemm_rows_parallel(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                        const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  use_single_threaded_blas();
  // Enough rows per block that each sgemm call amortises its packing; at most one block per thread.
  const int64_t nblocks = std::min<int64_t>(max_threads(), std::max<int64_t>(1, m / 16));
  const int64_t block = (m + nblocks - 1) / nblocks;
  parallel_for_work(nblocks, block * n * k, [&](int64_t i) {
    const int64_t m0 = i * block, m1 = std::min(m, m0 + block);
    if (m0 >= m1) return;
    const float* a = trans_a ? A + m0 : A + m0 * lda;  // rows m0.. of op(A) are columns of A when transposed
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                blasint(m1 - m0), blasint(n), blasint(k), 1.0f, a, blasint(lda), B, blasint(ldb), beta, C + m0 * ldc,
                blasint(ldc));
  });
}

void linear_backward_input(const float* dy, int64_t M, int64_t Nout, const float* W, int64_t K, float* dx,
                           bool accumulate) {
  gemm_rows_parallel(false, false, M, K, Nout, dy, Nout, W, K, accumulate ? 1.0f : 0.0f, dx, K);
}

void linear_backward_weight(const float* dy, int64_t M, int64_t Nout, const float* x, int64_t K, float* dW) {
  gemm_rows_parallel(true, false, Nout, K, M, dy, Nout, x, K, 1.0f, dW, K);
}

void bias_backward(const float* dy, int64_t M, int64_t Nout, float* db) {
  constexpr int64_t kCols = 64;
  parallel_for_work((Nout + kCols - 1) / kCols, kCols * M, [&](int64_t blk) {
    const int64_t j0 = blk * kCols, j1 = std::min(Nout, j0 + kCols);
    std::vector<double> acc(size_t(j1 - j0), 0.0);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = j0; j < j1; ++j) acc[size_t(j - j0)] += dy[r * Nout + j];
    for (int64_t j = j0; j < j1; ++j) db[j] += float(acc[size_t(j - j0)]);
  });
}

}  // namespace mamba3
