// The Mamba-3 layer on the GPU: every golden mixer case (prefill, caches, decode steps) in the exact f32 mode within
// the golden README's float32 tolerance and in bf16 within 2e-2; and against the CPU layer on random layers of
// awkward shapes (batch 3, L = 1/63/65/300, MIMO ranks 2 and 4, groups 2, output norm, the ablation switches),
// prefill then 32 decode steps, plus split prefills (continuation from a carried state). Every check runs for both
// kernel paths (staged: angle scan + staging + streaming state kernels; fused: one kernel per head).
#include <gtest/gtest.h>

#include <random>

#include "../model/mixer_case.h"
#include "../model/random_mixer.h"
#include "gpu_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

using cuda::Precision;
using cuda::Mamba3GpuPath;

// Every GPU check below runs once per kernel path.
class Mamba3GpuPaths : public ::testing::TestWithParam<Mamba3GpuPath> {};

std::string path_name(const ::testing::TestParamInfo<Mamba3GpuPath>& info) {
  return info.param == Mamba3GpuPath::Staged ? "Staged" : "Fused";
}

// Runs a GPU layer over (B, L, D) input u from `state`, returning (B, L, D).
Tensor gpu_forward(const cuda::GpuMamba3Layer& layer, const cuda::Context& ctx, const Tensor& u,
                   cuda::GpuMamba3State& state, Precision p) {
  const Mamba3Config& c = layer.config();
  const int64_t B = u.dim(0), L = u.dim(1), rows = B * L;
  cuda::DeviceBuffer x = to_device_activation(u, p);
  cuda::DeviceBuffer zx(layer.zx_bytes(rows)), o(layer.o_bytes(rows)), out(size_t(rows * c.d_model) * 4);
  poison(zx.raw(), zx.bytes());
  poison(o.raw(), o.bytes());
  poison(out.raw(), out.bytes());
  layer.forward(ctx, x.raw(), B, L, state.rows_from(0), zx.as<float>(), o.raw(), out.as<float>());
  ctx.sync();
  return from_device_f32(out.raw(), {B, L, c.d_model});
}

void expect_state_near(const Mamba3State& got, const Mamba3State& ref, double tol, const std::string& what) {
  EXPECT_LE(rel_l2(got.ssm, ref.ssm), tol) << what << " ssm";
  EXPECT_LE(rel_l2(got.k, ref.k), tol) << what << " k";
  EXPECT_LE(rel_l2(got.v, ref.v), tol) << what << " v";
  EXPECT_LE(rel_l2_angles(got.angle, ref.angle), tol) << what << " angle";
}

Mamba3State golden_state(const SafetensorsFile& f, const std::string& prefix) {
  return {f.get(prefix + "angle_state").to(DType::F32), f.get(prefix + "ssm_state").to(DType::F32),
          f.get(prefix + "k_state").to(DType::F32), f.get(prefix + "v_state").to(DType::F32)};
}

void run_golden(const std::string& path, Precision p, Mamba3GpuPath kernels) {
  SCOPED_TRACE(path + " " + cuda::precision_name(p));
  const double out_tol = p == Precision::F32 ? 1e-5 : 2e-2, cache_tol = p == Precision::F32 ? 1e-5 : 5e-2;
  auto f = SafetensorsFile::open(path);
  const Mamba3Config c = golden_mixer_config(f);
  cuda::Context ctx;
  cuda::GpuMamba3Layer layer(c, f.tensors(), "", path, nullptr, p);
  layer.set_path(kernels);
  const Tensor u = f.get("u").to(DType::F32), u_step = f.get("u_step").to(DType::F32);
  cuda::GpuMamba3State state(c, u.dim(0));
  Tensor out = gpu_forward(layer, ctx, u, state, p);
  EXPECT_LE(rel_l2(out, f.get("prefill_out_f64")), out_tol) << "prefill_out";
  expect_state_near(download_state(state, c), golden_state(f, "prefill_cache."), cache_tol, "prefill_cache");
  const Tensor step_ref = f.get("step_out_f64");
  for (int64_t t = 0; t < u_step.dim(1); ++t) {
    Tensor y = gpu_forward(layer, ctx, tokens(u_step, t, t + 1), state, p);
    EXPECT_LE(rel_l2(y, tokens(step_ref, t, t + 1)), out_tol) << "step " << t;
  }
  expect_state_near(download_state(state, c), golden_state(f, "final_cache."), cache_tol, "final_cache");
}

TEST_P(Mamba3GpuPaths, GoldenCasesF32) {
  MAMBA3_REQUIRE_GPU();
  auto cases = golden_cases("mixer_");
  ASSERT_FALSE(cases.empty()) << "no golden mixer cases in " << golden_dir();
  for (const auto& path : cases) run_golden(path.string(), Precision::F32, GetParam());
}

