#include "ops/machine.h"

#include <vector>

#include "core/parallel.h"
#include "ops/linear.h"

namespace mamba3 {

double measure_read_bandwidth() {
  const size_t n = size_t(256) << 20;  // 1 GiB of floats, far beyond any cache
  std::vector<float> buf(n, 1.0f);
  volatile float sink = 0;
  double s = median_seconds(5, [&] {
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      // 32 independent lanes per thread: one accumulator chain would be latency-bound at a fifth of the bandwidth.
      const size_t T = size_t(omp_get_num_threads()), i = size_t(omp_get_thread_num());
      const size_t a = n * i / T / 32 * 32, b = n * (i + 1) / T / 32 * 32;
      float lanes[32] = {};
      for (size_t k = a; k < b; k += 32)
        for (int j = 0; j < 32; ++j) lanes[j] += buf[k + size_t(j)];
      for (float l : lanes) total += l;
    }
    sink = total;
  });
  (void)sink;
  return double(n * sizeof(float)) / s;
}

double measure_linear_flops(int64_t M, int64_t K, int64_t N) {
  std::vector<float> x(size_t(M * K), 0.5f), w(size_t(N * K), 0.25f), y(size_t(M * N));
  double s = median_seconds(5, [&] { linear(x.data(), M, K, w.data(), N, y.data()); });
  return 2.0 * double(M) * double(K) * double(N) / s;
}

}  // namespace mamba3
