#include "ops/machine.h"

#include <vector>

#include "core/parallel.h"
#include "ops/linear.h"

namespace mamba3 {

double measure_read_bandwidth() {
  const size_t n = size_t(256) << 20;  // 1 GiB of floats
  std::vector<float> buf(n, 1.0f);
  volatile float sink = 0;
  double s = median_seconds(5, [&] {
    float total = 0;
#pragma omp parallel for simd reduction(+ : total)
    for (int64_t i = 0; i < int64_t(n); ++i) total += buf[size_t(i)];
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
