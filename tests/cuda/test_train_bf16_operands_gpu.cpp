// The bf16 mode's product operands written by their producers (the norm kernel's y16, the GatedMLP's x16 input) or
// kept rounded (the weights' bf16 mirror: the GatedMLP's fc1_16/fc2_16, the lm_head's W16) against rounding the f32
// values afterwards, as TrainGemm does for plain f32 operands: the same bits everywhere — the rounded copy itself,
// and every output and gradient of the products that read it instead of rounding again.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "core/dtype.h"
#include "cuda/train/gated_mlp_train_gpu.h"
#include "cuda/train/lm_head_loss_gpu.h"
#include "cuda/train/norm_train_gpu.h"
#include "cuda/train/train_gemm.h"
#include "gpu_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

using cuda::DeviceBuffer;
using cuda::Precision;

DeviceBuffer up(const Tensor& t) {
  DeviceBuffer b(t.nbytes());
  b.upload(t.raw(), t.nbytes());
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  return b;
}
DeviceBuffer poisoned(size_t bytes) {
  DeviceBuffer b(bytes);
  poison(b.raw(), b.bytes());
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  return b;
}
std::vector<uint16_t> down16(const DeviceBuffer& b, int64_t n) {
  std::vector<uint16_t> v(static_cast<size_t>(n));
  MAMBA3_CUDA_CHECK(cudaMemcpy(v.data(), b.raw(), v.size() * 2, cudaMemcpyDeviceToHost));
  return v;
}
std::vector<uint16_t> round_host(const Tensor& t) {
  std::vector<uint16_t> v(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[size_t(i)] = f32_to_bf16(t.data<float>()[i]);
  return v;
}
bool same(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}
bool finite(const Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(t.data<float>()[i])) return false;
  return true;
}

// y16 is y rounded to nearest even, bit for bit, with y written beside it or not written at all (y null); the
// residual output is unchanged by either.
TEST(TrainBf16OperandsGpu, ResidualNormWritesItsOutputsRounding) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(21);
  for (const auto& [rows, D] : {std::pair<int64_t, int64_t>{1, 48}, {3, 130}, {67, 48}, {300, 130}, {33, 768}})
    for (bool layer : {false, true}) {
      SCOPED_TRACE(fmt::format("rows {} D {} {}", rows, D, layer ? "LayerNorm" : "RMSNorm"));
      const Tensor prev = random_tensor(rng, {rows, D}, -1.5f, 2.5f), hid = random_tensor(rng, {rows, D});
      const Tensor w = random_tensor(rng, {D}, 0.5f, 1.5f), b = random_tensor(rng, {D}, -0.5f, 0.5f);
      DeviceBuffer dp = up(prev), dh = up(hid), dw = up(w), db = up(b);
      DeviceBuffer res = poisoned(size_t(rows * D) * 4), y = poisoned(size_t(rows * D) * 4);
      DeviceBuffer y16 = poisoned(size_t(rows * D) * 2), y16_alone = poisoned(size_t(rows * D) * 2);
      const float* bias = layer ? db.as<float>() : nullptr;
      cuda::residual_norm_forward_gpu(ctx.stream(), dp.as<float>(), dh.as<float>(), rows, D, dw.as<float>(), bias,
                                      1e-5f, res.as<float>(), y.as<float>(), y16.as<uint16_t>());
      ctx.sync();
      const Tensor y_host = from_device_f32(y.raw(), {rows, D}), res_host = from_device_f32(res.raw(), {rows, D});
      ASSERT_TRUE(finite(y_host)) << "y";
      EXPECT_EQ(down16(y16, rows * D), round_host(y_host)) << "y16 beside y";
      cuda::residual_norm_forward_gpu(ctx.stream(), dp.as<float>(), dh.as<float>(), rows, D, dw.as<float>(), bias,
                                      1e-5f, res.as<float>(), nullptr, y16_alone.as<uint16_t>());
      ctx.sync();
      EXPECT_EQ(down16(y16_alone, rows * D), round_host(y_host)) << "y16 without y";
      EXPECT_TRUE(same(from_device_f32(res.raw(), {rows, D}), res_host)) << "residual";
    }
}

