// The stream GEMM (TMA weight stream → wgmma, tiles split over K inside thread-block clusters) against a float64
// product of the same bf16 values: every batch width class (1–64 rows: the narrow forms; 65–128: the wide form),
// tiles split over 2–8 blocks (small N), one block per tile (large N), K not a multiple of the k-block, odd N,
// strided rows; repeated calls bit-identical (every tile written again each call); rows independent of the batch they
// share a call with.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>

#include "cuda/basic_kernels.h"
#include "cuda/gpu_matrix.h"
#include "cuda/stream_gemm.h"
#include "gpu_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

bool stream_gemm_device(const cuda::Context& ctx) { return ctx.info().cc_major == 9 && ctx.info().cc_minor == 0; }

struct Case {
  int64_t n, k, x_pad;  // x rows are k + x_pad elements apart
  std::vector<int64_t> rows;
};

TEST(StreamGemmGpu, MatchesFloat64OnAwkwardShapes) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  if (!stream_gemm_device(ctx)) GTEST_SKIP() << "the stream GEMM runs on compute capability 9.0 only";
  std::mt19937 rng(17);
  // Narrow tiles: 128 weight rows, k-blocks of 128 columns. The wide class (65–128 rows): 256- or 128-row tiles,
  // k-blocks of 64 columns, grids chosen by the device's cluster occupancy (ctest runs this test again with each tile
  // height forced: test_stream_gemm_gpu_wide_tile_128/256).
  const std::vector<Case> cases = {
      {1001, 2056, 0, {1, 5, 9, 16, 17, 33, 40, 64, 65, 128}},  // 8 tiles × 17 k-blocks, 8 blocks per tile
      {200, 8192, 24, {3, 8, 40, 64, 96}},                      // 2 tiles × 64 k-blocks, 8 blocks per tile
      {40000, 72, 8, {7, 31, 64, 127}},                         // 313 tiles of one k-block: one block per tile
      {37, 3824, 0, {2, 12, 57, 111}},                          // one partial tile; K = 29.9 k-blocks
      {8672, 16, 0, {64, 100}},                                 // K shorter than a k-block (68 tiles, not split)
      {2048, 4096, 0, {8, 64, 128}},                            // the 1.5B out_proj: 16 tiles × 8 blocks (wide: split)
      {8672, 2048, 0, {5, 64, 128}},  // the 1.5B in_proj: 68 tiles, not split (wide: 34 × 3 on 132 SMs)
      {3840, 1000, 8, {6, 20, 77}},   // 30 tiles × 4 blocks (one per SM on 132 SMs)
      {2560, 296, 0, {9, 128}},       // 20 tiles × 3 blocks (its three k-blocks)
      {520, 104, 0, {66}},            // wide: a partial tile, two k-blocks (the second partial)
  };
  // The wide form's reduction is exercised: the out_proj shape is split over several blocks per tile.
  EXPECT_GT(cuda::stream_gemm_wide_grid(ctx, 2048, 4096).split, 1);
  for (const Case& c : cases) {
    const Tensor w = random_tensor(rng, {c.n, c.k}).to(DType::BF16);
    cuda::DeviceBuffer dw(w.nbytes());
    dw.upload(w.raw(), w.nbytes());
    for (int64_t M : c.rows) {
      SCOPED_TRACE("N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) + " M=" + std::to_string(M));
      const int64_t stride = c.k + c.x_pad;
      const Tensor x = random_tensor(rng, {M, stride}).to(DType::BF16);
      const Tensor ref = product_wt_f64(w, x);
      cuda::DeviceBuffer dx(x.nbytes()), dy(size_t(M * c.n) * 4);
      dx.upload(x.raw(), x.nbytes());
      ASSERT_TRUE(cuda::stream_gemm_supported(ctx, M, c.n, c.k, stride, dw.raw(), dx.raw()));
      poison(dy.raw(), dy.bytes());
      cuda::stream_gemm(ctx, dw.raw(), c.n, c.k, dx.raw(), M, stride, dy.as<float>(), c.n);
      ctx.sync();
      const Tensor first = from_device_f32(dy.raw(), {M, c.n});
      EXPECT_LE(rel_l2(first, ref), 1e-5);
      // Again, poisoned: every tile is written again, and the sums are the same.
      poison(dy.raw(), dy.bytes());
      cuda::stream_gemm(ctx, dw.raw(), c.n, c.k, dx.raw(), M, stride, dy.as<float>(), c.n);
      ctx.sync();
      const Tensor second = from_device_f32(dy.raw(), {M, c.n});
      EXPECT_EQ(std::memcmp(first.raw(), second.raw(), first.nbytes()), 0) << "a repeated call differs";
    }
  }
}

