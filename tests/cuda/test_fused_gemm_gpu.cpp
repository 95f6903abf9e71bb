// The fused training products (src/cuda/train/fused_gemm.cu) against float64 references on awkward shapes (rows not a
// multiple of the 128-row tile, K not a multiple of the 64-column k-block, more tiles than SMs), and their gated
// epilogues against the element-wise kernels they replace (the same bits from the same bf16 inputs).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "cuda/train/fused_gemm.h"
#include "cuda/train/gated_mlp_train_gpu.h"
#include "cuda/train/train_gemm.h"
#include "gpu_test_util.h"
#include "support/test_support.h"
#include "train/gated_mlp_grad.h"

namespace mamba3::test {
namespace {

using cuda::DeviceBuffer;

#define MAMBA3_REQUIRE_FUSED_GEMM()                                                                  \
  do {                                                                                               \
    MAMBA3_REQUIRE_GPU();                                                                            \
    if (!cuda::fused_gemm_device_supported()) GTEST_SKIP() << "fused products need an sm_90 device"; \
  } while (0)

// A random (rows, cols) matrix of bf16 values: the bits (for the device) and their values (for the references).
struct Bf16Matrix {
  std::vector<uint16_t> bits;
  Tensor values;
};
Bf16Matrix random_bf16(std::mt19937& rng, int64_t rows, int64_t cols, float lo = -1.0f, float hi = 1.0f) {
  Bf16Matrix m{std::vector<uint16_t>(size_t(rows * cols)), Tensor::empty(DType::F32, {rows, cols})};
  std::uniform_real_distribution<float> u(lo, hi);
  for (size_t i = 0; i < m.bits.size(); ++i) {
    m.bits[i] = f32_to_bf16(u(rng));
    m.values.data<float>()[i] = bf16_to_f32(m.bits[i]);
  }
  return m;
}
DeviceBuffer up_bits(const std::vector<uint16_t>& bits) {
  DeviceBuffer b(bits.size() * 2);
  b.upload(bits.data(), bits.size() * 2);
  return b;
}
// Poisoned (0xFFFF: a bf16 NaN) so that a missing write shows.
DeviceBuffer nan_bf16(int64_t count) {
  DeviceBuffer b(size_t(count) * 2);
  MAMBA3_CUDA_CHECK(cudaMemset(b.raw(), 0xFF, size_t(count) * 2));
  return b;
}
std::vector<uint16_t> down_bits(const DeviceBuffer& b, int64_t count) {
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> v(static_cast<size_t>(count));
  b.download(v.data(), size_t(count) * 2);
  return v;
}
// Columns [c0, c0 + cols) of a (rows, ld) bf16 matrix as an f32 tensor.
Tensor columns(const std::vector<uint16_t>& bits, int64_t rows, int64_t ld, int64_t c0, int64_t cols) {
  Tensor t = Tensor::empty(DType::F32, {rows, cols});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t.data<float>()[r * cols + c] = bf16_to_f32(bits[size_t(r * ld + c0 + c)]);
  return t;
}
void expect_finite(const Tensor& t, const char* what) {
  for (int64_t i = 0; i < t.numel(); ++i) ASSERT_TRUE(std::isfinite(t.data<float>()[i])) << what << " at " << i;
}
// The gated products' shapes: rows, K, d_ff.
struct GatedCase {
  int64_t M, K, F;
};

double silu64(double g) { return g / (1.0 + std::exp(-g)); }

// Every product test runs both schedules (the default is whichever measured faster).
constexpr cuda::FusedGemmSchedule kSchedules[] = {
    cuda::FusedGemmSchedule::kCooperative, cuda::FusedGemmSchedule::kPingPong, cuda::FusedGemmSchedule::kMulticast};
const char* name_of(cuda::FusedGemmSchedule s) {
  return s == cuda::FusedGemmSchedule::kPingPong    ? "ping-pong"
         : s == cuda::FusedGemmSchedule::kMulticast ? "multicast"
                                                    : "cooperative";
}

TEST(FusedGemmGpu, PlainProductMatchesFloat64) {
  MAMBA3_REQUIRE_FUSED_GEMM();
  cuda::Context ctx;
  std::mt19937 rng(7);
  struct Case {
    int64_t M, N, K;
  };
  // (5000 × 1024: 160 tiles, more than an H100's SMs, so blocks take a second tile; N > M walks the bands of a column
  // tile fastest: 129 × 256, 260 × 2056 and 600 × 8200, the last 165 tiles)
  for (const cuda::FusedGemmSchedule sch : kSchedules)
    for (const Case c : {Case{1000, 384, 768}, Case{129, 256, 64}, Case{300, 264, 200}, Case{77, 8, 8},
                         Case{5000, 1024, 136}, Case{260, 2056, 72}, Case{600, 8200, 64}}) {
      SCOPED_TRACE(fmt::format("{}: M {} N {} K {}", name_of(sch), c.M, c.N, c.K));
      const int64_t ldd = c.N + 8;  // (the columns past N must stay untouched)
      const Bf16Matrix a = random_bf16(rng, c.M, c.K), b = random_bf16(rng, c.N, c.K);
      DeviceBuffer da = up_bits(a.bits), db = up_bits(b.bits), dd = nan_bf16(c.M * ldd);
      cuda::fused_gemm_plain(ctx.stream(), da.as<uint16_t>(), c.K, db.as<uint16_t>(), c.K, c.M, c.N, c.K,
                             dd.as<uint16_t>(), ldd, sch);
      const std::vector<uint16_t> out = down_bits(dd, c.M * ldd);
      const Tensor got = columns(out, c.M, ldd, 0, c.N);
      expect_finite(got, "D");
      EXPECT_LT(rel_l2(got, product_wt_f64(b.values, a.values).to(DType::F32)), 4e-3);
      for (int64_t r = 0; r < c.M; ++r)
        for (int64_t col = c.N; col < ldd; ++col) ASSERT_EQ(out[size_t(r * ldd + col)], 0xFFFF) << "wrote past N";
    }
}

// fc1 with the activation: h against the float64 product, o with the bits of gated_silu_forward_gpu run on the
// kernel's own h, and o against the float64 activation of the float64 product.
TEST(FusedGemmGpu, GatedForwardGivesTheActivationKernelsBits) {
  MAMBA3_REQUIRE_FUSED_GEMM();
  cuda::Context ctx;
  std::mt19937 rng(11);
  for (const cuda::FusedGemmSchedule sch : kSchedules)
    for (const GatedCase c : {GatedCase{300, 96, 128}, GatedCase{1031, 768, 384}, GatedCase{4100, 64, 1536}}) {
      SCOPED_TRACE(fmt::format("{}: M {} K {} d_ff {}", name_of(sch), c.M, c.K, c.F));
      const Bf16Matrix x = random_bf16(rng, c.M, c.K), w1 = random_bf16(rng, 2 * c.F, c.K);
      DeviceBuffer dx = up_bits(x.bits), dw = up_bits(w1.bits), h = nan_bf16(c.M * 2 * c.F), o = nan_bf16(c.M * c.F),
                   o_ref = nan_bf16(c.M * c.F);
      cuda::fused_gemm_gated_forward(ctx.stream(), dx.as<uint16_t>(), c.K, dw.as<uint16_t>(), c.M, c.K, c.F,
                                     h.as<uint16_t>(), o.as<uint16_t>(), sch);
      cuda::gated_silu_forward_gpu(ctx.stream(), nullptr, c.M, c.F, nullptr, o_ref.as<uint16_t>(), h.as<uint16_t>());
      const std::vector<uint16_t> hb = down_bits(h, c.M * 2 * c.F), ob = down_bits(o, c.M * c.F),
                                  orb = down_bits(o_ref, c.M * c.F);
      const Tensor ht = columns(hb, c.M, 2 * c.F, 0, 2 * c.F), ot = columns(ob, c.M, c.F, 0, c.F);
      expect_finite(ht, "h");
      expect_finite(ot, "o");
      EXPECT_TRUE(ob == orb) << "o differs from the activation kernel's on the same h";
      const Tensor h64 = product_wt_f64(w1.values, x.values);
      EXPECT_LT(rel_l2(ht, h64.to(DType::F32)), 4e-3);
      Tensor o64 = Tensor::empty(DType::F32, {c.M, c.F});
      for (int64_t r = 0; r < c.M; ++r)
        for (int64_t j = 0; j < c.F; ++j) {
          const double a = h64.data<double>()[r * 2 * c.F + j], g = h64.data<double>()[r * 2 * c.F + c.F + j];
          o64.data<float>()[r * c.F + j] = float(a * silu64(g));
        }
      EXPECT_LT(rel_l2(ot, o64), 1e-2);
    }
}

// The do product with the activation's backward: [da, dg] with the bits of the plain product's do (the same
// mainloop) followed by gated_silu_backward_bf16_gpu, and against float64.
TEST(FusedGemmGpu, GatedBackwardGivesTheActivationKernelsBits) {
  MAMBA3_REQUIRE_FUSED_GEMM();
  cuda::Context ctx;
  std::mt19937 rng(13);
  for (const cuda::FusedGemmSchedule sch : kSchedules)
    for (const GatedCase c : {GatedCase{300, 96, 256}, GatedCase{1031, 768, 512}, GatedCase{4100, 64, 1536}}) {
      SCOPED_TRACE(fmt::format("{}: M {} K {} d_ff {}", name_of(sch), c.M, c.K, c.F));
      const Bf16Matrix dy = random_bf16(rng, c.M, c.K), w2t = random_bf16(rng, c.F, c.K),
                       h = random_bf16(rng, c.M, 2 * c.F, -4.0f, 4.0f);
      DeviceBuffer ddy = up_bits(dy.bits), dw = up_bits(w2t.bits), dh_in = up_bits(h.bits),
                   dh = nan_bf16(c.M * 2 * c.F), do16 = nan_bf16(c.M * c.F), dh_ref = nan_bf16(c.M * 2 * c.F);
      cuda::fused_gemm_gated_backward(ctx.stream(), ddy.as<uint16_t>(), c.K, dw.as<uint16_t>(), c.M, c.K, c.F,
                                      dh_in.as<uint16_t>(), dh.as<uint16_t>(), sch);
      cuda::fused_gemm_plain(ctx.stream(), ddy.as<uint16_t>(), c.K, dw.as<uint16_t>(), c.K, c.M, c.F, c.K,
                             do16.as<uint16_t>(), c.F, sch);
      cuda::gated_silu_backward_bf16_gpu(ctx.stream(), do16.as<uint16_t>(), dh_in.as<uint16_t>(), c.M, c.F,
                                         dh_ref.as<uint16_t>());
      const std::vector<uint16_t> got = down_bits(dh, c.M * 2 * c.F), ref = down_bits(dh_ref, c.M * 2 * c.F);
      const Tensor gt = columns(got, c.M, 2 * c.F, 0, 2 * c.F);
      expect_finite(gt, "dh");
      EXPECT_TRUE(got == ref) << "[da, dg] differ from the plain product + activation backward";
      const Tensor do64 = product_wt_f64(w2t.values, dy.values);
      Tensor dh64 = Tensor::empty(DType::F32, {c.M, 2 * c.F});
      for (int64_t r = 0; r < c.M; ++r)
        for (int64_t j = 0; j < c.F; ++j) {
          const double d = do64.data<double>()[r * c.F + j], a = h.values.data<float>()[r * 2 * c.F + j],
                       g = h.values.data<float>()[r * 2 * c.F + c.F + j], sg = 1.0 / (1.0 + std::exp(-g));
          dh64.data<float>()[r * 2 * c.F + j] = float(d * g * sg);
          dh64.data<float>()[r * 2 * c.F + c.F + j] = float(d * a * sg * (1.0 + g * (1.0 - sg)));
        }
      EXPECT_LT(rel_l2(gt, dh64), 1e-2);
    }
}

// The GatedMLP's bf16 mode with its operands given in bf16 (as the LM trainer gives them) takes the fused products:
// h and o with the fused forward's bits, and every output against the CPU's float math at the bf16 tolerance.
TEST(FusedGemmGpu, GatedMlpTakesTheFusedProducts) {
  MAMBA3_REQUIRE_FUSED_GEMM();
  if (!cuda::fused_gemm_enabled()) GTEST_SKIP() << "MAMBA3_TRAIN_FUSED_GEMM off (ctest test_fused_gemm_gpu_mlp sets 1)";
  cuda::Context ctx;
  cuda::TrainGemm gemm(cuda::Precision::BF16);
  std::mt19937 rng(17);
  const int64_t rows = 300, D = 136, F = 256;
  const Tensor fc1 = random_tensor(rng, {2 * F, D}, -0.3f, 0.3f), fc2 = random_tensor(rng, {D, F}, -0.3f, 0.3f);
  const Tensor x = random_tensor(rng, {rows, D}, -2.0f, 2.0f), dy = random_tensor(rng, {rows, D});
  Tensor h = Tensor::empty(DType::F32, {rows, 2 * F}), o = Tensor::empty(DType::F32, {rows, F}),
         y = Tensor::empty(DType::F32, {rows, D}), dx = Tensor::empty(DType::F32, {rows, D});
  Tensor dfc1 = Tensor::zeros(DType::F32, {2 * F, D}), dfc2 = Tensor::zeros(DType::F32, {D, F});
  gated_mlp_train_forward(fc1.data<float>(), fc2.data<float>(), D, F, x.data<float>(), rows, h.data<float>(),
                          o.data<float>(), y.data<float>());
  gated_mlp_train_backward(fc1.data<float>(), fc2.data<float>(), D, F, x.data<float>(), rows, h.data<float>(),
                           o.data<float>(), dy.data<float>(), dx.data<float>(), dfc1.data<float>(), dfc2.data<float>());
  const auto bits_of = [](const Tensor& t) {
    std::vector<uint16_t> b(static_cast<size_t>(t.numel()));
    for (size_t i = 0; i < b.size(); ++i) b[i] = f32_to_bf16(t.data<float>()[i]);
    return b;
  };
  DeviceBuffer g_fc1 = to_device(fc1), g_fc2 = to_device(fc2), g_x = to_device(x), g_dy = to_device(dy),
               x16 = up_bits(bits_of(x)), fc1_16 = up_bits(bits_of(fc1)), fc2_16 = up_bits(bits_of(fc2)),
               dy16 = up_bits(bits_of(dy)), g_h(size_t(rows * 2 * F) * 4), g_o(size_t(rows * F) * 4),
               g_y(size_t(rows * D) * 4), g_dx(size_t(rows * D) * 4), g_dfc1(size_t(2 * F * D) * 4),
               g_dfc2(size_t(D * F) * 4), scratch(size_t(rows * 3 * F) * 4), h_ref = nan_bf16(rows * 2 * F),
               o_ref = nan_bf16(rows * F);
  MAMBA3_CUDA_CHECK(cudaMemset(g_dfc1.raw(), 0, g_dfc1.bytes()));
  MAMBA3_CUDA_CHECK(cudaMemset(g_dfc2.raw(), 0, g_dfc2.bytes()));
  cuda::gated_mlp_forward_gpu(ctx, gemm, g_fc1.as<float>(), g_fc2.as<float>(), D, F, nullptr, rows, g_h.as<float>(),
                              g_o.as<float>(), g_y.as<float>(), x16.as<uint16_t>(), fc1_16.as<uint16_t>(),
                              fc2_16.as<uint16_t>());
  cuda::gated_mlp_backward_gpu(ctx, gemm, g_fc1.as<float>(), g_fc2.as<float>(), D, F, nullptr, rows, g_h.as<float>(),
                               g_o.as<float>(), g_dy.as<float>(), g_dx.as<float>(), g_dfc1.as<float>(),
                               g_dfc2.as<float>(), scratch.as<float>(), x16.as<uint16_t>(), fc1_16.as<uint16_t>(),
                               fc2_16.as<uint16_t>(), dy16.as<uint16_t>());
  cuda::fused_gemm_gated_forward(ctx.stream(), x16.as<uint16_t>(), D, fc1_16.as<uint16_t>(), rows, D, F,
                                 h_ref.as<uint16_t>(), o_ref.as<uint16_t>());
  EXPECT_TRUE(down_bits(g_h, rows * 2 * F) == down_bits(h_ref, rows * 2 * F)) << "h: not the fused forward's";
  EXPECT_TRUE(down_bits(g_o, rows * F) == down_bits(o_ref, rows * F)) << "o: not the fused forward's";
  const auto f32 = [](const DeviceBuffer& b, Shape shape) { return from_device_f32(b.raw(), std::move(shape)); };
  const Tensor gy = f32(g_y, {rows, D}), gdx = f32(g_dx, {rows, D}), gdfc1 = f32(g_dfc1, {2 * F, D}),
               gdfc2 = f32(g_dfc2, {D, F});
  for (const Tensor* t : {&gy, &gdx, &gdfc1, &gdfc2}) expect_finite(*t, "GatedMLP output");
  EXPECT_LE(rel_l2(gy, y), 2e-2) << "y";
  EXPECT_LE(rel_l2(gdx, dx), 2e-2) << "dx";
  EXPECT_LE(rel_l2(gdfc1, dfc1), 2e-2) << "dfc1";
  EXPECT_LE(rel_l2(gdfc2, dfc2), 2e-2) << "dfc2";
}

TEST(FusedGemmGpu, RefusesUnsupportedShapesByName) {
  MAMBA3_REQUIRE_FUSED_GEMM();
  cuda::Context ctx;
  DeviceBuffer a(4096), b(4096), d(4096);
  const auto* A = a.as<uint16_t>();
  auto* D = d.as<uint16_t>();
  auto expect_error = [](auto&& call, const char* name) {
    try {
      call();
      ADD_FAILURE() << "no error for " << name;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  expect_error([&] { cuda::fused_gemm_plain(ctx.stream(), A, 12, A, 12, 4, 8, 12, D, 8); }, "fused_gemm_plain");
  expect_error([&] { cuda::fused_gemm_gated_forward(ctx.stream(), A, 16, A, 4, 16, 96, D, D); },
               "fused_gemm_gated_forward");
  expect_error([&] { cuda::fused_gemm_gated_backward(ctx.stream(), A, 16, A, 4, 16, 128, A, D); },
               "fused_gemm_gated_backward");
  EXPECT_FALSE(cuda::fused_gemm_plain_supported(A + 1, 16, A, 16, 8, 16, D, 8)) << "misaligned A";
}

}  // namespace
}  // namespace mamba3::test
