// The small-batch bf16 matrix-vector kernel against a float64 product of the same bf16 values, on awkward shapes
// (odd N, K not a multiple of 512, every M from 1 to 8, 1/2/4 warps per column, strided rows), row results
// independent of the batch, linear() choosing it or cuBLAS, the fused GatedMLP epilogue, and the L2 requests.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <tuple>

#include "cuda/basic_kernels.h"
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
  // On sm_90 the default route takes 1 row to the matrix-vector kernel, 5–40 to the stream GEMM and 100 to cuBLAS
  // (elsewhere: 1 the matrix-vector kernel, 5–100 cuBLAS); under MAMBA3_STREAM_GEMM=all, every M goes to the stream
  // GEMM, 100 rows through its wide class.
  for (int64_t M : {1, 5, 8, 9, 40, 100}) {
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

// The fused GatedMLP epilogue (W's rows (value, gate) pairs): its bf16 activations equal, bit for bit, the
// matrix-vector product followed by the activation kernel, and are within bf16 rounding of a float64 reference;
// odd pair counts (a block's last pairs dead), every M from 1 to 4, 1/2/4 warps per column; linear_gated_silu
// through both of its paths (fused at 1–4 rows, linear() + gated_silu() from 5) gives the same rows.
TEST(GemvGpu, GatedPairsMatchProductThenActivation) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(29);
  for (auto [F, K] : {std::pair<int64_t, int64_t>{37, 520}, {1027, 2056}, {3, 8}, {2052, 1024}}) {
    const int64_t N = 2 * F;
    const Tensor w = random_tensor(rng, {N, K}).to(DType::BF16);
    cuda::DeviceBuffer dw(w.nbytes());
    dw.upload(w.raw(), w.nbytes());
    for (int64_t M = 1; M <= cuda::kGemvPairsMaxRows; ++M) {
      const Tensor x = random_tensor(rng, {M, K}, -2.0f, 2.0f).to(DType::BF16);
      const Tensor ref = gated_pairs_f64(w, x);
      cuda::DeviceBuffer dx(x.nbytes()), dy(size_t(M * N) * 4), fused(size_t(M * F) * 2), plain(size_t(M * F) * 2);
      dx.upload(x.raw(), x.nbytes());
      for (int split : {1, 2, 4}) {
        SCOPED_TRACE("F=" + std::to_string(F) + " K=" + std::to_string(K) + " M=" + std::to_string(M) +
                     " split=" + std::to_string(split));
        poison(fused.raw(), fused.bytes());
        cuda::gemv_small_m_gated_pairs(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, fused.raw(), split);
        cuda::gemv_small_m(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, dy.as<float>(), N, split);
        cuda::gated_silu(ctx.stream(), dy.as<float>(), M, F, plain.raw(), cuda::Precision::BF16);
        ctx.sync();
        std::vector<uint16_t> a(size_t(M * F)), b(size_t(M * F));
        fused.download(a.data(), fused.bytes());
        plain.download(b.data(), plain.bytes());
        EXPECT_EQ(std::memcmp(a.data(), b.data(), fused.bytes()), 0) << "fused epilogue differs from the kernel pair";
        EXPECT_LE(rel_l2(from_device_bf16(fused.as<uint16_t>(), {M, F}), ref), 1e-2);
      }
    }
  }
  // linear_gated_silu: fused at 4 rows and unfused at 5 (stream GEMM or cuBLAS) agree within bf16 rounding.
  const int64_t F = 1027, K = 2056, N = 2 * F;
  const Tensor wt = random_tensor(rng, {N, K}), xt = random_tensor(rng, {5, K});
  const cuda::GpuMatrix gm = cuda::GpuMatrix::upload(wt, cuda::Precision::BF16);
  const Tensor xb = xt.to(DType::BF16);
  cuda::DeviceBuffer dx(xb.nbytes()), dy(size_t(5 * N) * 4), a4(size_t(4 * F) * 2), a5(size_t(5 * F) * 2);
  dx.upload(xb.raw(), xb.nbytes());
  poison(a4.raw(), a4.bytes());
  poison(a5.raw(), a5.bytes());
  cuda::linear_gated_silu(ctx, gm, dx.raw(), 4, dy.as<float>(), a4.raw(), cuda::Precision::BF16);
  cuda::linear_gated_silu(ctx, gm, dx.raw(), 5, dy.as<float>(), a5.raw(), cuda::Precision::BF16);
  const Tensor r4 = from_device_bf16(a4.as<uint16_t>(), {4, F});
  const Tensor r5 = from_device_bf16(a5.as<uint16_t>(), {5, F});
  Tensor r5_first4 = Tensor::empty(DType::F32, {4, F});
  std::memcpy(r5_first4.raw(), r5.raw(), r5_first4.nbytes());
  EXPECT_LE(rel_l2(r4, r5_first4), 1e-2);
}

