// The Mamba-3 layer on the GPU: every golden mixer case (prefill, caches, decode steps) in the exact f32 mode within
// the golden README's float32 tolerance and in bf16 within 2e-2; and against the CPU layer on random layers of
// awkward shapes (batch 3, L = 1/63/65/300, MIMO ranks 2 and 4, groups 2, output norm, the ablation switches),
// prefill then 32 decode steps, plus split prefills (continuation from a carried state) and decode steps that skip
// the rows a slot mask marks inactive (Mamba3GpuState::active). Every check runs for the three kernel paths (staged:
// angle scan + staging + streaming state kernels; fused: one kernel per head; chunked: staged with the chunked
// tensor-core state kernel for bf16 prefills, so its f32 checks run the staged kernels and its bf16 golden check the
// chunked one); the staged path's decode steps run on the head decode kernel and on the streaming one. Dedicated tests
// run bf16 chunked prefills of awkward shapes against the CPU, and the streaming decode against the head decode at a
// batch that makes its blocks walk several items.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../model/mixer_case.h"
#include "../model/random_mixer.h"
#include "cuda/mamba3_chunk_gpu.h"
#include "cuda/mamba3_decode_gpu.h"
#include "gpu_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

using cuda::Precision;
using cuda::Mamba3GpuPath;

// Every GPU check below runs once per kernel path; the staged path's decode steps once on the head decode kernel and
// twice on the streaming one (mamba3_decode_gpu.h): one block per head with 2 stages and two with 3, so that every
// block walks several sequences through its ring of stages.
struct PathCase {
  const char* name;
  Mamba3GpuPath path;
  cuda::DecodeKernel decode;
  int blocks_per_head, stages;
  bool head_tensor_cores = false;
};

class Mamba3GpuPaths : public ::testing::TestWithParam<PathCase> {
 protected:
  void SetUp() override {
    saved_ = cuda::decode_choice();
    cuda::DecodeChoice c = saved_;
    c.kernel = GetParam().decode;
    c.blocks_per_head = GetParam().blocks_per_head;
    c.stages = GetParam().stages;
    c.head_tensor_cores = GetParam().head_tensor_cores;
    cuda::set_decode_choice(c);
  }
  void TearDown() override { cuda::set_decode_choice(saved_); }
  Mamba3GpuPath path() const { return GetParam().path; }

 private:
  cuda::DecodeChoice saved_;
};

std::string path_name(const ::testing::TestParamInfo<PathCase>& info) { return info.param.name; }

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
  for (const auto& path : cases) run_golden(path.string(), Precision::F32, this->path());
}

