#include "ops/linear.h"

#include <cblas.h>

#include <algorithm>
#include <mutex>

#include "core/parallel.h"
#include "ops/linear_small_m.h"

extern "C" void openblas_set_num_threads(int);

namespace mamba3 {

void linear_reference(const float* x, int64_t M, int64_t K, const float* W, int64_t Nout, float* y) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < Nout; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += double(x[m * K + k]) * double(W[o * K + k]);
      y[m * Nout + o] = float(acc);
    }
}

// One threading system only: OpenBLAS runs single-threaded inside our OpenMP threads. Two pools spinning against
// each other on few cores cost up to 10× on small calls (measured on the 2-core machine: decode 16 ms → 1.6 ms).
void use_single_threaded_blas() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

void linear(const float* x, int64_t M, int64_t K, const float* W, int64_t Nout, float* y) {
  if (M == 0 || Nout == 0) return;
  if (M <= kSmallM) return linear_small_m(x, M, K, W, Nout, y);  // decode: batch-invariant, bandwidth-bound
  use_single_threaded_blas();
  // Split the output columns (rows of W, contiguous) into one block per thread, 16-aligned for the kernels.
  const int64_t threads = std::min<int64_t>(max_threads(), std::max<int64_t>(1, Nout / 64));
  const int64_t block = (Nout + threads - 1) / threads / 16 * 16 + 16;
  parallel_for(threads, [&](int64_t i) {
    const int64_t n0 = std::min(Nout, i * block), n1 = std::min(Nout, n0 + block);
    if (n0 >= n1) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blasint(M), blasint(n1 - n0), blasint(K), 1.0f, x,
                blasint(K), W + n0 * K, blasint(K), 0.0f, y + n0, blasint(Nout));
  });
}

}  // namespace mamba3
