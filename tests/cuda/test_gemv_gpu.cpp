// The small-batch bf16 matrix-vector kernel against a float64 product of the same bf16 values, on awkward shapes
// (odd N, K not a multiple of 512, every M from 1 to 8, 1/2/4 warps per column, strided rows), row results
// independent of the batch, and linear() choosing it or cuBLAS.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "cuda/gemv_small_m.h"
#include "cuda/gpu_matrix.h"
#include "gpu_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

TEST(GemvGpu, MatchesFloat64OnAwkwardShapes) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(3);
  for (auto [N, K] : {std::pair<int64_t, int64_t>{1001, 2056}, {37, 8}, {4099, 520}, {8, 4096}}) {
    const Tensor w = random_tensor(rng, {N, K}).to(DType::BF16);
    cuda::DeviceBuffer dw(w.nbytes());
    dw.upload(w.raw(), w.nbytes());
    for (int64_t M = 1; M <= cuda::kGemvMaxRows; ++M) {
      const Tensor x = random_tensor(rng, {M, K}).to(DType::BF16);
      const Tensor ref = product_wt_f64(w, x);
      for (int split : {1, 2, 4}) {
        SCOPED_TRACE("N=" + std::to_string(N) + " K=" + std::to_string(K) + " M=" + std::to_string(M) +
                     " split=" + std::to_string(split));
        cuda::DeviceBuffer dx(x.nbytes()), dy(size_t(M * N) * 4);
        dx.upload(x.raw(), x.nbytes());
        poison(dy.raw(), dy.bytes());
        ASSERT_TRUE(cuda::gemv_small_m_supported(M, K, K, dw.raw(), dx.raw()));
        cuda::gemv_small_m(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, dy.as<float>(), N, split);
        ctx.sync();
        EXPECT_LE(rel_l2(from_device_f32(dy.raw(), {M, N}), ref), 1e-6);
      }
    }
  }
}

// A row's result does not depend on how many rows share the call (decode slots are batch-invariant): row m of an
// M-row product equals the same row computed alone, bit for bit, for every K split.
TEST(GemvGpu, RowsAreBatchInvariant) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(11);
  const int64_t N = 2048 + 40, K = 4096 + 8, M = cuda::kGemvMaxRows;
  const Tensor w = random_tensor(rng, {N, K}).to(DType::BF16), x = random_tensor(rng, {M, K}).to(DType::BF16);
  cuda::DeviceBuffer dw(w.nbytes()), dx(x.nbytes()), dy(size_t(M * N) * 4), d1(size_t(N) * 4);
  dw.upload(w.raw(), w.nbytes());
  dx.upload(x.raw(), x.nbytes());
  for (int split : {1, 2, 4}) {
    cuda::gemv_small_m(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, dy.as<float>(), N, split);
    const Tensor all = from_device_f32(dy.raw(), {M, N});
    for (int64_t m = 0; m < M; ++m) {
      cuda::gemv_small_m(ctx.stream(), dw.raw(), N, K, static_cast<const char*>(dx.raw()) + m * K * 2, 1, K,
                         d1.as<float>(), N, split);
      const Tensor one = from_device_f32(d1.raw(), {1, N});
      EXPECT_EQ(std::memcmp(one.raw(), all.data<float>() + m * N, size_t(N) * 4), 0)
          << "split " << split << " row " << m << " differs from the same row alone";
    }
  }
}

// Strided input rows (the prefill's last-position logits) and output rows; linear() with a bias on both paths.
TEST(GemvGpu, StridedRowsAndLinearDispatch) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(5);
  const int64_t N = 300, K = 64, stride = 3 * K;
  const Tensor w = random_tensor(rng, {N, K}), bias = random_tensor(rng, {N});
  const cuda::GpuMatrix gm = cuda::GpuMatrix::upload(w, cuda::Precision::BF16, &bias);
  for (int64_t M : {1, 5, 8, 9, 40}) {  // 9 and 40 go through cuBLAS
    SCOPED_TRACE("M=" + std::to_string(M));
    const Tensor xs = random_tensor(rng, {M, stride});
    const Tensor xs_bf16 = xs.to(DType::BF16);
    cuda::DeviceBuffer dx(xs_bf16.nbytes()), dy(size_t(M * N) * 4);
    dx.upload(xs_bf16.raw(), xs_bf16.nbytes());
    poison(dy.raw(), dy.bytes());
    cuda::linear(ctx, gm, dx.raw(), M, dy.as<float>(), stride, N);
    ctx.sync();
    // Reference: the first K columns of each strided row, bf16-rounded, times the bf16 weights, plus the f32 bias.
    Tensor x = Tensor::empty(DType::F32, {M, K});
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) x.data<float>()[m * K + k] = xs.data<float>()[m * stride + k];
    Tensor ref = product_wt_f64(w.to(DType::BF16), x.to(DType::BF16));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) ref.data<double>()[m * N + n] += bias.data<float>()[n];
    EXPECT_LE(rel_l2(from_device_f32(dy.raw(), {M, N}), ref), 1e-5);
  }
}

}  // namespace
}  // namespace mamba3::test