// Output rows y_stride apart (a wider buffer), and rows beyond M untouched: a narrow form, the wide class with split
// tiles (N 300, K 512) and unsplit ones (K 72: one k-block pair), and N 302 (each row's last quad partial: stored
// element by element beside 16-byte stores).
TEST(StreamGemmGpu, StridedOutputLeavesOtherColumnsAlone) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  if (!stream_gemm_device(ctx)) GTEST_SKIP() << "the stream GEMM runs on compute capability 9.0 only";
  std::mt19937 rng(23);
  for (auto [N, K, M] : {std::array<int64_t, 3>{300, 512, 20}, {300, 512, 128}, {3000, 72, 100}, {302, 512, 96}}) {
    SCOPED_TRACE("N=" + std::to_string(N) + " K=" + std::to_string(K) + " M=" + std::to_string(M));
    const int64_t ldy = (N + 53) / 4 * 4;  // a multiple of 4: 16-byte stores where a row's quad is whole
    const Tensor w = random_tensor(rng, {N, K}).to(DType::BF16), x = random_tensor(rng, {M, K}).to(DType::BF16);
    cuda::DeviceBuffer dw(w.nbytes()), dx(x.nbytes()), dy(size_t((M + 1) * ldy) * 4);
    dw.upload(w.raw(), w.nbytes());
    dx.upload(x.raw(), x.nbytes());
    poison(dy.raw(), dy.bytes());
    cuda::stream_gemm(ctx, dw.raw(), N, K, dx.raw(), M, K, dy.as<float>(), ldy);
    ctx.sync();
    const Tensor all = from_device_f32(dy.raw(), {M + 1, ldy});
    Tensor packed = Tensor::empty(DType::F32, {M, N});
    int64_t untouched = 0;
    for (int64_t m = 0; m <= M; ++m)
      for (int64_t j = 0; j < ldy; ++j) {
        const float v = all.data<float>()[m * ldy + j];
        if (m < M && j < N) {
          packed.data<float>()[m * N + j] = v;
        } else {
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          untouched += bits == 0xffffffffu;
        }
      }
    EXPECT_EQ(untouched, (M + 1) * ldy - M * N) << "the kernel wrote outside its M × N outputs";
    EXPECT_LE(rel_l2(packed, product_wt_f64(w, x)), 1e-5);
  }
}

// A row's result does not depend on the batch it is computed in (decode slots): rows of a 64-row product equal
// the same rows computed in 5-, 16- and 33-row products, bit for bit; in the wide form, rows of a 128-row product
// equal those of 65- and 100-row products.
TEST(StreamGemmGpu, RowsAreBatchInvariant) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  if (!stream_gemm_device(ctx)) GTEST_SKIP() << "the stream GEMM runs on compute capability 9.0 only";
  std::mt19937 rng(29);
  const int64_t N = 2048 + 40, K = 4096 + 8;
  const Tensor w = random_tensor(rng, {N, K}).to(DType::BF16);
  cuda::DeviceBuffer dw(w.nbytes());
  dw.upload(w.raw(), w.nbytes());
  for (const auto& [M, smaller] : {std::pair<int64_t, std::vector<int64_t>>{64, {5, 16, 33}}, {128, {65, 100}}}) {
    const Tensor x = random_tensor(rng, {M, K}).to(DType::BF16);
    cuda::DeviceBuffer dx(x.nbytes()), dy(size_t(M * N) * 4), ds(size_t(M * N) * 4);
    dx.upload(x.raw(), x.nbytes());
    cuda::stream_gemm(ctx, dw.raw(), N, K, dx.raw(), M, K, dy.as<float>(), N);
    const Tensor all = from_device_f32(dy.raw(), {M, N});
    for (int64_t rows : smaller) {
      cuda::stream_gemm(ctx, dw.raw(), N, K, dx.raw(), rows, K, ds.as<float>(), N);
      const Tensor part = from_device_f32(ds.raw(), {rows, N});
      EXPECT_EQ(std::memcmp(part.raw(), all.raw(), part.nbytes()), 0)
          << "the first " << rows << " rows differ from the same rows in a " << M << "-row product";
    }
  }
}

