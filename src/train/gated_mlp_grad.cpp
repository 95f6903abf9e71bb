#include "train/gated_mlp_grad.h"

#include <vector>

#include "ops/parallel_work.h"
#include "ops/linear.h"
#include "ops/linear_backward.h"
#include "ops/mamba3_common.h"

namespace mamba3 {

void gated_mlp_train_forward(const float* fc1, const float* fc2, int64_t D, int64_t d_ff, const float* x,
                             int64_t rows, float* h, float* o, float* y) {
  linear(x, rows, D, fc1, 2 * d_ff, h);  // (rows, 2·d_ff)
  parallel_for_work(rows, 4 * d_ff, [&](int64_t r) {
    const float* hr = h + r * 2 * d_ff;
    float* orow = o + r * d_ff;
    for (int64_t j = 0; j < d_ff; ++j) orow[j] = hr[j] * detail::silu(hr[d_ff + j]);
  });
  linear(o, rows, d_ff, fc2, D, y);
}

void gated_mlp_train_backward(const float* fc1, const float* fc2, int64_t D, int64_t d_ff, const float* x,
                              int64_t rows, const float* h, const float* o, const float* dy, float* dx, float* dfc1,
                              float* dfc2) {
  std::vector<float> dh(size_t(rows * 2 * d_ff)), dout(size_t(rows * d_ff));
  linear_backward_weight(dy, rows, D, o, d_ff, dfc2);
  linear_backward_input(dy, rows, D, fc2, d_ff, dout.data());  // (rows, d_ff)
  parallel_for_work(rows, 4 * d_ff, [&](int64_t r) {
    const float* dor = dout.data() + r * d_ff;
    const float* hr = h + r * 2 * d_ff;
    float* dhr = dh.data() + r * 2 * d_ff;
    for (int64_t j = 0; j < d_ff; ++j) {
      const float a = hr[j], g = hr[d_ff + j], sg = detail::sigmoid(g);
      dhr[j] = dor[j] * g * sg;
      dhr[d_ff + j] = dor[j] * a * sg * (1.0f + g * (1.0f - sg));
    }
  });
  linear_backward_weight(dh.data(), rows, 2 * d_ff, x, D, dfc1);
  linear_backward_input(dh.data(), rows, 2 * d_ff, fc1, D, dx);
}

}  // namespace mamba3