TEST_P(Mamba3GpuPaths, GoldenCasesBf16) {
  MAMBA3_REQUIRE_GPU();
  auto cases = golden_cases("mixer_");
  ASSERT_FALSE(cases.empty()) << "no golden mixer cases in " << golden_dir();
  for (const auto& path : cases) run_golden(path.string(), Precision::BF16, this->path());
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
    // d_state 36: float4 rows whose rotary partners (n ± 18) are not float4-aligned (the head kernel's scalar path).
    {"mimo r2 d_state 36 rope full", 64, 36, 16, 1, 2, true, false, false, false, 1.0},
    // d_state not a multiple of 4: the staged decode falls back from the float4 head kernel to the cp.async one.
    {"siso d_state 30 rope full", 64, 30, 16, 1, 1, false, false, false, false, 1.0},
    {"mimo r2 d_state 30 outnorm", 64, 30, 16, 1, 2, true, true, false, false, 1.0},
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
      gpu.set_path(path());
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
    gpu.set_path(path());
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

// The B rows of a state view as host tensors (CPU layout), read through the view's own pointers.
Mamba3State download_view(const cuda::Mamba3GpuState& v, const Mamba3Config& c, int64_t B) {
  const int64_t H = c.nheads(), S = c.num_angles(), P = c.headdim, N = c.d_state, R = c.rank();
  return {from_device_f32(v.angle, {B, H, S}), from_device_f32(v.ssm, {B, H, P, N}), from_device_f32(v.k, {B, R, H, N}),
          from_device_f32(v.v, {B, H, P})};
}

// Writes host rows (CPU layout) through a state view.
void upload_view(const Mamba3State& h, const cuda::Mamba3GpuState& v) {
  const Tensor* src[] = {&h.angle, &h.ssm, &h.k, &h.v};
  float* dst[] = {v.angle, v.ssm, v.k, v.v};
  for (int i = 0; i < 4; ++i)
    MAMBA3_CUDA_CHECK(cudaMemcpy(dst[i], src[i]->data<float>(), src[i]->nbytes(), cudaMemcpyHostToDevice));
}

// Bytes of one row (leading dimension) of t, and a pointer to row b.
size_t row_bytes(const Tensor& t) { return t.nbytes() / size_t(t.dim(0)); }
const char* row_ptr(const Tensor& t, int64_t b) { return static_cast<const char*>(t.raw()) + size_t(b) * row_bytes(t); }

// Whether row b of two tensors of one shape holds the same bits.
bool same_row(const Tensor& a, const Tensor& b, int64_t row) {
  return a.shape() == b.shape() && std::memcmp(row_ptr(a, row), row_ptr(b, row), row_bytes(a)) == 0;
}

void expect_same_state_row(const Mamba3State& got, const Mamba3State& want, int64_t row, const std::string& what) {
  EXPECT_TRUE(same_row(got.angle, want.angle, row)) << what << ": angle of row " << row;
  EXPECT_TRUE(same_row(got.ssm, want.ssm, row)) << what << ": ssm of row " << row;
  EXPECT_TRUE(same_row(got.k, want.k, row)) << what << ": k of row " << row;
  EXPECT_TRUE(same_row(got.v, want.v, row)) << what << ": v of row " << row;
}

// Copies row b of src into dst (same shapes).
void copy_state_row(Mamba3State& dst, const Mamba3State& src, int64_t b) {
  Tensor* d[] = {&dst.angle, &dst.ssm, &dst.k, &dst.v};
  const Tensor* s[] = {&src.angle, &src.ssm, &src.k, &src.v};
  for (int i = 0; i < 4; ++i)
    std::memcpy(static_cast<char*>(d[i]->raw()) + size_t(b) * row_bytes(*d[i]), row_ptr(*s[i], b), row_bytes(*s[i]));
}

// Runs the layer over (B, L, D) input x from a state view; returns the recurrent kernel's output o (B, L, d_inner)
// (f32 precision), poisoned before the call so that rows the kernel skips hold NaN.
Tensor layer_o(const cuda::GpuMamba3Layer& layer, const cuda::Context& ctx, const Tensor& x,
               const cuda::Mamba3GpuState& view) {
  const Mamba3Config& c = layer.config();
  const int64_t B = x.dim(0), L = x.dim(1), rows = B * L;
  cuda::DeviceBuffer xd = to_device_activation(x, Precision::F32);
  cuda::DeviceBuffer zx(layer.zx_bytes(rows)), o(layer.o_bytes(rows)), out(size_t(rows * c.d_model) * 4);
  poison(zx.raw(), zx.bytes());
  poison(o.raw(), o.bytes());
  layer.forward(ctx, xd.raw(), B, L, view, zx.as<float>(), o.raw(), out.as<float>());
  ctx.sync();
  return from_device_f32(o.raw(), {B, L, c.d_inner()});
}

// Every fused decode counter is back to 0 (the protocol's invariant between calls).
void expect_arrivals_zero(const cuda::GpuMamba3State& s, const std::string& what) {
  std::vector<int32_t> arrivals(size_t(s.batch * s.heads));
  MAMBA3_CUDA_CHECK(cudaMemcpy(arrivals.data(), s.rows_from(0).arrivals, arrivals.size() * sizeof(int32_t),
                               cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < arrivals.size(); ++i) ASSERT_EQ(arrivals[i], 0) << what << ": arrivals[" << i << "]";
}

// Where the B rows of the view lie in their state: `row0` rows in (the view rows_from(row0), the mask pointer offset
// by row0), and the ssm pointer moved by `ssm_shift` floats (off 16 bytes: the decode kernels do not apply, so decode
// runs in the prefill kernels of both paths).
struct MaskLayout {
  const char* name;
  int64_t row0, ssm_shift;
};

// A decode step with rows marked inactive (Mamba3GpuState::active) leaves those rows' state bitwise unchanged and
// computes the active rows bitwise as the same step without a mask; re-activated rows then continue as if the masked
// step had never happened for them. Prefill ignores the mask; a mask of ones equals no mask.
TEST_P(Mamba3GpuPaths, DecodeSkipsInactiveRows) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(19);
  const int64_t B = 5;
  const std::vector<int32_t> pattern = {1, 0, 1, 1, 0}, ones(B, 1), zeros(B, 0);
  const MaskLayout layouts[] = {{"rows 0..4", 0, 0}, {"view from row 1", 1, 0}, {"ssm off 16 bytes", 0, 1}};
  for (const RandomCase& rc : {kRandomCases[0], kRandomCases[1], kRandomCases[3], kRandomCases[4]}) {
    for (const MaskLayout& lay : layouts) {
      SCOPED_TRACE(std::string(rc.name) + ", " + lay.name);
      const Mamba3Config c = make_config(rc);
      TensorMap w = random_mixer_weights(c, rng);
      cuda::GpuMamba3Layer gpu(c, w, "", "random", nullptr, Precision::F32);
      gpu.set_path(path());
      // A runs with the mask; R, without, is the reference. The shifted ssm needs one spare row of room.
      const int64_t rows = lay.row0 + B + (lay.ssm_shift ? 1 : 0);
      cuda::GpuMamba3State A(c, rows), R(c, rows);
      auto view_of = [&](const cuda::GpuMamba3State& s) {
        cuda::Mamba3GpuState v = s.rows_from(lay.row0);
        v.ssm += lay.ssm_shift;
        return v;
      };
      const cuda::Mamba3GpuState vr = view_of(R);
      cuda::Mamba3GpuState va = view_of(A);
      // The mask covers every row of the state (rows before the view inactive); the view sees it from its row 0.
      cuda::DeviceBuffer mask(size_t(rows) * sizeof(int32_t));
      auto set_mask = [&](const std::vector<int32_t>& m) {
        std::vector<int32_t> all(size_t(rows), 0);
        std::copy(m.begin(), m.end(), all.begin() + lay.row0);
        mask.upload(all.data(), all.size() * sizeof(int32_t));
      };
      va.active = mask.as<int32_t>() + lay.row0;
      // Rows before the view (zeros), to check that nothing touches them.
      const Mamba3State outside = lay.row0 ? download_view(A.rows_from(0), c, lay.row0) : Mamba3State{};

      // Prefill runs every row of the call, even with all of them marked inactive.
      set_mask(zeros);
      const Tensor u = random_tensor(rng, {B, 6, c.d_model});
      const Tensor o_pre_a = layer_o(gpu, ctx, u, va), o_pre_r = layer_o(gpu, ctx, u, vr);
      const Mamba3State pre_a = download_view(va, c, B), pre_r = download_view(vr, c, B);
      for (int64_t b = 0; b < B; ++b) {
        EXPECT_TRUE(same_row(o_pre_a, o_pre_r, b)) << "prefill o of row " << b;
        expect_same_state_row(pre_a, pre_r, b, "prefill");
      }

      // Warm-up decode steps with every row marked active equal those without a mask.
      set_mask(ones);
      for (int t = 0; t < 3; ++t) {
        const Tensor x = random_tensor(rng, {B, 1, c.d_model});
        const Tensor oa = layer_o(gpu, ctx, x, va), orf = layer_o(gpu, ctx, x, vr);
        for (int64_t b = 0; b < B; ++b) EXPECT_TRUE(same_row(oa, orf, b)) << "warm-up step " << t << " o of row " << b;
      }
      const Mamba3State warm_a = download_view(va, c, B), warm_r = download_view(vr, c, B);
      for (int64_t b = 0; b < B; ++b) expect_same_state_row(warm_a, warm_r, b, "after warm-up");
      expect_arrivals_zero(A, "after warm-up");

      // The masked step: R (a copy of A) takes the same step on every row.
      MAMBA3_CUDA_CHECK(cudaMemcpy(R.buffer.raw(), A.buffer.raw(), A.buffer.bytes(), cudaMemcpyDeviceToDevice));
      set_mask(pattern);
      const Mamba3State before = download_view(va, c, B);
      const Tensor x1 = random_tensor(rng, {B, 1, c.d_model});
      const Tensor o1a = layer_o(gpu, ctx, x1, va), o1r = layer_o(gpu, ctx, x1, vr);
      const Mamba3State after_a = download_view(va, c, B), after_r = download_view(vr, c, B);
      for (int64_t b = 0; b < B; ++b) {
        if (pattern[size_t(b)]) {
          EXPECT_TRUE(same_row(o1a, o1r, b)) << "masked step: o of active row " << b;
          expect_same_state_row(after_a, after_r, b, "masked step, active row");
        } else {
          expect_same_state_row(after_a, before, b, "masked step, inactive row");
          // The unmasked step changes this row's state, so the check above can tell a skipped row from a stepped one.
          EXPECT_FALSE(same_row(after_r.ssm, before.ssm, b)) << "the reference step left row " << b << " unchanged";
        }
      }
      expect_arrivals_zero(A, "after the masked step");

      // Every row active again: the masked rows continue from their state before the masked step. The reference
      // holds R's stepped rows and the skipped rows' earlier state.
      Mamba3State skipped = after_r.clone();
      for (int64_t b = 0; b < B; ++b)
        if (!pattern[size_t(b)]) copy_state_row(skipped, before, b);
      upload_view(skipped, vr);
      set_mask(ones);
      const Tensor x2 = random_tensor(rng, {B, 1, c.d_model});
      const Tensor o2a = layer_o(gpu, ctx, x2, va), o2r = layer_o(gpu, ctx, x2, vr);
      const Mamba3State end_a = download_view(va, c, B), end_r = download_view(vr, c, B);
      for (int64_t b = 0; b < B; ++b) {
        EXPECT_TRUE(same_row(o2a, o2r, b)) << "step after re-activation: o of row " << b;
        expect_same_state_row(end_a, end_r, b, "step after re-activation");
      }
      expect_arrivals_zero(A, "after re-activation");

      if (lay.row0) {
        const Mamba3State outside_end = download_view(A.rows_from(0), c, lay.row0);
        for (int64_t b = 0; b < lay.row0; ++b) expect_same_state_row(outside_end, outside, b, "row outside the view");
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Kernels, Mamba3GpuPaths,
    ::testing::Values(PathCase{"Staged", Mamba3GpuPath::Staged, cuda::DecodeKernel::Head, 0, 2},
                      PathCase{"Fused", Mamba3GpuPath::Fused, cuda::DecodeKernel::Head, 0, 2},
                      PathCase{"Chunked", Mamba3GpuPath::Chunked, cuda::DecodeKernel::Head, 0, 2},
                      PathCase{"StagedStreamDecode", Mamba3GpuPath::Staged, cuda::DecodeKernel::Stream, 1, 2},
                      PathCase{"StagedStreamDecode3Stages", Mamba3GpuPath::Staged, cuda::DecodeKernel::Stream, 2, 3},
                      PathCase{"StagedHeadTcDecode", Mamba3GpuPath::Staged, cuda::DecodeKernel::Head, 0, 2, true}),
    path_name);

// Deferred state writes (GpuMamba3State with write_every 2 and 4; mamba3_decode_gpu.h): decode steps against the
// every-step writes on the same layer and inputs — outputs within 1e-5 each step (f32 rounding: the pending tokens'
// terms are summed in another order), some heads' states really left unwritten, every state within 1e-5 once
// settled (GpuMamba3Layer::settle), and a prefill continuing rows with pending tokens (forward settles first) within
// 1e-5. A row the slot mask skips keeps every byte (states, counts, ring). SISO defers on the FMA rows at N ≤ 128,
// MIMO R = 2 and 4 on the tensor-core rows (P = 64, N = 128; DecodeChoice::mimo_deferred_writes, set here); layers
// the kernel does not defer for (SISO N = 256, MIMO at other shapes, d_state 30 off the head kernel) settle before
// each call and track as well. The bf16-state
// mode defers too (within 2e-2 of its own every-step writes, which round the state to bf16 every step instead of every
// `every` steps).
TEST(Mamba3Gpu, DeferredStateWritesTrackEveryStepWrites) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {  // the process-wide choice as it was, however the test ends
    cuda::DecodeChoice saved = cuda::decode_choice();
    ~Restore() { cuda::set_decode_choice(saved); }
  } restore;
  cuda::DecodeChoice choice = restore.saved;
  choice.mimo_deferred_writes = true;  // off by default (measured slower); its expressions are tested here
  cuda::set_decode_choice(choice);
  cuda::Context ctx;
  std::mt19937 rng(43);
  const int64_t B = 3;
  const RandomCase tc_r2{"mimo r2 d_state 128 headdim 64", 128, 128, 64, 1, 2, true, false, false, false, 0.5};
  for (const RandomCase& rc : {kRandomCases[0], kRandomCases[1], kRandomCases[2], kRandomCases[6], kRandomCases[8],
                               kRandomCases[10], kRandomCases[4], tc_r2, kRandomCases[3]}) {
    for (int every : {2, 4}) {
      for (bool bf16 : {false, true}) {
        const Mamba3Config c = make_config(rc);
        cuda::GpuMamba3Layer gpu(c, random_mixer_weights(c, rng), "", "random", nullptr, Precision::F32);
        if (bf16 && !gpu.decodes_bf16_state()) continue;
        SCOPED_TRACE(std::string(rc.name) + " every " + std::to_string(every) + (bf16 ? " bf16 state" : ""));
        const bool defers = c.is_mimo ? c.headdim == 64 && c.d_state == 128 : c.d_state % 4 == 0 && c.d_state <= 128;
        ASSERT_EQ(gpu.defers_state_writes(), defers);
        cuda::GpuMamba3State ref(c, B, bf16), lazy(c, B, bf16, every);
        // f32: rounding only; bf16 state: the every-step writes round the state to bf16 every step, the deferred ones
        // every `every` steps, so the two differ by bf16 roundings of the state (≈ 4e-3 relative each).
        const double tol = bf16 ? 2e-2 : 1e-5;
        const Tensor u = random_tensor(rng, {B, 5, c.d_model});
        EXPECT_EQ(rel_l2(gpu_forward(gpu, ctx, u, lazy, Precision::F32), gpu_forward(gpu, ctx, u, ref, Precision::F32)),
                  0.0)
            << "prefill";
        auto step = [&](int t) {
          const Tensor x = random_tensor(rng, {B, 1, c.d_model});
          const Tensor y_ref = gpu_forward(gpu, ctx, x, ref, Precision::F32);
          const Tensor y = gpu_forward(gpu, ctx, x, lazy, Precision::F32);
          ASSERT_LE(rel_l2(y, y_ref), tol) << "decode step " << t;
        };
        for (int t = 0; t < 11; ++t) step(t);
        std::vector<int32_t> words(size_t(B * c.nheads()));
        MAMBA3_CUDA_CHECK(cudaMemcpy(words.data(), lazy.lazy_row(0), words.size() * 4, cudaMemcpyDeviceToHost));
        const int64_t pending = std::count_if(words.begin(), words.end(), [](int32_t w) { return (w & 0xff) != 0; });
        if (defers) {
          EXPECT_GT(pending, 0) << "no head has deferred its write";
          EXPECT_GT(rel_l2(download_state(lazy, c).ssm, download_state(ref, c).ssm), 1e-3)
              << "the unsettled states equal the written ones";
        } else {
          EXPECT_EQ(pending, 0) << "a layer that does not defer left tokens pending";
        }
        // Settled, then a masked step: row 1 keeps every byte.
        gpu.settle(ctx, lazy.rows_from(0), B);
        ctx.sync();  // the context's stream does not order the legacy stream's copies below
        MAMBA3_CUDA_CHECK(cudaMemcpy(words.data(), lazy.lazy_row(0), words.size() * 4, cudaMemcpyDeviceToHost));
        for (int32_t w : words) ASSERT_EQ(w & 0xff, 0) << "a count after settling";
        const Mamba3State settled = download_state(lazy, c), want = download_state(ref, c);
        expect_state_near(settled, want, tol, "settled");
        for (int t = 11; t < 14; ++t) step(t);  // tokens pending again
        const std::vector<int32_t> pattern = {1, 0, 1};
        cuda::DeviceBuffer mask(size_t(B) * sizeof(int32_t));
        mask.upload(pattern.data(), mask.bytes());
        std::vector<char> before(lazy.buffer.bytes()), after(lazy.buffer.bytes());
        lazy.buffer.download(before.data(), before.size());
        cuda::Mamba3GpuState masked = lazy.rows_from(0);
        masked.active = mask.as<int32_t>();
        layer_o(gpu, ctx, random_tensor(rng, {B, 1, c.d_model}), masked);
        lazy.buffer.download(after.data(), after.size());
        const auto row_same = [&](const void* at, size_t bytes) {
          const size_t off = static_cast<const char*>(at) - lazy.buffer.as<char>();
          return std::memcmp(before.data() + off, after.data() + off, bytes) == 0;
        };
        const cuda::Mamba3GpuState r1 = lazy.rows_from(1);
        const cuda::Mamba3StateSizes z(c);
        EXPECT_TRUE(row_same(lazy.ssm_row(1), lazy.ssm_row_bytes())) << "ssm of the skipped row";
        EXPECT_TRUE(row_same(r1.k, size_t(z.k) * 4) && row_same(r1.v, size_t(z.v) * 4) &&
                    row_same(r1.angle, size_t(z.angle) * 4))
            << "k, v or angle of the skipped row";
        EXPECT_TRUE(row_same(lazy.lazy_row(1), lazy.lazy_row_bytes()) &&
                    row_same(lazy.ring_row(1), lazy.ring_row_bytes()))
            << "counts or ring of the skipped row";
        // The reference takes the masked step too (layer_o skips its row 1 alike), then both continue by a prefill.
        lazy.buffer.upload(before.data(), before.size());
        cuda::Mamba3GpuState ref_masked = ref.rows_from(0);
        ref_masked.active = mask.as<int32_t>();
        const Tensor x = random_tensor(rng, {B, 1, c.d_model});
        const Tensor oa = layer_o(gpu, ctx, x, masked), orf = layer_o(gpu, ctx, x, ref_masked);
        for (int64_t b : {0, 2})
          EXPECT_LE(rel_l2(oa.slice(b, b + 1).clone(), orf.slice(b, b + 1).clone()), tol) << "row " << b;
        const Tensor more = random_tensor(rng, {B, 7, c.d_model});
        EXPECT_LE(
            rel_l2(gpu_forward(gpu, ctx, more, lazy, Precision::F32), gpu_forward(gpu, ctx, more, ref, Precision::F32)),
            tol)
            << "prefill continuing pending tokens";
        expect_state_near(download_state(lazy, c), download_state(ref, c), tol, "after the continuation");
      }
    }
  }
}

// The streaming decode kernel at a batch where its default grid walks several items per block (and the auto choice
// with a threshold of 1 item) against the head decode kernel with FMA rows: the same expressions, so outputs and
// states agree to rounding (1e-6) over 12 steps after a prefill, for SISO, MIMO R = 2, 3, 4 with output norm, groups 2
// and 3, and d_state 256; likewise the head kernel's MIMO rows on tensor cores (3×TF32, MAMBA3_HEAD_DECODE_TC) at
// P = 64, N = 128 for R = 2, 3, 4.
TEST(Mamba3Gpu, StreamDecodeMatchesHeadDecode) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(23);
  struct Restore {  // the process-wide choice as it was, however the test ends
    cuda::DecodeChoice saved = cuda::decode_choice();
    ~Restore() { cuda::set_decode_choice(saved); }
  } restore;
  const cuda::DecodeChoice saved = restore.saved;
  // MAMBA3_TEST_SANITIZER_SIZES (set for compute-sanitizer runs, which take ~100× longer): batch 9 and 3 steps, with
  // 2 blocks per head so that blocks still walk several sequences through their stages.
  const bool small = std::getenv("MAMBA3_TEST_SANITIZER_SIZES") != nullptr;
  const int64_t B = small ? 9 : 97;
  const int steps = small ? 3 : 12;
  // Ranks 2 and 3 at P = 64, N = 128 besides case 4 (R = 4): the shapes of the tensor-core rows.
  const RandomCase tc_r2{"mimo r2 d_state 128 headdim 64", 128, 128, 64, 1, 2, true, false, false, false, 0.5};
  const RandomCase tc_r3{"mimo r3 groups 2 outnorm d_state 128", 128, 128, 64, 2, 3, true, true, false, false, 1.0};
  struct Variant {
    cuda::DecodeKernel kernel;
    bool head_tensor_cores;
    const char* name;
  };
  const Variant variants[] = {{cuda::DecodeKernel::Stream, false, " (stream)"},
                              {cuda::DecodeKernel::Head, true, " (head, tensor-core rows)"},
                              {cuda::DecodeKernel::Auto, false, " (auto)"}};
  for (const RandomCase& rc : {kRandomCases[0], kRandomCases[1], kRandomCases[4], kRandomCases[8], tc_r2, tc_r3}) {
    for (const Variant& variant : variants) {
      const cuda::DecodeKernel other = variant.kernel;
      SCOPED_TRACE(std::string(rc.name) + variant.name);
      const Mamba3Config c = make_config(rc);
      TensorMap w = random_mixer_weights(c, rng);
      cuda::GpuMamba3Layer gpu(c, w, "", "random", nullptr, Precision::F32);
      gpu.set_path(Mamba3GpuPath::Staged);
      cuda::GpuMamba3State head(c, B), stream(c, B);
      const Tensor u = random_tensor(rng, {B, 5, c.d_model});
      gpu_forward(gpu, ctx, u, head, Precision::F32);
      gpu_forward(gpu, ctx, u, stream, Precision::F32);
      for (int t = 0; t < steps; ++t) {
        const Tensor x = random_tensor(rng, {B, 1, c.d_model});
        cuda::DecodeChoice choice = saved;
        if (small) choice.blocks_per_head = 2;
        choice.kernel = cuda::DecodeKernel::Head;
        choice.head_tensor_cores = false;
        cuda::set_decode_choice(choice);
        const Tensor y_head = gpu_forward(gpu, ctx, x, head, Precision::F32);
        choice.kernel = other;
        choice.head_tensor_cores = variant.head_tensor_cores;
        choice.stream_min_items = 1;
        cuda::set_decode_choice(choice);
        const Tensor y_stream = gpu_forward(gpu, ctx, x, stream, Precision::F32);
        ASSERT_LE(rel_l2(y_stream, y_head), 1e-6) << "step " << t;
      }
      expect_state_near(download_state(stream, c), download_state(head, c), 1e-6, "after decode");
    }
  }
}

// The bf16-state mode (GpuMamba3State with ssm_bf16) against the f32 state on the same layer and inputs: after a
// prefill the bf16 state is the f32 state rounded to bf16, bit for bit (prefill runs on an f32 copy); then 16
// decode steps — on the head kernel (FMA rows, and MIMO's tensor-core rows), or on the f32 kernels through the copy
// where the head kernel does not reach (d_state 30) — keep outputs within 2e-2 and states within 2e-2 (relative L2)
// of the f32 state's, and a row the slot mask skips keeps its bf16 bits. The errors are printed (docs/perf.md).
TEST(Mamba3Gpu, Bf16StateDecodeTracksF32State) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(31);
  struct Restore {
    cuda::DecodeChoice saved = cuda::decode_choice();
    ~Restore() { cuda::set_decode_choice(saved); }
  } restore;
  const int64_t B = 7;
  const int steps = 16;
  struct Case {
    RandomCase rc;
    bool tensor_cores;
  };
  const Case cases[] = {{kRandomCases[0], false}, {kRandomCases[4], false}, {kRandomCases[4], true},
                        {kRandomCases[3], false}, {kRandomCases[10], false}};
  for (const Case& cs : cases) {
    const RandomCase& rc = cs.rc;
    SCOPED_TRACE(std::string(rc.name) + (cs.tensor_cores ? " (tensor-core rows)" : ""));
    cuda::DecodeChoice choice = restore.saved;
    choice.kernel = cuda::DecodeKernel::Head;
    choice.head_tensor_cores = cs.tensor_cores;
    cuda::set_decode_choice(choice);
    const Mamba3Config c = make_config(rc);
    TensorMap w = random_mixer_weights(c, rng);
    cuda::GpuMamba3Layer gpu(c, w, "", "random", nullptr, Precision::F32);
    cuda::GpuMamba3State f32(c, B), b16(c, B, /*ssm_bf16=*/true);
    const Tensor u = random_tensor(rng, {B, 5, c.d_model});
    gpu_forward(gpu, ctx, u, f32, Precision::F32);
    gpu_forward(gpu, ctx, u, b16, Precision::F32);
    {
      const Mamba3State a = download_state(f32, c), b = download_state(b16, c);
      const float* x = a.ssm.data<float>();
      const float* y = b.ssm.data<float>();
      int64_t differ = 0;
      for (int64_t i = 0; i < a.ssm.numel(); ++i) {
        uint32_t bits;
        std::memcpy(&bits, x + i, 4);
        const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;  // nearest even
        uint32_t got;
        std::memcpy(&got, y + i, 4);
        differ += got != rounded;
      }
      EXPECT_EQ(differ, 0) << "bf16 state after prefill vs the f32 state rounded";
      EXPECT_EQ(rel_l2(b.k, a.k), 0.0) << "k state after prefill";
    }
    double worst_y = 0.0;
    for (int t = 0; t < steps; ++t) {
      const Tensor x = random_tensor(rng, {B, 1, c.d_model});
      const Tensor y_f32 = gpu_forward(gpu, ctx, x, f32, Precision::F32);
      const Tensor y_b16 = gpu_forward(gpu, ctx, x, b16, Precision::F32);
      const double e = rel_l2(y_b16, y_f32);
      worst_y = std::max(worst_y, e);
      ASSERT_LE(e, 2e-2) << "step " << t;
      ASSERT_GT(e, 0.0) << "step " << t << ": no rounding at all (is the state really bf16?)";
    }
    const Mamba3State a = download_state(f32, c), b = download_state(b16, c);
    const double e_ssm = rel_l2(b.ssm, a.ssm);
    EXPECT_LE(e_ssm, 2e-2) << "ssm after decode";
    std::printf("[ bf16 state ] %s%s: worst output rel. error over %d steps %.2e, ssm %.2e\n", rc.name,
                cs.tensor_cores ? " (tensor-core rows)" : "", steps, worst_y, e_ssm);
    // A skipped row keeps its bits (the conversion path rounds the unchanged copy back to the same bits).
    cuda::DeviceBuffer mask(size_t(B) * sizeof(int32_t));
    std::vector<int32_t> m(size_t(B), 1);
    m[2] = 0;
    mask.upload(m.data(), m.size() * sizeof(int32_t));
    cuda::Mamba3GpuState view = b16.rows_from(0);
    view.active = mask.as<int32_t>();
    const Mamba3State before = download_state(b16, c);
    const Tensor x = random_tensor(rng, {B, 1, c.d_model});
    {
      cuda::DeviceBuffer xd = to_device_activation(x, Precision::F32);
      cuda::DeviceBuffer zx(gpu.zx_bytes(B)), o(gpu.o_bytes(B)), out(size_t(B * c.d_model) * 4);
      gpu.forward(ctx, xd.raw(), B, 1, view, zx.as<float>(), o.raw(), out.as<float>());
      ctx.sync();
    }
    const Mamba3State after = download_state(b16, c);
    EXPECT_TRUE(same_row(after.ssm, before.ssm, 2)) << "the skipped row's ssm";
    EXPECT_FALSE(same_row(after.ssm, before.ssm, 1)) << "an active row's ssm did not change";
  }
}

// The chunked tensor-core prefill (bf16 layers) against the CPU f32 layer on awkward shapes: lengths around the
// chunk sizes (63 new tokens per chunk for R = 1, 31 for R = 2, 20 for R = 3, 15 for R = 4: L = 63/64/65 crosses the
// first chunk boundary, where the β term pairs with the previous chunk's last k and v), ranks 1–4, groups 2, output
// norm, headdim 16/24/64/128 (24: channels padded to the 16-wide tiles; 128 without norm: two channel slices per head),
// d_state 16/48/64/128/256; then decode steps continuing from the chunked prefill's state. Outputs and final states
// (ssm, k, v, angle) within the bf16 tolerance 2e-2 (relative L2).
struct ChunkCase {
  const char* name;
  int64_t d_model, d_state, headdim, ngroups, rank;
  bool outnorm;
};

const ChunkCase kChunkCases[] = {
    {"siso d_state 16 headdim 16 groups 2 outnorm", 64, 16, 16, 2, 1, true},
    {"siso d_state 128 headdim 64 groups 2 outnorm", 128, 128, 64, 2, 1, true},
    {"mimo r2 d_state 64 headdim 16 groups 2 outnorm", 64, 64, 16, 2, 2, true},
    {"mimo r4 d_state 128 headdim 64 groups 2 outnorm", 128, 128, 64, 2, 4, true},
    {"mimo r4 d_state 16 headdim 64 groups 2 outnorm", 128, 16, 64, 2, 4, true},
    {"mimo r3 d_state 48 headdim 24 groups 2 outnorm", 96, 48, 24, 2, 3, true},
    {"siso d_state 256 headdim 128 groups 2 (2 slices)", 128, 256, 128, 2, 1, false},
    {"mimo r2 d_state 64 headdim 128 (2 slices)", 128, 64, 128, 1, 2, false},
};

TEST(Mamba3Gpu, ChunkedBf16PrefillMatchesCpu) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(23);
  const int64_t B = 3;
  const double tol = 2e-2;
  for (const ChunkCase& cc : kChunkCases) {
    Mamba3Config c;
    c.d_model = cc.d_model;
    c.d_state = cc.d_state;
    c.headdim = cc.headdim;
    c.ngroups = cc.ngroups;
    c.is_mimo = cc.rank > 1;
    c.mimo_rank = cc.rank;
    c.is_outproj_norm = cc.outnorm;
    c.chunk_size = 16;
    c.validate("chunk case");
    for (int64_t L : {1, 2, 63, 64, 65, 300}) {
      SCOPED_TRACE(std::string(cc.name) + " L=" + std::to_string(L));
      TensorMap w = random_mixer_weights(c, rng);
      Mamba3Mixer cpu(c, w);
      cuda::GpuMamba3Layer gpu(c, w, "", "random", nullptr, Precision::BF16);
      gpu.set_path(Mamba3GpuPath::Chunked);
      const Tensor u = random_tensor(rng, {B, L, c.d_model});
      Mamba3State cpu_state = cpu.new_state(B);
      cuda::GpuMamba3State gpu_state(c, B);
      const Tensor ref = cpu.prefill(u, cpu_state);
      EXPECT_LE(rel_l2(gpu_forward(gpu, ctx, u, gpu_state, Precision::BF16), ref), tol) << "prefill";
      expect_state_near(download_state(gpu_state, c), cpu_state, tol, "after prefill");
      for (int64_t t = 0; t < 3; ++t) {
        const Tensor x = random_tensor(rng, {B, 1, c.d_model});
        const Tensor y_ref = cpu.prefill(x, cpu_state);
        EXPECT_LE(rel_l2(gpu_forward(gpu, ctx, x, gpu_state, Precision::BF16), y_ref), tol) << "decode step " << t;
      }
      expect_state_near(download_state(gpu_state, c), cpu_state, tol, "after decode");
      if (L == 300) {
        // In segments of 70 tokens (stage budget): segment starts (k_{−1} from stage slot 0, x_{−1} from the v state)
        // fall inside chunks of the whole-prefill layout.
        cuda::GpuMamba3Layer seg(c, w, "", "random", nullptr, Precision::BF16);
        seg.set_path(Mamba3GpuPath::Chunked);
        seg.set_prefill_stage_bytes(70 * size_t(B * (c.nheads() * c.num_angles() +
                                                     2 * c.rank() * c.nheads() * c.d_state + 4 * c.nheads()) * 4));
        Mamba3State seg_ref = cpu.new_state(B);
        const Tensor seg_out_ref = cpu.prefill(u, seg_ref);
        cuda::GpuMamba3State seg_state(c, B);
        EXPECT_LE(rel_l2(gpu_forward(seg, ctx, u, seg_state, Precision::BF16), seg_out_ref), tol) << "segmented";
        expect_state_near(download_state(seg_state, c), seg_ref, tol, "after segmented prefill");
      }
    }
  }
}

// The chunked kernel's shared-memory layout fits the sizes the tests above use and the 1.5B (two blocks per SM).
TEST(Mamba3Gpu, ChunkedLayoutFits) {
  EXPECT_LE(cuda::mamba3_chunk_gpu_shared_bytes(128, 64, 1, true), size_t(113) * 1024) << "1.5B SISO";
  EXPECT_LE(cuda::mamba3_chunk_gpu_shared_bytes(256, 128, 1, false), size_t(227) * 1024) << "N 256, P 128, 2 slices";
  EXPECT_LE(cuda::mamba3_chunk_gpu_shared_bytes(128, 128, 4, true), size_t(227) * 1024) << "P 128 with norm";
  EXPECT_GT(cuda::mamba3_chunk_gpu_shared_bytes(256, 128, 4, true), size_t(227) * 1024) << "falls back (see header)";
}

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
