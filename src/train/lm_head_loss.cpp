#include "train/lm_head_loss.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/parallel_work.h"
#include "ops/linear.h"
#include "ops/linear_backward.h"

namespace mamba3 {

double lm_head_cross_entropy(const float* hidden, int64_t N, int64_t D, const float* W, int64_t Vp,
                             const int64_t* targets, double grad_scale, float* dhidden, float* dW) {
  constexpr int64_t kRows = 256;
  std::vector<float> logits(size_t(std::min(N, kRows) * Vp));
  std::vector<double> row_loss(static_cast<size_t>(N));
  for (int64_t r0 = 0; r0 < N; r0 += kRows) {
    const int64_t n = std::min(kRows, N - r0);
    linear(hidden + r0 * D, n, D, W, Vp, logits.data());  // (n, Vp)
    parallel_for_work(n, 8 * Vp, [&](int64_t i) {
      float* l = logits.data() + i * Vp;
      double mx = -INFINITY;
      for (int64_t v = 0; v < Vp; ++v) mx = std::max(mx, double(l[v]));
      double sum = 0;
      for (int64_t v = 0; v < Vp; ++v) sum += std::exp(double(l[v]) - mx);
      const double lse = mx + std::log(sum);
      const int64_t tgt = targets[r0 + i];
      row_loss[size_t(r0 + i)] = lse - double(l[tgt]);
      if (dhidden) {
        const double lt = double(l[tgt]);
        for (int64_t v = 0; v < Vp; ++v) l[v] = float(grad_scale * std::exp(double(l[v]) - lse));
        l[tgt] = float(grad_scale * (std::exp(lt - lse) - 1.0));
      }
    });
    if (dhidden) {
      linear_backward_input(logits.data(), n, Vp, W, D, dhidden + r0 * D);
      linear_backward_weight(logits.data(), n, Vp, hidden + r0 * D, D, dW);
    }
  }
  double total = 0;
  for (double v : row_loss) total += v;
  return total;
}

}  // namespace mamba3
