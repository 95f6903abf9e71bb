// The tuned bf16 matrix product (gemm_tuner.h) against a float64 product of the same bf16 values on awkward shapes
// (odd M, N and K, padded and misaligned row pitches, the 1.5B decode shape), the plan's reuse, linear() with a bias
// and fixed row blocks, and graph capture: a first call inside a capture does not tune, and a captured call replays
// the tuned plan.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>

#include "cuda/gemm_tuner.h"
#include "cuda/gpu_matrix.h"
#include "gpu_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

using cuda::GemmShape;
using cuda::GemmTuner;

// A product's operands on the host (bf16 values, x with its row pitch) and on the device (y poisoned).
struct Problem {
  GemmShape s;
  Tensor w, x;  // (N, K), (M, ldx) bf16
  cuda::DeviceBuffer dw, dx, dy;

  Problem(std::mt19937& rng, GemmShape shape) : s(shape) {
    w = random_tensor(rng, {s.n, s.k}).to(DType::BF16);
    x = random_tensor(rng, {s.m, s.ldx}).to(DType::BF16);  // the pitch's extra columns must not be read
    dw = cuda::DeviceBuffer(w.nbytes());
    dx = cuda::DeviceBuffer(x.nbytes());
    dy = cuda::DeviceBuffer(size_t(s.m * s.ldy) * 4);
    dw.upload(w.raw(), w.nbytes());
    dx.upload(x.raw(), x.nbytes());
    poison(dy.raw(), dy.bytes());
  }
  float* y() const { return dy.as<float>(); }

  Tensor reference() const { return product_wt_f64(w, x, s.m); }

  // y's first N columns, packed (M, N); fails the test when a column past N (inside the pitch) was written.
  Tensor result() const {
    const Tensor full = from_device_f32(dy.raw(), {s.m, s.ldy});
    Tensor out = Tensor::empty(DType::F32, {s.m, s.n});
    const size_t gap = size_t(s.ldy - s.n) * 4;
    const std::string poisoned(gap, '\xff');
    for (int64_t m = 0; m < s.m; ++m) {
      const float* row = full.data<float>() + m * s.ldy;
      std::memcpy(out.data<float>() + m * s.n, row, size_t(s.n) * 4);
      EXPECT_EQ(std::memcmp(row + s.n, poisoned.data(), gap), 0) << "row " << m << ": columns past N were written";
    }
    return out;
  }
};

std::string name(const GemmShape& s) {
  return "n=" + std::to_string(s.n) + " k=" + std::to_string(s.k) + " m=" + std::to_string(s.m) +
         " ldx=" + std::to_string(s.ldx) + " ldy=" + std::to_string(s.ldy);
}

// f32 accumulation of up to 4096 products of bf16 values: ~1e-7 relative in practice, split-K included.
constexpr double kTolerance = 1e-5;

TEST(GemmTunerGpu, MatchesFloat64OnAwkwardShapes) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  GemmTuner& tuner = ctx.gemm_tuner();
  std::mt19937 rng(7);
  const GemmShape shapes[] = {
      {2048, 4096, 128, 4096, 2048},  // 1.5B out_proj/fc2 at decode b128
      {96, 64, 5, 64, 96},
      {1000, 200, 33, 208, 1024},     // padded pitches
      {1000, 200, 33, 201, 1003},     // odd pitches: 2-byte aligned x rows, 4-byte aligned y rows
      {2048, 64, 300, 72, 2048},
      {96, 4096, 33, 4096 + 64, 100},
      {2048, 4096, 5, 4096, 2048 + 16},
      {1000, 4096, 300, 4104, 1000},
      {96, 200, 128, 240, 96},
  };
  for (const GemmShape& s : shapes) {
    SCOPED_TRACE(name(s));
    const Problem p(rng, s);
    const int64_t tunings = tuner.tunings();
    ASSERT_EQ(tuner.choice(p.dw.raw(), p.dx.raw(), p.y(), s), GemmTuner::Choice::Untuned);
    tuner.matmul(p.dw.raw(), p.dx.raw(), p.y(), s);
    EXPECT_EQ(tuner.tunings(), tunings + 1);
    EXPECT_NE(tuner.choice(p.dw.raw(), p.dx.raw(), p.y(), s), GemmTuner::Choice::Untuned);
    const Tensor first = p.result();
    EXPECT_LE(rel_l2(first, p.reference()), kTolerance);
    // The second call reuses the plan (no timing) and computes the same bits: the tuning call's output is the winner's.
    poison(p.dy.raw(), p.dy.bytes());
    tuner.matmul(p.dw.raw(), p.dx.raw(), p.y(), s);
    EXPECT_EQ(tuner.tunings(), tunings + 1);
    const Tensor second = p.result();
    EXPECT_EQ(std::memcmp(first.raw(), second.raw(), first.nbytes()), 0) << "the cached plan computed other bits";
  }
}

