// linear (y = x·Wᵀ) against its float64 reference on awkward shapes, and the decode kernel's batch invariance.
#include <gtest/gtest.h>

#include "ops/linear.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

TEST(Linear, MatchesReferenceOnAwkwardShapes) {
  std::mt19937 rng(3);
  for (int64_t M : {1, 2, 3, 4, 5, 15, 16, 17, 40}) {
    for (auto [K, N] : {std::pair<int64_t, int64_t>{7, 5}, {37, 129}, {768, 67}, {130, 1}}) {
      Tensor x = random_tensor(rng, {M, K}), w = random_tensor(rng, {N, K});
      Tensor y = Tensor::empty(DType::F32, {M, N}), ref = Tensor::empty(DType::F32, {M, N});
      linear(x.data<float>(), M, K, w.data<float>(), N, y.data<float>());
      linear_reference(x.data<float>(), M, K, w.data<float>(), N, ref.data<float>());
      EXPECT_LE(rel_l2(y, ref), 1e-6) << "M=" << M << " K=" << K << " N=" << N;
    }
  }
}

TEST(Linear, DecodeRowsAreBitIdenticalWhateverTheBatch) {
  std::mt19937 rng(4);
  const int64_t K = 100, N = 77;
  Tensor x = random_tensor(rng, {16, K}), w = random_tensor(rng, {N, K});
  Tensor all = Tensor::empty(DType::F32, {16, N});
  linear(x.data<float>(), 16, K, w.data<float>(), N, all.data<float>());
  for (int64_t M : {1, 3, 7}) {
    for (int64_t r0 = 0; r0 + M <= 16; r0 += M) {
      Tensor part = Tensor::empty(DType::F32, {M, N});
      linear(x.data<float>() + r0 * K, M, K, w.data<float>(), N, part.data<float>());
      EXPECT_EQ(rel_l2(part, all.slice(r0, r0 + M)), 0.0) << "rows " << r0 << "+" << M;
    }
  }
}

}  // namespace
}  // namespace mamba3::test
