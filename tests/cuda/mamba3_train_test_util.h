#pragma once
// Shared by the GPU tests of the Mamba-3 mixer's training pass (test_mamba3_train_gpu.cpp: against the CPU and the
// golden data; test_mamba3_train_paths_gpu.cpp: the fast paths against the ones they replace): the layer on the
// device, one forward + backward, the comparisons, the random layers and the case tables.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../model/random_mixer.h"
#include "cuda/train/mamba3_train_gpu.h"
#include "gpu_test_util.h"
#include "model/mamba3_mixer.h"
#include "ops/mamba3_reference_backward.h"
#include "support/test_support.h"

namespace mamba3::test {

using cuda::Precision;

// Both the GPU and the CPU f32 backward are within the golden README's 5e-5 (gradients) and 1e-5 (outputs) of the
// float64 truth, and they chunk differently (GPU T·R ≤ 64, CPU config.chunk_size), so their rounding errors are
// independent: the difference may reach the sum of the two bounds.
inline constexpr double kOutTolF32 = 2e-5, kGradTolF32 = 1e-4;
inline constexpr double kTolSisoVsGeneric = 1e-3;  // the SISO kernels against the generic ones (see the test)
inline constexpr double kTolChainVsPass = 2e-3;    // the forward state chain against products + scan (see the test)
// The fused core's output part against the output-stage kernel: Λ's state-read term from bf16 e^Λ ⊙ dy and H_c
// instead of f32 dy and bf16 Z (one bf16 rounding in another operand; measured ≤ 6.1e-4, in dt_bias).
inline constexpr double kTolCoreOutput = 5e-3;
inline constexpr double kTolDqk16 = 1e-2;          // bf16 dQ/dK against f32 (see BfloatDqDkTracksTheF32Pair)
inline constexpr double kTolAngleCodes = 1e-2;     // angle codes against f32 angles (AngleCodesTrackTheF32Angles)
inline constexpr double kTolEpilogueInCore = 1e-4;  // MIMO epilogue in its core: MimoEpilogueInCoreTracksTheKernel
inline constexpr double kTolZy16 = 2e-2;           // bf16 Z and y against f32 (see BfloatZyTracksTheF32Pair)
inline constexpr double kTolBF16 = 2e-2;                          // bf16 projections (the flash-attention-style bound)
inline constexpr double kGoldenOutTol = 1e-5, kGoldenGradTol = 5e-5;  // golden README, float32

// The layer's parameters and zeroed gradients on the device.
struct DeviceLayer {
  std::map<std::string, cuda::DeviceBuffer> w, g;
  std::map<std::string, Shape> shapes;

