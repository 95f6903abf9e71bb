// rmsnorm and layernorm against their definitions (spec §9.3), computed here in float64, on awkward widths.
#include <gtest/gtest.h>

#include <cmath>

#include "ops/norm.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

TEST(Norm, RmsAndLayerNormMatchDefinitions) {
  std::mt19937 rng(8);
  for (int64_t D : {1, 7, 64, 129}) {
    const int64_t rows = 5;
    Tensor x = random_tensor(rng, {rows, D}, -3, 3), w = random_tensor(rng, {D}), b = random_tensor(rng, {D});
    Tensor y_rms = Tensor::empty(DType::F32, {rows, D}), y_ln = Tensor::empty(DType::F32, {rows, D});
    rmsnorm(x.data<float>(), rows, D, w.data<float>(), 1e-5f, y_rms.data<float>());
    layernorm(x.data<float>(), rows, D, w.data<float>(), b.data<float>(), 1e-5f, y_ln.data<float>());
    Tensor ref_rms = Tensor::empty(DType::F64, {rows, D}), ref_ln = Tensor::empty(DType::F64, {rows, D});
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x.data<float>() + r * D;
      double ss = 0, mean = 0, var = 0;
      for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i], mean += xr[i];
      mean /= double(D);
      for (int64_t i = 0; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
      var /= double(D);
      for (int64_t i = 0; i < D; ++i) {
        ref_rms.data<double>()[r * D + i] = xr[i] / std::sqrt(ss / double(D) + 1e-5) * w.data<float>()[i];
        ref_ln.data<double>()[r * D + i] =
            (xr[i] - mean) / std::sqrt(var + 1e-5) * w.data<float>()[i] + b.data<float>()[i];
      }
    }
    EXPECT_LE(rel_l2(y_rms, ref_rms), 1e-6) << "rmsnorm D=" << D;
    EXPECT_LE(rel_l2(y_ln, ref_ln), 1e-6) << "layernorm D=" << D;
  }
}

}  // namespace
}  // namespace mamba3::test