// The GatedMLP in the bf16 mode with its input's rounding given (x16; x given too, or null) and/or its weights'
// (fc1_16, fc2_16), or dy's (dy16), gives the same bits as with x, dy and the weights alone (rounded by the products).
TEST(TrainBf16OperandsGpu, GatedMlpWithRoundedInputGivesTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::TrainGemm gemm(Precision::BF16);
  std::mt19937 rng(22);
  const int64_t F = 70;
  for (const auto& [rows, D] : {std::pair<int64_t, int64_t>{1, 48}, {67, 48}, {300, 130}}) {
    SCOPED_TRACE(fmt::format("rows {} D {} d_ff {}", rows, D, F));
    const Tensor fc1 = random_tensor(rng, {2 * F, D}, -0.3f, 0.3f), fc2 = random_tensor(rng, {D, F}, -0.3f, 0.3f);
    const Tensor x = random_tensor(rng, {rows, D}, -2.0f, 2.0f), dy = random_tensor(rng, {rows, D});
    DeviceBuffer g_fc1 = up(fc1), g_fc2 = up(fc2), g_x = up(x), g_dy = up(dy);
    DeviceBuffer g_x16(size_t(rows * D) * 2), g_fc1_16(size_t(2 * F * D) * 2), g_fc2_16(size_t(D * F) * 2);
    cuda::f32_to_bf16_2d(ctx.stream(), g_x.as<float>(), rows, D, D, g_x16.as<uint16_t>());
    cuda::f32_to_bf16_2d(ctx.stream(), g_fc1.as<float>(), 2 * F, D, D, g_fc1_16.as<uint16_t>());
    cuda::f32_to_bf16_2d(ctx.stream(), g_fc2.as<float>(), D, F, F, g_fc2_16.as<uint16_t>());
    struct Out {
      Tensor y, dx, dfc1, dfc2;
    };
    DeviceBuffer g_dy16(size_t(rows * D) * 2);
    cuda::f32_to_bf16_2d(ctx.stream(), g_dy.as<float>(), rows, D, D, g_dy16.as<uint16_t>());
    auto run = [&](const float* xin, const uint16_t* x16, bool weights16, const uint16_t* dy16 = nullptr) {
      const uint16_t* fc1_16 = weights16 ? g_fc1_16.as<uint16_t>() : nullptr;
      const uint16_t* fc2_16 = weights16 ? g_fc2_16.as<uint16_t>() : nullptr;
      DeviceBuffer h = poisoned(size_t(rows * 2 * F) * 4), o = poisoned(size_t(rows * F) * 4),
                   y = poisoned(size_t(rows * D) * 4), dx = poisoned(size_t(rows * D) * 4),
                   scratch = poisoned(size_t(rows * 3 * F) * 4);
      DeviceBuffer dfc1(size_t(2 * F * D) * 4), dfc2(size_t(D * F) * 4);
      MAMBA3_CUDA_CHECK(cudaMemset(dfc1.raw(), 0, dfc1.bytes()));
      MAMBA3_CUDA_CHECK(cudaMemset(dfc2.raw(), 0, dfc2.bytes()));
      MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
      cuda::gated_mlp_forward_gpu(ctx, gemm, g_fc1.as<float>(), g_fc2.as<float>(), D, F, xin, rows, h.as<float>(),
                                  o.as<float>(), y.as<float>(), x16, fc1_16, fc2_16);
      cuda::gated_mlp_backward_gpu(ctx, gemm, g_fc1.as<float>(), g_fc2.as<float>(), D, F, xin, rows, h.as<float>(),
                                   o.as<float>(), g_dy.as<float>(), dx.as<float>(), dfc1.as<float>(),
                                   dfc2.as<float>(), scratch.as<float>(), x16, fc1_16, fc2_16, dy16);
      ctx.sync();
      return Out{from_device_f32(y.raw(), {rows, D}), from_device_f32(dx.raw(), {rows, D}),
                 from_device_f32(dfc1.raw(), {2 * F, D}), from_device_f32(dfc2.raw(), {D, F})};
    };
    const Out ref = run(g_x.as<float>(), nullptr, false);
    ASSERT_TRUE(finite(ref.y) && finite(ref.dx) && finite(ref.dfc1) && finite(ref.dfc2));
    for (const bool weights16 : {false, true})
      for (const int input : {0, 1, 2}) {  // x alone, x and x16, x16 alone
        if (input == 0 && !weights16) continue;  // the reference itself
        SCOPED_TRACE(fmt::format("{}{}", input == 0 ? "x" : input == 1 ? "x and x16" : "x16 alone",
                                 weights16 ? ", fc1_16 and fc2_16" : ""));
        const Out got = run(input == 2 ? nullptr : g_x.as<float>(), input == 0 ? nullptr : g_x16.as<uint16_t>(),
                            weights16);
        EXPECT_TRUE(same(got.y, ref.y)) << "y";
        EXPECT_TRUE(same(got.dx, ref.dx)) << "dx";
        EXPECT_TRUE(same(got.dfc1, ref.dfc1)) << "dfc1";
        EXPECT_TRUE(same(got.dfc2, ref.dfc2)) << "dfc2";
      }
    // dy's rounding given by its producer (the norm backward's dx16) instead of rounded by the products.
    const Out got = run(g_x.as<float>(), nullptr, false, g_dy16.as<uint16_t>());
    EXPECT_TRUE(same(got.dx, ref.dx)) << "dx with dy16";
    EXPECT_TRUE(same(got.dfc1, ref.dfc1)) << "dfc1 with dy16";
    EXPECT_TRUE(same(got.dfc2, ref.dfc2)) << "dfc2 with dy16";
  }
}