// The bulk L2 requests of W by the resident blocks (MAMBA3_GEMV_PREFETCH) are hints: the products and the fused
// activations are the same bits with and without them — on shapes whose last block holds fewer rows than its warps'
// columns, W shares smaller than a piece, grids of more blocks than fit the device at once — for every split. W's
// buffer is exactly W, so that a request past its end shows under memcheck.
TEST(GemvGpu, L2PrefetchKeepsTheBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(31);
  for (auto [N, K] :
       {std::pair<int64_t, int64_t>{1001, 2056}, {6, 8}, {37, 8}, {2050, 4096}, {20001, 64}, {515, 8192}}) {
    const Tensor w = random_tensor(rng, {N, K}).to(DType::BF16);
    cuda::DeviceBuffer dw(w.nbytes());
    dw.upload(w.raw(), w.nbytes());
    for (int64_t M : {int64_t(1), int64_t(3), cuda::kGemvMaxRows}) {
      const Tensor x = random_tensor(rng, {M, K}).to(DType::BF16);
      cuda::DeviceBuffer dx(x.nbytes()), off(size_t(M * N) * 4), on(size_t(M * N) * 4);
      dx.upload(x.raw(), x.nbytes());
      for (int split : {1, 2, 4}) {
        for (cuda::GemvPrefetch mode : {cuda::GemvPrefetch::Bulk}) {
          SCOPED_TRACE("N=" + std::to_string(N) + " K=" + std::to_string(K) + " M=" + std::to_string(M) +
                       " split=" + std::to_string(split));
          poison(off.raw(), off.bytes());
          poison(on.raw(), on.bytes());
          cuda::gemv_small_m(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, off.as<float>(), N, split,
                             cuda::GemvPrefetch::Off);
          cuda::gemv_small_m(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, on.as<float>(), N, split, mode);
          ctx.sync();
          const Tensor a = from_device_f32(off.raw(), {M, N}), b = from_device_f32(on.raw(), {M, N});
          EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "the product changed with the L2 requests";
          EXPECT_LE(rel_l2(b, product_wt_f64(w, x)), 1e-6);
          if (N % 2 == 0 && M <= cuda::kGemvPairsMaxRows) {
            poison(off.raw(), off.bytes());
            poison(on.raw(), on.bytes());
            cuda::gemv_small_m_gated_pairs(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, off.raw(), split,
                                           cuda::GemvPrefetch::Off);
            cuda::gemv_small_m_gated_pairs(ctx.stream(), dw.raw(), N, K, dx.raw(), M, K, on.raw(), split, mode);
            ctx.sync();
            std::vector<uint16_t> pa(size_t(M * N / 2)), pb(size_t(M * N / 2));
            off.download(pa.data(), pa.size() * 2);
            on.download(pb.data(), pb.size() * 2);
            EXPECT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * 2), 0) << "the activations changed";
          }
        }
      }
    }
  }
}

