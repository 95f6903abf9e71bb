#include "ops/linear.h"

#include <cblas.h>

namespace mamba3 {

void linear_reference(const float* x, int64_t M, int64_t K, const float* W, int64_t Nout, float* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < Nout; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += double(x[m * K + k]) * double(W[o * K + k]);
      y[m * Nout + o] = float(acc);
    }
}

void linear(const float* x, int64_t M, int64_t K, const float* W, int64_t Nout, float* y) {
  if (M == 0 || Nout == 0) return;
  if (M == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, blasint(Nout), blasint(K), 1.0f, W, blasint(K), x, 1, 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blasint(M), blasint(Nout), blasint(K), 1.0f, x, blasint(K), W,
                blasint(K), 0.0f, y, blasint(Nout));
  }
}

}  // namespace mamba3