  explicit DeviceLayer(const Mamba3Mixer& m) {
    for (const auto& [name, shape] : mamba3_parameter_shapes(m.config())) {
      shapes[name] = shape;
      Tensor t = m.param(name).to(DType::F32);
      w[name] = cuda::DeviceBuffer(t.nbytes());
      w[name].upload(t.raw(), t.nbytes());
      g[name] = cuda::DeviceBuffer(t.nbytes());
    }
    zero_grads();
  }
  void zero_grads() {
    for (auto& [name, b] : g) MAMBA3_CUDA_CHECK(cudaMemset(b.raw(), 0, b.bytes()));
  }
  const float* wp(const char* name) const { return w.count(name) ? w.at(name).as<float>() : nullptr; }
  float* gp(const char* name) const { return g.count(name) ? g.at(name).as<float>() : nullptr; }
  cuda::Mamba3TrainWeights weights() const {
    return {wp("in_proj.weight"), wp("out_proj.weight"), wp("dt_bias"), wp("B_bias"),
            wp("C_bias"),         wp("mimo_x"),          wp("mimo_z"),  wp("mimo_o"),
            wp("D"),              wp("B_norm.weight"),   wp("C_norm.weight"), wp("norm.weight")};
  }
  cuda::Mamba3TrainGrads grads() const {
    return {gp("in_proj.weight"), gp("out_proj.weight"), gp("dt_bias"), gp("B_bias"),
            gp("C_bias"),         gp("mimo_x"),          gp("mimo_z"),  gp("mimo_o"),
            gp("D"),              gp("B_norm.weight"),   gp("C_norm.weight"), gp("norm.weight")};
  }
  TensorMap download_grads() const {
    TensorMap out;
    for (const auto& [name, b] : g) out[name] = from_device_f32(b.raw(), shapes.at(name));
    return out;
  }
};

struct GpuResult {
  Tensor out, du;
  TensorMap grads;
};

// Forward then backward on the GPU from freshly zeroed gradients; out and du are poisoned (NaN) first. tc: the chunk
// products on tensor cores (only in effect with Precision::BF16); parallel: the chunk-parallel schedule (else the
// sequential one); blocks_per_sm: the parallel chunk kernels' register variant (0 auto, 1 or 2 forced); batched:
// the batched-GEMM chunk path instead of the fused kernels (the three before are then ignored); all set explicitly,
// whatever MAMBA3_TRAIN_CHUNK / MAMBA3_TRAIN_SCAN / MAMBA3_TRAIN_CHUNK_BLOCKS / MAMBA3_TRAIN_CHUNK_PATH say.
// epilogue_heads: the batched epilogue's heads per block (0: auto or MAMBA3_TRAIN_EPILOGUE_HEADS). angle_codes: the
// bf16 mode's angle codes where they apply (false: f32 angles everywhere).
inline GpuResult run_gpu(const Mamba3Mixer& m, const Tensor& u, const Tensor& dout, Precision p, bool tc = false,
                         bool parallel = true, int blocks_per_sm = 0, bool batched = false, int epilogue_heads = 0,
                         bool angle_codes = true) {
  const Mamba3Config& c = m.config();
  const int64_t B = u.dim(0), L = u.dim(1);
  const size_t act_bytes = size_t(B * L * c.d_model) * sizeof(float);
  cuda::Context ctx;
  cuda::TrainGemm gemm(p);
  cuda::Mamba3TrainGpu train(c);
  train.set_chunk_tensor_cores(tc);
  train.set_chunk_scan_parallel(parallel);
  train.set_chunk_blocks_per_sm(blocks_per_sm);
  train.set_chunk_batched(batched);
  train.set_epilogue_heads(epilogue_heads);
  train.set_angle_codes(angle_codes);
  DeviceLayer layer(m);
  cuda::DeviceBuffer u_dev = to_device_activation(u, Precision::F32);
  cuda::DeviceBuffer dout_dev = to_device_activation(dout, Precision::F32);
  cuda::DeviceBuffer out{act_bytes}, du{act_bytes};
  poison(out.raw(), out.bytes());
  poison(du.raw(), du.bytes());
  train.forward(ctx, gemm, layer.weights(), B, L, u_dev.as<float>(), out.as<float>());
  train.backward(ctx, gemm, layer.weights(), layer.grads(), B, L, u_dev.as<float>(), dout_dev.as<float>(),
                 du.as<float>());
  ctx.sync();
  return {from_device_f32(out.raw(), {B, L, c.d_model}), from_device_f32(du.raw(), {B, L, c.d_model}),
          layer.download_grads()};
}

// Every value of the output and of du finite (call it under ASSERT_NO_FATAL_FAILURE to stop the test at the first).
inline void assert_finite(const GpuResult& r) {
  for (const Tensor* t : {&r.out, &r.du})
    for (int64_t i = 0; i < t->numel(); ++i) ASSERT_TRUE(std::isfinite(t->data<float>()[i]));
}

// Checks the output, du and every parameter gradient against their tolerances; worst/where: the largest error.
inline void compare(const GpuResult& got, const Tensor& out_ref, const Tensor& du_ref, const TensorMap& grads_ref,
             double out_tol, double grad_tol, double& worst, std::string& where) {
  worst = 0;
  auto check = [&](const Tensor& a, const Tensor& b, double tol, const std::string& name) {
    const double e = rel_l2(a, b);
    EXPECT_LE(e, tol) << name;
    if (!(e <= worst)) worst = e, where = name;  // NaN sticks
  };
  check(got.out, out_ref, out_tol, "out");
  check(got.du, du_ref, grad_tol, "grad.u");
  EXPECT_EQ(got.grads.size(), grads_ref.size());
  for (const auto& [name, t] : grads_ref) {
    auto it = got.grads.find(name);
    ASSERT_NE(it, got.grads.end()) << name;
    check(it->second, t, grad_tol, "grad." + name);
  }
}

// A random layer of config c and its inputs u, dout (batch, L, d_model), drawn in that order from one seeded stream.
struct RandomLayer {
  Mamba3Mixer mixer;
  Tensor u, dout;
};
inline RandomLayer random_layer(const Mamba3Config& c, int64_t batch, int64_t L, uint32_t seed) {
  std::mt19937 rng(seed);
  Mamba3Mixer mixer(c, random_mixer_weights(c, rng));
  Tensor u = random_tensor(rng, {batch, L, c.d_model});
  Tensor dout = random_tensor(rng, {batch, L, c.d_model});
  return {std::move(mixer), std::move(u), std::move(dout)};
}

struct LayerCase {
  const char* name;
  Mamba3Config c;
};

inline Mamba3Config small(bool mimo, int64_t rank) {
  Mamba3Config c;
  c.d_model = 16, c.d_state = 16, c.headdim = 8, c.expand = 2, c.chunk_size = 16;
  c.is_mimo = mimo, c.mimo_rank = rank;
  return c;
}

inline std::vector<LayerCase> layer_cases() {
  std::vector<LayerCase> v;
  v.push_back({"siso", small(false, 1)});
  Mamba3Config c = small(false, 1);
  c.ngroups = 2, c.is_outproj_norm = true;
  v.push_back({"siso ngroups 2 outnorm", c});
  v.push_back({"mimo R=2", small(true, 2)});
  c = small(true, 3);
  c.ngroups = 2, c.is_outproj_norm = true;
  v.push_back({"mimo R=3 ngroups 2 outnorm", c});
  c = small(true, 4);
  c.rope_fraction = 1.0;
  v.push_back({"mimo R=4 rope 1.0", c});
  c = small(false, 1);
  c.rope_fraction = 1.0, c.A_floor = 1.0;  // the clamp binds on about half of the (token, head)s
  v.push_back({"siso rope 1.0 A_floor clamp", c});
  c = small(false, 1);
  c.a_activation = AActivation::Softplus;
  v.push_back({"siso softplus A", c});
  c = small(false, 1);
  c.euler = true;
  v.push_back({"siso euler", c});
  c = small(false, 1);
  c.no_rotary = true;
  v.push_back({"siso no_rotary", c});
  c = small(true, 2);
  c.euler = true, c.no_rotary = true, c.is_outproj_norm = true;
  v.push_back({"mimo R=2 euler no_rotary outnorm", c});
  c = small(false, 1);
  c.d_model = 32, c.d_state = 64, c.headdim = 32;  // wider tiles (P·N = 2048)
  v.push_back({"siso d_state 64 headdim 32", c});
  return v;
}

// with_out false: the gradients only (the forward's output rounds by its own chunking).
inline bool bit_identical(const GpuResult& a, const GpuResult& b, bool with_out = true) {
  auto same = [](const Tensor& x, const Tensor& y) {
    return x.nbytes() == y.nbytes() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
  };
  if ((with_out && !same(a.out, b.out)) || !same(a.du, b.du) || a.grads.size() != b.grads.size()) return false;
  for (const auto& [name, t] : a.grads)
    if (!b.grads.count(name) || !same(t, b.grads.at(name))) return false;
  return true;
}

// Layers in the chunk cores' shapes (N ∈ {32, 64, 128}, P ∈ {32, 64}): SISO N 128 P 64 (the 125M tiles), N 64 P 32
// with two groups and the output norm, N 32 P 32 with three heads; with_mimo: also MIMO R 4 N 64 P 32 (three heads)
// and R 2 N 128 P 64.
inline std::vector<LayerCase> core_shape_cases(bool with_mimo) {
  std::vector<LayerCase> cases;
  Mamba3Config c = small(false, 1);
  c.d_model = 128, c.d_state = 128, c.headdim = 64;
  cases.push_back({"siso N 128 P 64 (4 heads)", c});
  c = small(false, 1);
  c.d_model = 64, c.d_state = 64, c.headdim = 32, c.ngroups = 2, c.is_outproj_norm = true;
  cases.push_back({"siso N 64 P 32 ngroups 2 outnorm", c});
  c = small(false, 1);
  c.d_model = 48, c.d_state = 32, c.headdim = 32;  // 3 heads
  cases.push_back({"siso N 32 P 32 (3 heads)", c});
  if (with_mimo) {
    c = small(true, 4);
    c.d_model = 48, c.d_state = 64, c.headdim = 32;  // 3 heads
    cases.push_back({"mimo R=4 N 64 P 32 (3 heads)", c});
    c = small(true, 2);
    c.d_model = 64, c.d_state = 128, c.headdim = 64, c.is_outproj_norm = true;
    cases.push_back({"mimo R=2 N 128 P 64 outnorm", c});
  }
  return cases;
}

// The layer cases plus the 125M model's tiles (N 128, P 64: the chunk length drops below 64 rows to fit the reverse
// kernel's shared memory) and a wide MIMO one.
inline std::vector<LayerCase> tensor_core_cases() {
  std::vector<LayerCase> v = layer_cases();
  Mamba3Config c = small(false, 1);
  c.d_model = 64, c.d_state = 128, c.headdim = 64;
  v.push_back({"siso d_state 128 headdim 64", c});
  c = small(true, 4);
  c.d_model = 32, c.d_state = 64, c.headdim = 16, c.ngroups = 2, c.is_outproj_norm = true;
  v.push_back({"mimo R=4 d_state 64 ngroups 2 outnorm", c});
  return v;
}

// One layer's forward and backward in the bf16 mode on the batched path with the chunk cores, its buffers made once:
// for the tests that compare two switches of one Mamba3TrainGpu on the same layer and inputs.
struct CoreLayerStep {
  int64_t B, L, D;
  cuda::Context ctx;
  cuda::TrainGemm gemm{Precision::BF16};
  cuda::Mamba3TrainGpu train;
  DeviceLayer layer;
  cuda::DeviceBuffer ud, dd, out, du;
  cuda::Mamba3TrainActivations kept;
  // out_proj's bf16 weight mirror, where a test sets one (the trainer's parameter store keeps one); the products then
  // read it instead of rounding the weight (the same values).
  const uint16_t* out_proj16 = nullptr;