// The lm_head with the loss in the bf16 mode with W's rounding given (W16, the weights' mirror) gives the same bits
// as rounding W itself: the loss, dhidden and dW, over one block of rows and several (the rounded W is read by all).
TEST(TrainBf16OperandsGpu, LmHeadWithRoundedWeightGivesTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::TrainGemm gemm(Precision::BF16);
  std::mt19937 rng(23);
  for (const auto& [N, D, Vp, block] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{3, 48, 259, 0},
                                        {67, 130, 3001, 0}, {300, 48, 2053, 64}}) {
    SCOPED_TRACE(fmt::format("N {} D {} Vp {} block {}", N, D, Vp, block));
    const Tensor hidden = random_tensor(rng, {N, D}), W = random_tensor(rng, {Vp, D}, -0.5f, 0.5f);
    const Tensor dW0 = random_tensor(rng, {Vp, D}, -0.01f, 0.01f);
    std::vector<int32_t> targets(static_cast<size_t>(N));
    std::uniform_int_distribution<int32_t> tok(-1, int32_t(Vp - 1));  // -1: a row without a target
    for (auto& t : targets) t = tok(rng);
    targets[0] = 1;
    DeviceBuffer g_h = up(hidden), g_W = up(W), g_t = DeviceBuffer::from(targets), g_W16(size_t(Vp * D) * 2);
    cuda::f32_to_bf16_2d(ctx.stream(), g_W.as<float>(), Vp, D, D, g_W16.as<uint16_t>());
    struct Out {
      double loss;
      Tensor dh, dW;
    };
    auto run = [&](const uint16_t* W16) {
      cuda::LmHeadScratch scratch;
      scratch.max_block_rows = block;
      DeviceBuffer dh = poisoned(size_t(N * D) * 4), dW = up(dW0);
      const double loss = cuda::lm_head_cross_entropy_gpu(ctx, gemm, g_h.as<float>(), N, D, g_W.as<float>(), Vp,
                                                          g_t.as<int32_t>(), 0.5, dh.as<float>(), dW.as<float>(),
                                                          scratch, W16);
      EXPECT_TRUE(W16 || scratch.w16.bytes() > 0) << "W not rounded into the scratch";
      EXPECT_TRUE(!W16 || scratch.w16.bytes() == 0) << "W rounded although given";
      return Out{loss, from_device_f32(dh.raw(), {N, D}), from_device_f32(dW.raw(), {Vp, D})};
    };
    const Out ref = run(nullptr), got = run(g_W16.as<uint16_t>());
    ASSERT_TRUE(std::isfinite(ref.loss) && finite(ref.dh) && finite(ref.dW));
    EXPECT_EQ(got.loss, ref.loss) << "loss";
    EXPECT_TRUE(same(got.dh, ref.dh)) << "dhidden";
    EXPECT_TRUE(same(got.dW, ref.dW)) << "dW";
  }
}

}  // namespace
}  // namespace mamba3::test