// RMSNorm folded into the products at one row: a residual-norm product P then a scaled product C (plain and gated
// pairs) against the same math in float64 — P's residual update bit-equal to the plain product plus the residual in
// f32, its bf16(v ⊙ g) bit-equal to that rounding, and C within 1e-5 (plain) / bf16 rounding (pairs) of
// rstd · W_C · bf16(v ⊙ g) with rstd from the updated residual. Widths with one and with several warps per column,
// producers whose last block holds fewer columns than warps, and poisoned outputs.
TEST(GemvGpu, FoldedNormMatchesFloat64) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(41);
  const float eps = 1e-5f;
  for (auto [D, K, F] : {std::tuple<int64_t, int64_t, int64_t>{64, 128, 37},
                         {2056, 4096, 1027},
                         {1000, 1032, 8},
                         {2048, 4096, 4096},
                         {3000, 8, 5},
                         {1001, 4096, 9},
                         {37, 8, 3}}) {
    SCOPED_TRACE("D=" + std::to_string(D) + " K=" + std::to_string(K) + " F=" + std::to_string(F));
    const Tensor wp = random_tensor(rng, {D, K}).to(DType::BF16), wc = random_tensor(rng, {2 * F, D}).to(DType::BF16);
    const Tensor x = random_tensor(rng, {1, K}).to(DType::BF16), r0 = random_tensor(rng, {1, D}, -3.0f, 3.0f);
    const Tensor g = random_tensor(rng, {D}, 0.5f, 1.5f);
    cuda::DeviceBuffer dwp = to_device(wp), dwc = to_device(wc), dx = to_device(x), dr = to_device(r0),
                       dg = to_device(g);
    const int64_t parts = cuda::gemv_norm_parts(D, K);
    ASSERT_GE(parts, 1);
    ASSERT_LE(parts, D);
    cuda::DeviceBuffer dout16(size_t(D) * 2), dparts(size_t(parts) * 4), dyp(size_t(D) * 4);
    cuda::DeviceBuffer dyc(size_t(2 * F) * 4), dact(size_t(F) * 2);
    poison(dout16.raw(), dout16.bytes());
    poison(dparts.raw(), dparts.bytes());
    cuda::gemv_small_m(ctx.stream(), dwp.raw(), D, K, dx.raw(), 1, K, dyp.as<float>(), D);
    cuda::gemv_small_m_residual_norm(ctx.stream(), dwp.raw(), D, K, dx.raw(),
                                     {dr.as<float>(), dg.as<float>(), dout16.raw(), dparts.as<float>()});
    const cuda::GemvRowScale scale{dparts.as<float>(), parts, D, eps};
    poison(dyc.raw(), dyc.bytes());
    poison(dact.raw(), dact.bytes());
    const bool consumer = D % 8 == 0;  // C's K = D must be a multiple of 8: P alone where its last block is partial
    if (consumer) {
      cuda::gemv_small_m_scaled(ctx.stream(), dwc.raw(), 2 * F, D, dout16.raw(), dyc.as<float>(), scale);
      cuda::gemv_small_m_gated_pairs_scaled(ctx.stream(), dwc.raw(), 2 * F, D, dout16.raw(), dact.raw(), scale);
    }
    ctx.sync();
    // P: residual and bf16(v ⊙ g) bit for bit.
    const Tensor yp = from_device_f32(dyp.raw(), {1, D}), r1 = from_device_f32(dr.raw(), {1, D});
    Tensor v = Tensor::empty(DType::F32, {1, D}), vg = Tensor::empty(DType::F32, {1, D});
    for (int64_t j = 0; j < D; ++j) {
      v.data<float>()[j] = yp.data<float>()[j] + r0.data<float>()[j];
      vg.data<float>()[j] = v.data<float>()[j] * g.data<float>()[j];
    }
    EXPECT_EQ(std::memcmp(r1.raw(), v.raw(), v.nbytes()), 0) << "the residual update differs from product + residual";
    const Tensor vg16 = vg.to(DType::BF16);
    std::vector<uint16_t> got16(static_cast<size_t>(D));
    dout16.download(got16.data(), dout16.bytes());
    EXPECT_EQ(std::memcmp(got16.data(), vg16.raw(), dout16.bytes()), 0) << "bf16(v ⊙ g) differs";
    // The partials: every column's v² once (Σ over the blocks' sums, each in column order).
    std::vector<float> got_parts(static_cast<size_t>(parts));
    dparts.download(got_parts.data(), dparts.bytes());
    double parts_sum = 0, vv = 0;
    for (float p : got_parts) parts_sum += double(p);
    for (int64_t j = 0; j < D; ++j) vv += double(v.data<float>()[j]) * double(v.data<float>()[j]);
    EXPECT_NEAR(parts_sum, vv, 1e-5 * vv) << "the partials do not sum to Σ v²";
    if (!consumer) continue;
    // C: rstd · W_C · bf16(v ⊙ g) in float64, and its gated pairs.
    double ss = 0;
    for (int64_t j = 0; j < D; ++j) ss += double(v.data<float>()[j]) * double(v.data<float>()[j]);
    const double rstd = 1.0 / std::sqrt(ss / double(D) + double(eps));
    Tensor yref = product_wt_f64(wc, vg16);
    for (int64_t j = 0; j < 2 * F; ++j) yref.data<double>()[j] *= rstd;
    EXPECT_LE(rel_l2(from_device_f32(dyc.raw(), {1, 2 * F}), yref), 1e-5);
    EXPECT_LE(rel_l2(from_device_bf16(dact.as<uint16_t>(), {1, F}), gated_pairs_of_f64(yref)), 1e-2);
  }
}

// The folded-norm products refuse what the kernel cannot read: K not a multiple of 8, a misaligned x, missing buffers.
TEST(GemvGpu, FoldedNormRefusesUnsupportedShapes) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::DeviceBuffer w(64 * 1024), x(4096), y(4096), r(4096), g(4096), o(4096), p(4096);
  const cuda::GemvRowScale scale{p.as<float>(), 4, 60, 1e-5f};
  const cuda::GemvResidualNorm out{r.as<float>(), g.as<float>(), o.raw(), p.as<float>()};
  const auto refuses = [](const std::function<void()>& call, const char* what) {
    try {
      call();
      ADD_FAILURE() << what << ": accepted";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("gemv_small_m"), std::string::npos) << what << ": " << e.what();
    }
  };
  refuses([&] { cuda::gemv_small_m_scaled(ctx.stream(), w.raw(), 16, 60, x.raw(), y.as<float>(), scale); }, "K 60");
  refuses([&] { cuda::gemv_small_m_residual_norm(ctx.stream(), w.raw(), 16, 60, x.raw(), out); }, "K 60");
  refuses(
      [&] { cuda::gemv_small_m_gated_pairs_scaled(ctx.stream(), w.raw(), 16, 64, x.as<char>() + 8, y.raw(), scale); },
      "misaligned x");
  refuses([&] { cuda::gemv_small_m_residual_norm(ctx.stream(), w.raw(), 16, 64, x.raw(), {}); }, "no buffers");
  refuses([&] { cuda::gemv_small_m_scaled(ctx.stream(), w.raw(), 16, 64, x.raw(), y.as<float>(), {}); }, "no partials");
}

}  // namespace
}  // namespace mamba3::test