  CoreLayerStep(const Mamba3Mixer& m, const Tensor& u, const Tensor& dout)
      : B(u.dim(0)), L(u.dim(1)), D(m.config().d_model), train(m.config()), layer(m),
        ud(to_device_activation(u, Precision::F32)), dd(to_device_activation(dout, Precision::F32)), out(ud.bytes()),
        du(ud.bytes()) {
    train.set_chunk_batched(true);
    train.set_chunk_cores(true);
  }
  // Zeroed gradients, out and du poisoned, then the forward and the backward (keep: the backward reads the forward's
  // activations kept in `kept`); between, if given, runs after the forward (a switch for the backward alone).
  GpuResult run(bool keep = false, const std::function<void()>& between = {}) {
    layer.zero_grads();
    poison(du.raw(), du.bytes());
    poison(out.raw(), out.bytes());
    cuda::Mamba3TrainWeights w = layer.weights();
    w.out_proj16 = out_proj16;
    train.forward(ctx, gemm, w, B, L, ud.as<float>(), out.as<float>(), keep ? &kept : nullptr);
    if (between) between();
    train.backward(ctx, gemm, w, layer.grads(), B, L, ud.as<float>(), dd.as<float>(), du.as<float>(),
                   keep ? &kept : nullptr);
    ctx.sync();
    return GpuResult{from_device_f32(out.raw(), {B, L, D}), from_device_f32(du.raw(), {B, L, D}),
                     layer.download_grads()};
  }
};

}  // namespace mamba3::test