TEST_P(Mamba3GpuPaths, GoldenCasesBf16) {
  MAMBA3_REQUIRE_GPU();
  auto cases = golden_cases("mixer_");
  ASSERT_FALSE(cases.empty()) << "no golden mixer cases in " << golden_dir();
  for (const auto& path : cases) run_golden(path.string(), Precision::BF16, GetParam());
}

struct RandomCase {
  const char* name;
  int64_t d_model, d_state, headdim, ngroups, rank;
  bool mimo, outnorm, no_rotary, euler;
  double rope_fraction;
};

const RandomCase kRandomCases[] = {
    {"siso d_state 128 headdim 64", 128, 128, 64, 1, 1, false, false, false, false, 0.5},
    {"siso groups 3 outnorm 15 heads", 120, 32, 16, 3, 1, false, true, false, false, 0.5},
    {"siso rope full headdim 24", 72, 64, 24, 1, 1, false, false, false, false, 1.0},
    {"mimo r2 groups 2", 64, 32, 16, 2, 2, true, false, false, false, 0.5},
    {"mimo r4 outnorm d_state 128", 128, 128, 64, 1, 4, true, true, false, false, 0.5},
    {"mimo r3 d_state 48", 48, 48, 32, 1, 3, true, false, false, false, 1.0},
    {"siso no_rotary euler", 64, 32, 16, 1, 1, false, false, true, true, 0.5},
    {"mimo r2 no_rotary", 64, 32, 16, 1, 2, true, false, true, false, 0.5},
    {"siso euler d_state 256", 64, 256, 32, 1, 1, false, false, false, true, 0.5},
};

Mamba3Config make_config(const RandomCase& rc) {
  Mamba3Config c;
  c.d_model = rc.d_model;
  c.d_state = rc.d_state;
  c.headdim = rc.headdim;
  c.ngroups = rc.ngroups;
  c.is_mimo = rc.mimo;
  c.mimo_rank = rc.rank;
  c.is_outproj_norm = rc.outnorm;
  c.no_rotary = rc.no_rotary;
  c.euler = rc.euler;
  c.rope_fraction = rc.rope_fraction;
  c.chunk_size = 16;
  c.validate("random case");
  return c;
}

TEST_P(Mamba3GpuPaths, MatchesCpuOnRandomLayers) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(7);
  const int64_t B = 3;
  for (const RandomCase& rc : kRandomCases) {
    for (int64_t L : {1, 63, 65, 300}) {
      SCOPED_TRACE(std::string(rc.name) + " L=" + std::to_string(L));
      const Mamba3Config c = make_config(rc);
      TensorMap w = random_mixer_weights(c, rng);
      Mamba3Mixer cpu(c, w);
      cuda::GpuMamba3Layer gpu(c, w, "", "random", nullptr, Precision::F32);
      gpu.set_path(GetParam());
      const Tensor u = random_tensor(rng, {B, L, c.d_model});
      Mamba3State cpu_state = cpu.new_state(B);
      cuda::GpuMamba3State gpu_state(c, B);
      Tensor ref = cpu.prefill(u, cpu_state);
      EXPECT_LE(rel_l2(gpu_forward(gpu, ctx, u, gpu_state, Precision::F32), ref), 1e-5) << "prefill";
      expect_state_near(download_state(gpu_state, c), cpu_state, 1e-5, "after prefill");
      const int64_t steps = L == 300 ? 32 : 4;
      for (int64_t t = 0; t < steps; ++t) {
        const Tensor x = random_tensor(rng, {B, 1, c.d_model});
        Tensor y_ref = cpu.prefill(x, cpu_state);
        Tensor y = gpu_forward(gpu, ctx, x, gpu_state, Precision::F32);
        ASSERT_LE(rel_l2(y, y_ref), 1e-5) << "decode step " << t;
      }
      expect_state_near(download_state(gpu_state, c), cpu_state, 1e-5, "after decode");
    }
  }
}

// A prefill split in two (the second continuing from the carried state) equals the whole prefill, on the GPU.
TEST_P(Mamba3GpuPaths, SplitPrefillEqualsWhole) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(11);
  for (const RandomCase& rc : {kRandomCases[1], kRandomCases[4]}) {
    const Mamba3Config c = make_config(rc);
    TensorMap w = random_mixer_weights(c, rng);
    cuda::GpuMamba3Layer gpu(c, w, "", "random", nullptr, Precision::F32);
    gpu.set_path(GetParam());
    const Tensor u = random_tensor(rng, {2, 90, c.d_model});
    cuda::GpuMamba3State whole(c, 2), split(c, 2);
    Tensor all = gpu_forward(gpu, ctx, u, whole, Precision::F32);
    Tensor a = gpu_forward(gpu, ctx, tokens(u, 0, 37), split, Precision::F32);
    Tensor b = gpu_forward(gpu, ctx, tokens(u, 37, 90), split, Precision::F32);
    EXPECT_LE(rel_l2(a, tokens(all, 0, 37)), 1e-6) << rc.name;
    EXPECT_LE(rel_l2(b, tokens(all, 37, 90)), 1e-5) << rc.name;
    expect_state_near(download_state(split, c), download_state(whole, c), 1e-5, rc.name);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, Mamba3GpuPaths, ::testing::Values(Mamba3GpuPath::Staged, Mamba3GpuPath::Fused),
                         path_name);