// linear() on bf16 weights with a bias, in fixed row blocks (the server's exact batched prefill): every block runs
// the plan tuned for the block's shape, and the bias is added once.
TEST(GemmTunerGpu, LinearWithBiasAndRowBlocks) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(13);
  const int64_t N = 1000, K = 200, M = 40, block = 16, rows = 48;  // 40 rows in 3 blocks of 16 (the last padded)
  const Tensor w = random_tensor(rng, {N, K}), bias = random_tensor(rng, {N});
  const cuda::GpuMatrix gm = cuda::GpuMatrix::upload(w, cuda::Precision::BF16, &bias);
  const Tensor x = random_tensor(rng, {rows, K}).to(DType::BF16);
  cuda::DeviceBuffer dx(x.nbytes()), dy(size_t(rows * N) * 4);
  dx.upload(x.raw(), x.nbytes());
  poison(dy.raw(), dy.bytes());
  {
    const cuda::RowBlockScope fixed(ctx, block);
    ASSERT_EQ(ctx.padded_rows(M), rows);
    cuda::linear(ctx, gm, dx.raw(), M, dy.as<float>());
  }
  const GemmShape block_shape{N, K, block, K, N};
  const auto chosen = ctx.gemm_tuner().choice(gm.weight.raw(), dx.raw(), dy.as<float>(), block_shape);
  if (cuda::gemm_tune_enabled()) {
    EXPECT_NE(chosen, GemmTuner::Choice::Untuned);
    EXPECT_EQ(ctx.gemm_tuner().tunings(), 1) << "the three blocks share one plan";
  } else {
    EXPECT_EQ(chosen, GemmTuner::Choice::Untuned) << "MAMBA3_GEMM_TUNE=0 must not reach the tuner";
  }
  Tensor ref = product_wt_f64(w.to(DType::BF16), x, M);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) ref.data<double>()[m * N + n] += bias.data<float>()[n];
  const Tensor all = from_device_f32(dy.raw(), {rows, N});
  Tensor out = Tensor::empty(DType::F32, {M, N});
  std::memcpy(out.raw(), all.raw(), out.nbytes());
  EXPECT_LE(rel_l2(out, ref), kTolerance);
}

// One tuner call captured on ctx's stream into an instantiated graph (freed with the object).
struct CapturedMatmul {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CapturedMatmul(cuda::Context& ctx, GemmTuner& tuner, const Problem& p, const GemmShape& s) {
    MAMBA3_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
    tuner.matmul(p.dw.raw(), p.dx.raw(), p.y(), s);
    MAMBA3_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
    MAMBA3_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  }
  ~CapturedMatmul() {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  CapturedMatmul(const CapturedMatmul&) = delete;
  CapturedMatmul& operator=(const CapturedMatmul&) = delete;
  void launch(cuda::Context& ctx) const { MAMBA3_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream())); }
};

// A shape first seen inside a capture is not tuned (timing would synchronize a capturing stream): the call is
// captured on cublasGemmEx's default, the replay computes the right result, and later eager calls stay on it.
TEST(GemmTunerGpu, FirstCallInsideCaptureDoesNotTune) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  GemmTuner& tuner = ctx.gemm_tuner();
  std::mt19937 rng(17);
  const GemmShape s{1000, 200, 64, 200, 1000};
  const Problem p(rng, s);
  const CapturedMatmul captured(ctx, tuner, p, s);
  EXPECT_EQ(tuner.tunings(), 0);
  EXPECT_EQ(tuner.choice(p.dw.raw(), p.dx.raw(), p.y(), s), GemmTuner::Choice::Default);
  captured.launch(ctx);
  ctx.sync();
  const Tensor replayed = p.result();
  EXPECT_LE(rel_l2(replayed, p.reference()), kTolerance);
  poison(p.dy.raw(), p.dy.bytes());
  tuner.matmul(p.dw.raw(), p.dx.raw(), p.y(), s);
  EXPECT_EQ(tuner.tunings(), 0) << "a shape pinned during a capture was tuned later";
  const Tensor eager = p.result();
  EXPECT_EQ(std::memcmp(replayed.raw(), eager.raw(), eager.nbytes()), 0) << "eager and replayed results differ";
}

// The decode step's order: an eager call tunes, the captured call replays the tuned plan bit for bit.
TEST(GemmTunerGpu, CaptureAfterTuningReplaysThePlan) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  GemmTuner& tuner = ctx.gemm_tuner();
  std::mt19937 rng(19);
  const GemmShape s{2048, 4096, 64, 4096, 2048};
  const Problem p(rng, s);
  tuner.matmul(p.dw.raw(), p.dx.raw(), p.y(), s);
  ASSERT_EQ(tuner.tunings(), 1);
  const Tensor eager = p.result();
  const CapturedMatmul captured(ctx, tuner, p, s);
  EXPECT_EQ(tuner.tunings(), 1);
  poison(p.dy.raw(), p.dy.bytes());
  for (int i = 0; i < 2; ++i) captured.launch(ctx);
  ctx.sync();
  const Tensor replayed = p.result();
  EXPECT_LE(rel_l2(replayed, p.reference()), kTolerance);
  EXPECT_EQ(std::memcmp(replayed.raw(), eager.raw(), eager.nbytes()), 0) << "eager and replayed results differ";
}

}  // namespace
}  // namespace mamba3::test