TEST(StreamGemmGpu, RejectsUnsupportedShapes) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  if (!stream_gemm_device(ctx)) GTEST_SKIP() << "the stream GEMM runs on compute capability 9.0 only";
  cuda::DeviceBuffer buf(size_t(1) << 20);
  EXPECT_FALSE(cuda::stream_gemm_supported(ctx, 129, 64, 64, 64, buf.raw(), buf.raw()));  // too many rows
  EXPECT_FALSE(cuda::stream_gemm_supported(ctx, 4, 64, 60, 64, buf.raw(), buf.raw()));   // K not a multiple of 8
  EXPECT_FALSE(cuda::stream_gemm_supported(ctx, 4, 64, 64, 68, buf.raw(), buf.raw()));   // stride
  EXPECT_FALSE(cuda::stream_gemm_supported(ctx, 4, 64, 64, 64, static_cast<char*>(buf.raw()) + 2, buf.raw()));
  EXPECT_THROW(cuda::stream_gemm(ctx, buf.raw(), 64, 60, buf.raw(), 4, 64, buf.as<float>(), 64), Error);
}

// The gated epilogue (W's rows (value, gate) pairs): its bf16 activations equal, bit for bit, the stream GEMM followed
// by the activation kernel, in every width class and with a partial last tile — unsplit tiles in every form, and
// split tiles where the row epilogue adds whole rows (the wide class; the narrow forms under
// the default row epilogue, which refuse them under MAMBA3_STREAM_GEMM_EPILOGUE=fragments); an odd pair count
// (element-by-element stores); linear_gated_silu takes it at the stream GEMM's rows.
TEST(StreamGemmGpu, GatedPairsMatchProductThenActivation) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  if (!stream_gemm_device(ctx)) GTEST_SKIP() << "the stream GEMM runs on compute capability 9.0 only";
  std::mt19937 rng(41);
  struct GatedCase {
    int64_t pairs, k;
    std::vector<int64_t> rows;
  };
  const std::vector<GatedCase> cases = {
      // 135 narrow tiles, 68 of 256 rows or 135 of 128 (all three partial): unsplit on 132 SMs in every form.
      {8600, 520, {1, 3, 8, 9, 16, 31, 64, 65, 128}},
      // 9 or 18 wide tiles (the last partial) split over K (K long enough that the wide grid's cost model splits
      // them); at 8 and 33 rows 18 narrow tiles split over K, which the narrow forms take under the row epilogue only
      // (not under MAMBA3_STREAM_GEMM_EPILOGUE=fragments).
      {1100, 4000, {8, 33, 65, 128}},
      {1101, 4000, {65, 128}},  // an odd pair count: the act rows are not 4-byte aligned (two-byte stores)
  };
  EXPECT_GT(cuda::stream_gemm_wide_grid(ctx, 2 * 1100, 4000).split, 1);
  for (const GatedCase& c : cases) {
    const int64_t F = c.pairs, N = 2 * F, K = c.k;
    const Tensor w = random_tensor(rng, {N, K}).to(DType::BF16);
    cuda::DeviceBuffer dw(w.nbytes());
    dw.upload(w.raw(), w.nbytes());
    for (int64_t M : c.rows) {
      SCOPED_TRACE("N=" + std::to_string(N) + " K=" + std::to_string(K) + " M=" + std::to_string(M));
      if (c.pairs == 1100 && !cuda::stream_gemm_row_epilogue(M)) continue;
      const Tensor x = random_tensor(rng, {M, K}, -2.0f, 2.0f).to(DType::BF16);
      cuda::DeviceBuffer dx(x.nbytes()), dy(size_t(M * N) * 4), fused(size_t(M * F) * 2), plain(size_t(M * F) * 2);
      dx.upload(x.raw(), x.nbytes());
      ASSERT_TRUE(cuda::stream_gemm_gated_pairs_supported(ctx, M, N, K, K, dw.raw(), dx.raw()));
      poison(fused.raw(), fused.bytes());
      cuda::stream_gemm_gated_pairs(ctx, dw.raw(), N, K, dx.raw(), M, K, fused.raw());
      cuda::stream_gemm(ctx, dw.raw(), N, K, dx.raw(), M, K, dy.as<float>(), N);
      cuda::gated_silu(ctx.stream(), dy.as<float>(), M, F, plain.raw(), cuda::Precision::BF16);
      ctx.sync();
      std::vector<uint16_t> a(size_t(M * F)), b(size_t(M * F));
      fused.download(a.data(), fused.bytes());
      plain.download(b.data(), plain.bytes());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), fused.bytes()), 0) << "fused epilogue differs from the kernel pair";
      // And against float64: within bf16 rounding.
      EXPECT_LE(rel_l2(from_device_bf16(fused.as<uint16_t>(), {M, F}), gated_pairs_f64(w, x)), 1e-2);
      if (M == 9) {  // through linear_gated_silu (the default route takes 2–64 rows here): the same bits
        const cuda::GpuMatrix gm = cuda::GpuMatrix::upload(w, cuda::Precision::BF16);
        poison(plain.raw(), plain.bytes());
        cuda::linear_gated_silu(ctx, gm, dx.raw(), M, dy.as<float>(), plain.raw(), cuda::Precision::BF16);
        ctx.sync();
        plain.download(b.data(), plain.bytes());
        EXPECT_EQ(std::memcmp(a.data(), b.data(), fused.bytes()), 0) << "linear_gated_silu";
      }
    }
  }
  // Split tiles of the narrow forms (out_proj-like N 2048 at 8 rows) are refused unless the row epilogue adds
  // them; the wide class takes them.
  cuda::DeviceBuffer dx(size_t(128 * 4096) * 2), dn(size_t(2048 * 4096) * 2), dodd(size_t(2049 * 520) * 2);
  EXPECT_EQ(cuda::stream_gemm_gated_pairs_supported(ctx, 8, 2048, 4096, 4096, dn.raw(), dx.raw()),
            cuda::stream_gemm_row_epilogue(8));
  EXPECT_TRUE(cuda::stream_gemm_gated_pairs_supported(ctx, 128, 2048, 4096, 4096, dn.raw(), dx.raw()));
  EXPECT_FALSE(cuda::stream_gemm_gated_pairs_supported(ctx, 8, 2049, 520, 520, dodd.raw(), dx.raw()));  // odd N
}