// The staged path in segments (a stage budget of a few tokens, so the angle scan, k cache hand-over and state carry
// cross segment boundaries inside one call) equals the CPU and the fused path, for SISO, MIMO and groups.
TEST(Mamba3Gpu, StagedPrefillInSegmentsMatchesCpuAndFused) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(13);
  const int64_t B = 3, L = 77;
  for (const RandomCase& rc : {kRandomCases[0], kRandomCases[1], kRandomCases[3], kRandomCases[4], kRandomCases[8]}) {
    SCOPED_TRACE(rc.name);
    const Mamba3Config c = make_config(rc);
    TensorMap w = random_mixer_weights(c, rng);
    Mamba3Mixer cpu(c, w);
    cuda::GpuMamba3Layer staged(c, w, "", "random", nullptr, Precision::F32);
    cuda::GpuMamba3Layer fused(c, w, "", "random", nullptr, Precision::F32);
    fused.set_path(Mamba3GpuPath::Fused);
    // About 5 tokens per segment (16 segments, the last one shorter).
    const size_t per_token = size_t(B * (c.nheads() * c.num_angles() + 2 * c.rank() * c.nheads() * c.d_state +
                                         4 * c.nheads()) * 4);
    staged.set_prefill_stage_bytes(5 * per_token);
    const Tensor u = random_tensor(rng, {B, L, c.d_model});
    Mamba3State cpu_state = cpu.new_state(B);
    cuda::GpuMamba3State s_state(c, B), f_state(c, B);
    const Tensor ref = cpu.prefill(u, cpu_state);
    const Tensor ys = gpu_forward(staged, ctx, u, s_state, Precision::F32);
    const Tensor yf = gpu_forward(fused, ctx, u, f_state, Precision::F32);
    EXPECT_LE(rel_l2(ys, ref), 1e-5) << "staged vs cpu";
    EXPECT_LE(rel_l2(ys, yf), 1e-5) << "staged vs fused";
    expect_state_near(download_state(s_state, c), cpu_state, 1e-5, "staged state");
    expect_state_near(download_state(s_state, c), download_state(f_state, c), 1e-5, "staged vs fused state");
  }
}

// Decode on rows [1, 3) of a 4-row state (the row offset of the state's decode stage) equals the CPU on those rows.
TEST(Mamba3Gpu, StagedDecodeOnRowOffset) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(17);
  for (const RandomCase& rc : {kRandomCases[0], kRandomCases[4]}) {
    SCOPED_TRACE(rc.name);
    const Mamba3Config c = make_config(rc);
    TensorMap w = random_mixer_weights(c, rng);
    Mamba3Mixer cpu(c, w);
    cuda::GpuMamba3Layer gpu(c, w, "", "random", nullptr, Precision::F32);
    Mamba3State cpu_state = cpu.new_state(2);
    cuda::GpuMamba3State state(c, 4);
    const Tensor u = random_tensor(rng, {2, 9, c.d_model});
    cpu.prefill(u, cpu_state);
    {
      cuda::DeviceBuffer x = to_device_activation(u, Precision::F32);
      cuda::DeviceBuffer zx(gpu.zx_bytes(18)), o(gpu.o_bytes(18)), out(size_t(18 * c.d_model) * 4);
      gpu.forward(ctx, x.raw(), 2, 9, state.rows_from(1), zx.as<float>(), o.raw(), out.as<float>());
      ctx.sync();
    }
    for (int t = 0; t < 3; ++t) {
      const Tensor xs = random_tensor(rng, {2, 1, c.d_model});
      const Tensor ref = cpu.prefill(xs, cpu_state);
      cuda::DeviceBuffer x = to_device_activation(xs, Precision::F32);
      cuda::DeviceBuffer zx(gpu.zx_bytes(2)), o(gpu.o_bytes(2)), out(size_t(2 * c.d_model) * 4);
      gpu.forward(ctx, x.raw(), 2, 1, state.rows_from(1), zx.as<float>(), o.raw(), out.as<float>());
      ctx.sync();
      EXPECT_LE(rel_l2(from_device_f32(out.raw(), {2, 1, c.d_model}), ref), 1e-5) << "step " << t;
    }
  }
}

TEST(Mamba3Gpu, RejectsUnsupportedConfigurations) {
  Mamba3Config c;
  c.d_model = 64;
  c.headdim = 16;
  c.d_state = 512;
  EXPECT_NE(cuda::mamba3_gpu_supported(c).find("d_state"), std::string::npos);
  c.d_state = 64;
  c.is_mimo = true;
  c.mimo_rank = 8;
  EXPECT_NE(cuda::mamba3_gpu_supported(c).find("mimo_rank"), std::string::npos);
}

}  // namespace
}  // namespace mamba3::test