// RMSNorm folded into the wide class (65–128 rows): P (out_proj / fc2 shapes) leaves the residual equal, bit for bit,
// to its plain product plus the residual and bf16(v ⊙ g) equal to the rounding of that; its partials sum, per batch
// row, to Σ v²; C (in_proj / fc1 shapes) gives rstd · W_C · bf16(v ⊙ g) within float32 rounding of float64, and its
// gated pairs within bf16 rounding. Shapes with split and unsplit tiles (one k-block: never split), partial tiles and
// k-blocks; ctest reruns it with each tile height and with splits 1 and 2 forced.
TEST(StreamGemmGpu, FoldedNormMatchesFloat64) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  if (!stream_gemm_device(ctx)) GTEST_SKIP() << "the stream GEMM runs on compute capability 9.0 only";
  std::mt19937 rng(43);
  const float eps = 1e-5f;
  for (auto [D, K, F, M] : {std::array<int64_t, 4>{2048, 4096, 4096, 128},
                            {1000, 1032, 37, 65},
                            {304, 520, 5, 100},
                            {2056, 2056, 1027, 128},
                            {8, 72, 3, 77},
                            {2048, 64, 300, 128},   // P: one k-block, so unsplit over 8 or 16 tiles
                            {1002, 520, 9, 70},     // D not a multiple of 8: P alone (C's K must be), whose rows
                                                    // end in partial quads: element-by-element residual updates
                            {64, 72, 2000, 96}}) {  // C: one k-block, so unsplit over 16 or 32 tiles
    SCOPED_TRACE("D=" + std::to_string(D) + " K=" + std::to_string(K) + " F=" + std::to_string(F) +
                 " M=" + std::to_string(M));
    const bool consumer = D % 8 == 0;  // C's K = D
    ASSERT_TRUE(cuda::stream_gemm_folds_norms(ctx, M, D, K));
    ASSERT_EQ(cuda::stream_gemm_folds_norms(ctx, M, 2 * F, D), consumer);
    const Tensor wp = random_tensor(rng, {D, K}).to(DType::BF16), wc = random_tensor(rng, {2 * F, D}).to(DType::BF16);
    const Tensor x = random_tensor(rng, {M, K}).to(DType::BF16), r0 = random_tensor(rng, {M, D}, -3.0f, 3.0f);
    const Tensor g = random_tensor(rng, {D}, 0.5f, 1.5f);
    cuda::DeviceBuffer dwp = to_device(wp), dwc = to_device(wc), dx = to_device(x), dr = to_device(r0),
                       dg = to_device(g);
    const int64_t parts = cuda::stream_gemm_norm_parts(ctx, D, K), stride = cuda::kStreamGemmMaxRows;
    ASSERT_GE(parts, 1);
    ASSERT_LE(parts, (D + 63) / 64);  // one per tile of ≥ 64 weight rows (the size CudaModel gives the partials)
    cuda::DeviceBuffer dout16(size_t(M * D) * 2), dparts(size_t(parts * stride) * 4), dyp(size_t(M * D) * 4);
    cuda::DeviceBuffer dyc(size_t(M * 2 * F) * 4), dact(size_t(M * F) * 2);
    poison(dout16.raw(), dout16.bytes());
    poison(dparts.raw(), dparts.bytes());
    cuda::stream_gemm(ctx, dwp.raw(), D, K, dx.raw(), M, K, dyp.as<float>(), D);
    cuda::stream_gemm_residual_norm(ctx, dwp.raw(), D, K, dx.raw(), M, K,
                                    {dr.as<float>(), dg.as<float>(), dout16.raw(), dparts.as<float>()});
    const cuda::GemvRowScale scale{dparts.as<float>(), parts, D, eps};
    poison(dyc.raw(), dyc.bytes());
    poison(dact.raw(), dact.bytes());
    if (consumer) {
      cuda::stream_gemm_scaled(ctx, dwc.raw(), 2 * F, D, dout16.raw(), M, D, dyc.as<float>(), 2 * F, scale);
      cuda::stream_gemm_gated_pairs_scaled(ctx, dwc.raw(), 2 * F, D, dout16.raw(), M, D, dact.raw(), scale);
    }
    ctx.sync();
    // P: residual and bf16(v ⊙ g) bit for bit.
    const Tensor yp = from_device_f32(dyp.raw(), {M, D}), r1 = from_device_f32(dr.raw(), {M, D});
    Tensor v = Tensor::empty(DType::F32, {M, D}), vg = Tensor::empty(DType::F32, {M, D});
    for (int64_t e = 0; e < M * D; ++e) {
      v.data<float>()[e] = yp.data<float>()[e] + r0.data<float>()[e];
      vg.data<float>()[e] = v.data<float>()[e] * g.data<float>()[e % D];
    }
    EXPECT_EQ(std::memcmp(r1.raw(), v.raw(), v.nbytes()), 0) << "the residual update differs from product + residual";
    const Tensor vg16 = vg.to(DType::BF16);
    std::vector<uint16_t> got16(static_cast<size_t>(M * D));
    dout16.download(got16.data(), dout16.bytes());
    EXPECT_EQ(std::memcmp(got16.data(), vg16.raw(), dout16.bytes()), 0) << "bf16(v ⊙ g) differs";
    // The partials: per batch row, every column's v² once; C's reference rstd from the same sums in float64.
    std::vector<float> got_parts(static_cast<size_t>(parts * stride));
    dparts.download(got_parts.data(), dparts.bytes());
    std::vector<double> rstd(static_cast<size_t>(M));
    for (int64_t r = 0; r < M; ++r) {
      double parts_sum = 0, vv = 0;
      for (int64_t p = 0; p < parts; ++p) parts_sum += double(got_parts[size_t(p * stride + r)]);
      for (int64_t j = 0; j < D; ++j) vv += double(v.data<float>()[r * D + j]) * double(v.data<float>()[r * D + j]);
      EXPECT_NEAR(parts_sum, vv, 1e-5 * vv) << "batch row " << r << ": the partials do not sum to Σ v²";
      rstd[size_t(r)] = 1.0 / std::sqrt(vv / double(D) + double(eps));
    }
    if (!consumer) continue;
    // C: rstd · W_C · bf16(v ⊙ g) in float64, and its gated pairs.
    Tensor yref = product_wt_f64(wc, vg16);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < 2 * F; ++j) yref.data<double>()[r * 2 * F + j] *= rstd[size_t(r)];
    EXPECT_LE(rel_l2(from_device_f32(dyc.raw(), {M, 2 * F}), yref), 1e-5);
    EXPECT_LE(rel_l2(from_device_bf16(dact.as<uint16_t>(), {M, F}), gated_pairs_of_f64(yref)), 1e-2);
  }
  // Not the wide class: refused.
  EXPECT_FALSE(cuda::stream_gemm_folds_norms(ctx, 64, 2048, 4096));
  EXPECT_FALSE(cuda::stream_gemm_folds_norms(ctx, 129, 2048, 4096));
  cuda::DeviceBuffer buf(size_t(1) << 20);
  EXPECT_THROW(cuda::stream_gemm_scaled(ctx, buf.raw(), 64, 64, buf.raw(), 32, 64, buf.as<float>(), 64,
                                        {buf.as<float>(), 1, 64, 1e-5f}),
               Error);
}

}  // namespace
}  // namespace mamba3::test
