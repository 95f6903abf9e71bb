// The Mamba-3 mixer's GPU training forward and backward (Mamba3TrainGpu) against the CPU: the forward output against
// the CPU mixer's prefill and every gradient (du and each parameter) against the CPU's f32 chunked backward
// (mamba3_mixer_backward) on random layers of awkward shapes (batch 3, L = 1/63/65/300, MIMO ranks 2–4, groups 2,
// output norm, both A activations, the A_floor clamp, the euler and no_rotary ablations); every golden mixer case's
// grad.* tensors in the exact f32 mode; bf16 mixed precision, with the chunk products in f32 and on tensor cores
// (set_chunk_tensor_cores); the chunk-parallel schedule against the sequential one (set_chunk_scan_parallel: per-token
// results in f32 within 1e-6 (bit-identical unless FMA contraction differs), reordered parameter sums within 1e-5);
// the parallel schedule's two-block (__launch_bounds__(256, 2)) kernel variants bit-identical to the plain ones
// (set_chunk_blocks_per_sm); determinism and accumulation in both schedules. The fast paths against the ones they
// replace: test_mamba3_train_paths_gpu.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <tuple>

#include "../model/mixer_case.h"
#include "../model/random_mixer.h"
#include "cuda/train/mamba3_train_gpu.h"
#include "cuda/train/mamba3_train_kernels.h"
#include "gpu_test_util.h"
#include "mamba3_train_test_util.h"
#include "model/mamba3_mixer_backward.h"
#include "ops/mamba3_reference_backward.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

// (The device layer, run_gpu, compare, the tolerances, the random layers and the case tables: mamba3_train_test_util.h.)

TEST(Mamba3TrainGpu, GoldenCasesF32) {
  MAMBA3_REQUIRE_GPU();
  auto cases = golden_cases("mixer_");
  std::erase_if(cases, [](const auto& p) { return p.extension() != ".safetensors"; });
  ASSERT_FALSE(cases.empty()) << "no mixer_*.safetensors in " << golden_dir();
  for (const auto& file : cases) {
    SCOPED_TRACE(file.string());
    const std::string path_name = file.filename().string();
    auto f = SafetensorsFile::open(file.string());
    Mamba3Mixer mixer(golden_mixer_config(f), f.tensors(), "", file.string());
    for (const char* path : {"batched", "parallel", "sequential"}) {
      SCOPED_TRACE(path);
      const bool batched = std::string(path) == "batched", parallel = std::string(path) != "sequential";
      const GpuResult r = run_gpu(mixer, f.get("u").to(DType::F32), f.get("dout").to(DType::F32), Precision::F32,
                                  false, parallel, 0, batched);
      TensorMap ref;
      for (const auto& [name, t] : f.tensors())
        if (name.starts_with("grad.") && name != "grad.u") ref[name.substr(5)] = t;
      std::string where;
      double worst = 0;
      compare(r, f.get("prefill_out_f64"), f.get("grad.u"), ref, kGoldenOutTol, kGoldenGradTol, worst, where);
      std::printf("  %-40s %-10s worst rel L2 vs golden %.2e (%s)\n", path_name.c_str(), path, worst,
                  where.c_str());
    }
  }
}

void run_against_cpu(const LayerCase& lc, int64_t L, Precision p, double out_tol, double grad_tol,
                     bool batched = false) {
  // SISO with the output norm at L = 1: y = (γ·q·k + D)·x, and the norm erases that scalar, so the gradients of
  // everything feeding it (B, C, their biases and norms, D, dt_bias) are rounding noise on both sides.
  if (L == 1 && !lc.c.is_mimo && lc.c.is_outproj_norm) return;
  SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + " " + cuda::precision_name(p) +
               (batched ? " batched" : " fused"));
  const Mamba3Config& c = lc.c;
  const int64_t batch = 3;
  auto [mixer, u, dout] = random_layer(c, batch, L, uint32_t(300 + L));
  Mamba3State state = mixer.new_state(batch);
  const Tensor out_ref = mixer.prefill(u, state);
  const Mamba3MixerGradients ref = mamba3_mixer_backward(mixer, u, dout);
  const GpuResult r = run_gpu(mixer, u, dout, p, false, true, 0, batched);
  std::string where;
  double worst = 0;
  compare(r, out_ref, ref.u, ref.params, out_tol, grad_tol, worst, where);
  std::printf("  %-34s L=%-3lld %s %-7s worst rel L2 vs CPU %.2e (%s)\n", lc.name, (long long)L,
              cuda::precision_name(p), batched ? "batched" : "fused", worst, where.c_str());
}

TEST(Mamba3TrainGpu, MatchesCpuF32OnAwkwardShapes) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : layer_cases())
    for (int64_t L : {1, 63, 65, 300}) run_against_cpu(lc, L, Precision::F32, kOutTolF32, kGradTolF32);
}

TEST(Mamba3TrainGpu, MatchesCpuBF16) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : layer_cases())
    // Not L = 1 (the exact mode covers it): with three tokens the per-parameter sums do not average the bf16
    // rounding of the products out (H200: up to 2.8e-2 on C_norm and D at L = 1, ≤ 9e-3 at L = 65).
    for (int64_t L : {65, 300}) run_against_cpu(lc, L, Precision::BF16, kTolBF16, kTolBF16);
}

// Two backward calls give bit-identical gradients; a second call into the same destinations adds (≈ 2×).
void check_deterministic_and_accumulating(Precision p, bool tc, bool parallel, bool batched = false) {
  for (const LayerCase& lc : layer_cases()) {
    SCOPED_TRACE(lc.name);
    const Mamba3Config& c = lc.c;
    const int64_t B = 3, L = 130;
    auto [mixer, u, dout] = random_layer(c, B, L, 7);
    cuda::Context ctx;
    cuda::TrainGemm gemm(p);
    cuda::Mamba3TrainGpu train(c);
    train.set_chunk_tensor_cores(tc);
    train.set_chunk_scan_parallel(parallel);
    train.set_chunk_batched(batched);
    DeviceLayer layer(mixer);
    cuda::DeviceBuffer ud = to_device_activation(u, Precision::F32), dd = to_device_activation(dout, Precision::F32);
    cuda::DeviceBuffer du(ud.bytes());
    auto backward = [&] {
      poison(du.raw(), du.bytes());
      train.backward(ctx, gemm, layer.weights(), layer.grads(), B, L, ud.as<float>(), dd.as<float>(), du.as<float>());
      ctx.sync();
      return std::make_pair(from_device_f32(du.raw(), {B, L, c.d_model}), layer.download_grads());
    };
    const auto [du1, g1] = backward();
    layer.zero_grads();
    const auto [du2, g2] = backward();
    EXPECT_EQ(std::memcmp(du1.raw(), du2.raw(), du1.nbytes()), 0) << "du";
    for (const auto& [name, t] : g1)
      EXPECT_EQ(std::memcmp(t.raw(), g2.at(name).raw(), t.nbytes()), 0) << "grad." << name << " not bit-identical";
    const auto [du3, g3] = backward();  // accumulates onto g2
    for (const auto& [name, t] : g1) {
      Tensor twice = t.to(DType::F32);
      for (int64_t i = 0; i < twice.numel(); ++i) twice.data<float>()[i] *= 2.0f;
      EXPECT_LE(rel_l2(g3.at(name), twice), 1e-6) << "grad." << name << " not accumulated";
    }
  }
}

TEST(Mamba3TrainGpu, DeterministicAndAccumulating) {
  MAMBA3_REQUIRE_GPU();
  check_deterministic_and_accumulating(Precision::F32, false, true);
}

TEST(Mamba3TrainGpu, BatchedChunksDeterministicAndAccumulating) {
  MAMBA3_REQUIRE_GPU();
  check_deterministic_and_accumulating(Precision::F32, false, true, true);
  check_deterministic_and_accumulating(Precision::BF16, false, true, true);
}

TEST(Mamba3TrainGpu, SequentialScanDeterministicAndAccumulating) {
  MAMBA3_REQUIRE_GPU();
  check_deterministic_and_accumulating(Precision::F32, false, false);
}

TEST(Mamba3TrainGpu, TensorCoreChunksDeterministicAndAccumulating) {
  MAMBA3_REQUIRE_GPU();
  check_deterministic_and_accumulating(Precision::BF16, true, true);
  check_deterministic_and_accumulating(Precision::BF16, true, false);
}

// bf16 mode with the chunk products on tensor cores: every gradient within the bf16 tolerance of the bf16 mode's f32
// chunk products and (L ≥ 63; see MatchesCpuBF16 for L = 1) of the CPU's f32 backward; the switch takes effect (the
// results differ from the f32 chunk path's) and is ignored in the exact f32 mode (bit-identical there).
TEST(Mamba3TrainGpu, TensorCoreChunksBF16) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : tensor_core_cases())
    for (int64_t L : {1, 63, 65, 300}) {
      const Mamba3Config& c = lc.c;
      if (L == 1 && !c.is_mimo && c.is_outproj_norm) continue;  // rounding noise only (see run_against_cpu)
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const int64_t batch = L == 300 ? 2 : 3;
      auto [mixer, u, dout] = random_layer(c, batch, L, uint32_t(500 + L));
      const GpuResult tc = run_gpu(mixer, u, dout, Precision::BF16, true);
      const GpuResult plain = run_gpu(mixer, u, dout, Precision::BF16, false);
      EXPECT_FALSE(bit_identical(tc, plain)) << "the tensor-core switch had no effect";
      std::string where;
      double worst_plain = 0, worst_cpu = 0;
      compare(tc, plain.out, plain.du, plain.grads, kTolBF16, kTolBF16, worst_plain, where);
      std::printf("  %-38s L=%-3lld tc vs f32 chunks %.2e (%s)", lc.name, (long long)L, worst_plain, where.c_str());
      if (L >= 63) {
        Mamba3State state = mixer.new_state(batch);
        const Tensor out_ref = mixer.prefill(u, state);
        const Mamba3MixerGradients ref = mamba3_mixer_backward(mixer, u, dout);
        compare(tc, out_ref, ref.u, ref.params, kTolBF16, kTolBF16, worst_cpu, where);
        std::printf(", vs CPU f32 %.2e (%s)", worst_cpu, where.c_str());
      }
      std::printf("\n");
      if (L == 65) {  // the f32 mode ignores the switch
        const GpuResult a = run_gpu(mixer, u, dout, Precision::F32, true);
        const GpuResult b = run_gpu(mixer, u, dout, Precision::F32, false);
        EXPECT_TRUE(bit_identical(a, b)) << "the f32 mode must keep the exact chunk products";
      }
    }
}

// The backward from a kept forward (Mamba3TrainActivations) skips the recomputation of the same values with the same
// kernels, so its gradients are bit-identical to the recomputing backward's; the kept set is consumed (a second
// backward with it recomputes, again bit-identical); a kept set of another shape is not used.
TEST(Mamba3TrainGpu, KeptActivationsGiveTheSameGradients) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : tensor_core_cases())
    for (const Precision p : {Precision::F32, Precision::BF16}) {
      SCOPED_TRACE(std::string(lc.name) + " " + cuda::precision_name(p));
      const Mamba3Config& c = lc.c;
      const int64_t B = 2, L = 130;
      auto [mixer, u, dout] = random_layer(c, B, L, 11);
      cuda::Context ctx;
      cuda::TrainGemm gemm(p);
      cuda::Mamba3TrainGpu train(c);
      train.set_chunk_batched(true);
      DeviceLayer layer(mixer);
      cuda::DeviceBuffer ud = to_device_activation(u, Precision::F32), dd = to_device_activation(dout, Precision::F32);
      cuda::DeviceBuffer out(ud.bytes()), du(ud.bytes());
      cuda::Mamba3TrainActivations kept;
      auto step = [&](bool keep_fwd, bool use_kept) {
        layer.zero_grads();
        poison(du.raw(), du.bytes());
        train.forward(ctx, gemm, layer.weights(), B, L, ud.as<float>(), out.as<float>(), keep_fwd ? &kept : nullptr);
        train.backward(ctx, gemm, layer.weights(), layer.grads(), B, L, ud.as<float>(), dd.as<float>(), du.as<float>(),
                       use_kept ? &kept : nullptr);
        ctx.sync();
        return std::make_pair(from_device_f32(du.raw(), {B, L, c.d_model}), layer.download_grads());
      };
      const auto [du_ref, g_ref] = step(false, false);
      const auto [du_kept, g_kept] = step(true, true);
      EXPECT_TRUE(kept.valid == false) << "a backward consumes the kept set";
      EXPECT_EQ(std::memcmp(du_ref.raw(), du_kept.raw(), du_ref.nbytes()), 0) << "du";
      for (const auto& [name, t] : g_ref)
        EXPECT_EQ(std::memcmp(t.raw(), g_kept.at(name).raw(), t.nbytes()), 0) << "grad." << name;
      // Consumed: this backward recomputes into the set (the forward did not refill it).
      const auto [du_again, g_again] = step(false, true);
      EXPECT_EQ(std::memcmp(du_ref.raw(), du_again.raw(), du_ref.nbytes()), 0) << "du after consumption";
      EXPECT_GT(train.activation_bytes(B, L, p), 0);
      EXPECT_LE(int64_t(kept.bytes()), train.activation_bytes(B, L, p) + 4096) << "activation_bytes undercounts";
      EXPECT_LE(train.activation_bytes(B, L, p), train.activation_bytes(B, L)) << "F32 is the upper bound";
    }
}

// The batched epilogue with every heads-per-block choice (each divisor of a B/C group's heads: 1 is one head per
// block, the others sum their heads' B/C gradients in shared memory) against the CPU's f32 backward, exact mode, L =
// 130 (two chunks and a partial one), batch 2; a choice that does not divide the group's heads is refused.
TEST(Mamba3TrainGpu, EpilogueHeadsPerBlockMatchCpu) {
  MAMBA3_REQUIRE_GPU();
  int grouped_cases = 0;
  for (const LayerCase& lc : tensor_core_cases()) {
    const Mamba3Config& c = lc.c;
    const int per_group = int(c.nheads() / c.ngroups);
    const int64_t B = 2, L = 130;
    auto [mixer, u, dout] = random_layer(c, B, L, 13);
    Mamba3State state = mixer.new_state(B);
    const Tensor out_ref = mixer.prefill(u, state);
    const Mamba3MixerGradients ref = mamba3_mixer_backward(mixer, u, dout);
    for (int hb = 1; hb <= per_group; ++hb) {
      if (per_group % hb) continue;
      grouped_cases += hb > 1;
      SCOPED_TRACE(std::string(lc.name) + " heads per block " + std::to_string(hb));
      const GpuResult r = run_gpu(mixer, u, dout, Precision::F32, false, true, 0, true, hb);
      double worst = 0;
      std::string where;
      compare(r, out_ref, ref.u, ref.params, kOutTolF32, kGradTolF32, worst, where);
    }
    cuda::Mamba3TrainGpu train(c);
    train.set_epilogue_heads(per_group + 1);
    EXPECT_THROW(train.epilogue_heads(), Error) << lc.name;
  }
  EXPECT_GT(grouped_cases, 0) << "no case has several heads per B/C group";
}

// The fused chunk cores (one tensor-core kernel per chunk for the forward's S, mask, Z, WV and one for the
// backward's dW, coef, dV, dQ, dK's first term and G) against the batched products with the mask and coef kernels,
// bf16 mode, on the shapes they take (64 rows; N 32/64/128, P 32/64; SISO — whose forward core also runs the output
// stage, with and without the output norm, two B/C groups included — and MIMO R = 2 and 4, odd head counts, a partial last chunk, batch > 1):
// within 1e-2 of the products (bf16 rounding of W and dS in another order) and within
// the bf16 tolerance of the CPU's f32 backward; they ran (the results are not the products' bits); a kept forward of
// the cores is not reused by a backward on the products (which recomputes: the products' bits).
TEST(Mamba3TrainGpu, ChunkCoresMatchProductsAndCpu) {
  MAMBA3_REQUIRE_GPU();
  std::vector<LayerCase> cases;
  // SISO with 4 heads: in_proj rows of a multiple of 4 floats, so the build takes its SISO instance (vector loads).
  Mamba3Config c = small(false, 1);
  c.d_model = 128, c.d_state = 128, c.headdim = 64;
  cases.push_back({"siso N 128 P 64 (4 heads)", c});
  c = small(false, 1);
  c.d_model = 48, c.d_state = 32, c.headdim = 32, c.is_outproj_norm = true;  // 3 heads
  cases.push_back({"siso N 32 P 32 (3 heads) outnorm", c});
  c = small(false, 1);
  c.d_model = 64, c.d_state = 64, c.headdim = 32, c.ngroups = 2;  // 4 heads, 2 per B/C group
  cases.push_back({"siso N 64 P 32 ngroups 2", c});
  c = small(true, 4);
  c.d_model = 32, c.d_state = 64, c.headdim = 32, c.ngroups = 2, c.is_outproj_norm = true;
  cases.push_back({"mimo R=4 N 64 P 32 ngroups 2 outnorm", c});
  c = small(true, 2);
  c.d_model = 64, c.d_state = 64, c.headdim = 64;
  cases.push_back({"mimo R=2 N 64 P 64", c});
  for (const LayerCase& lc : cases)
    for (const int64_t L : {65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const Mamba3Config& cfg = lc.c;
      const int64_t B = 2;
      auto [mixer, u, dout] = random_layer(cfg, B, L, uint32_t(700 + L));
      cuda::Context ctx;
      cuda::TrainGemm gemm(Precision::BF16);
      cuda::Mamba3TrainGpu train(cfg);
      train.set_chunk_batched(true);
      DeviceLayer layer(mixer);
      cuda::DeviceBuffer ud = to_device_activation(u, Precision::F32), dd = to_device_activation(dout, Precision::F32);
      cuda::DeviceBuffer out(ud.bytes()), du(ud.bytes());
      cuda::Mamba3TrainActivations kept;
      auto run = [&](bool core, bool core_backward) {
        train.set_chunk_cores(core);
        layer.zero_grads();
        poison(du.raw(), du.bytes());
        poison(out.raw(), out.bytes());
        train.forward(ctx, gemm, layer.weights(), B, L, ud.as<float>(), out.as<float>(), &kept);
        train.set_chunk_cores(core_backward);
        train.backward(ctx, gemm, layer.weights(), layer.grads(), B, L, ud.as<float>(), dd.as<float>(),
                       du.as<float>(), &kept);
        ctx.sync();
        return GpuResult{from_device_f32(out.raw(), {B, L, cfg.d_model}), from_device_f32(du.raw(), {B, L, cfg.d_model}),
                         layer.download_grads()};
      };
      const GpuResult core = run(true, true), products = run(false, false), mixed = run(true, false);
      EXPECT_FALSE(bit_identical(core, products)) << "the chunk cores did not run";
      EXPECT_TRUE(bit_identical(mixed, products, false)) << "a kept forward of the cores reused by the products";
      double worst = 0;
      std::string where;
      compare(core, products.out, products.du, products.grads, 1e-2, 1e-2, worst, where);
      std::printf("  %-40s L=%-3lld core vs products %.2e (%s)", lc.name, (long long)L, worst, where.c_str());
      Mamba3State state = mixer.new_state(B);
      const Tensor out_ref = mixer.prefill(u, state);
      const Mamba3MixerGradients ref = mamba3_mixer_backward(mixer, u, dout);
      compare(core, out_ref, ref.u, ref.params, kTolBF16, kTolBF16, worst, where);
      std::printf(", vs CPU f32 %.2e (%s)\n", worst, where.c_str());
    }
}

// The batched-GEMM chunk path (the default) against the CPU's f32 backward on every layer case and the 125M model's
// tiles, L = 1 / 63 / 65 / 300 (one chunk, partial last chunks, several chunks): f32 mode within the f32 tolerance;
// bf16 mode (bf16 chunk operands and products, bf16 projections) within the bf16 tolerance (L ≥ 65, as
// MatchesCpuBF16).
TEST(Mamba3TrainGpu, BatchedChunksMatchCpu) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : tensor_core_cases()) {
    for (int64_t L : {1, 63, 65, 300}) run_against_cpu(lc, L, Precision::F32, kOutTolF32, kGradTolF32, true);
    for (int64_t L : {65, 300}) run_against_cpu(lc, L, Precision::BF16, kTolBF16, kTolBF16, true);
  }
}

// The chunk-parallel schedule against the sequential one. f32: the scan adds the sequential recurrence's terms in its
// order, so out, du and every gradient built from per-token values (in_proj, out_proj, dt_bias, B/C norms) agree to
// f32 rounding (bit-identical unless the compiler contracts differently); the parameters summed over tokens inside the
// chunk kernels (D, B/C biases, mimo_*, norm) are summed per chunk then over chunks, a different order (within 1e-5).
// bf16 with tensor-core chunks: the states round differently (the sequential kernels accumulate the mma onto the
// scaled state), within the bf16 tolerance.
TEST(Mamba3TrainGpu, ChunkParallelScanMatchesSequential) {
  MAMBA3_REQUIRE_GPU();
  const std::set<std::string> reordered = {"D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "norm.weight"};
  for (const LayerCase& lc : tensor_core_cases())
    for (int64_t L : {1, 63, 65, 300}) {
      const Mamba3Config& c = lc.c;
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const int64_t batch = L == 300 ? 2 : 3;
      auto [mixer, u, dout] = random_layer(c, batch, L, uint32_t(700 + L));
      const GpuResult par = run_gpu(mixer, u, dout, Precision::F32, false, true);
      const GpuResult seq = run_gpu(mixer, u, dout, Precision::F32, false, false);
      // Per-token results: the same terms in the same order, so equal up to the compiler's FMA contraction, which
      // may differ between the two kernels' instruction sequences (1e-6: f32 rounding, far below any logic error);
      // whether they came out bit-identical is printed.
      auto same = [](const Tensor& x, const Tensor& y) {
        return x.nbytes() == y.nbytes() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
      };
      bool identical = same(par.out, seq.out) && same(par.du, seq.du);
      EXPECT_LE(rel_l2(par.out, seq.out), 1e-6) << "out";
      EXPECT_LE(rel_l2(par.du, seq.du), 1e-6) << "grad.u";
      double worst = 0;
      for (const auto& [name, t] : seq.grads) {
        ASSERT_TRUE(par.grads.count(name)) << name;
        const double e = rel_l2(par.grads.at(name), t);
        if (reordered.count(name)) {
          EXPECT_LE(e, 1e-5) << "grad." << name;
          worst = std::max(worst, e);
        } else {
          EXPECT_LE(e, 1e-6) << "grad." << name;
          identical = identical && same(par.grads.at(name), t);
        }
      }
      std::printf("  %-38s L=%-3lld f32 parallel vs sequential: per-token results %s, reordered sums %.2e", lc.name,
                  (long long)L, identical ? "bit-identical" : "within 1e-6", worst);
      if (L >= 63) {
        const GpuResult tpar = run_gpu(mixer, u, dout, Precision::BF16, true, true);
        const GpuResult tseq = run_gpu(mixer, u, dout, Precision::BF16, true, false);
        std::string where;
        double worst_tc = 0;
        compare(tpar, tseq.out, tseq.du, tseq.grads, kTolBF16, kTolBF16, worst_tc, where);
        std::printf(", bf16 tc %.2e (%s)", worst_tc, where.c_str());
      }
      std::printf("\n");
    }
}

// The parallel schedule's __launch_bounds__(256, 2) kernel variants (≤ 128 registers) against the plain ones: launch
// bounds change only the register allocation, so every output and gradient must be bit-identical, in f32 and with
// the bf16 tensor-core chunks, over several chunks (forcing the variant: it runs whether or not two blocks fit) and
// where auto picks it by itself: N 128, P 64 at L = 12 gives 12-token chunks, whose reverse tiles (107 KiB) let two
// blocks share an H100/H200 SM (228 KiB), while the default 42-token chunks (226 KiB) do not. Auto also shortens the
// training forward's chunks to fit two blocks (64 → 46 tokens at N 128, P 64): its output then rounds differently
// (compared within the f32 / bf16 tolerance), its gradients not at all (the backward recomputes the forward).
TEST(Mamba3TrainGpu, TwoBlockChunkKernelsBitIdentical) {
  MAMBA3_REQUIRE_GPU();
  int dev = 0, sm_smem = 0;
  MAMBA3_CUDA_CHECK(cudaGetDevice(&dev));
  MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  for (const LayerCase& lc : tensor_core_cases())
    for (int64_t L : {12, 65, 300}) {
      const Mamba3Config& c = lc.c;
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const int64_t batch = L == 300 ? 2 : 3;
      auto [mixer, u, dout] = random_layer(c, batch, L, uint32_t(900 + L));
      cuda::Mamba3TrainGpu probe(c);
      probe.set_chunk_blocks_per_sm(0);
      const int auto_blocks = probe.chunk_reverse_blocks(L);
      EXPECT_TRUE(auto_blocks == 1 || auto_blocks == 2) << auto_blocks;
      const char* cap = std::getenv("MAMBA3_TRAIN_CHUNK_LEN");  // a cap changes the chunk lengths expected here
      if (c.d_state == 128 && c.headdim == 64 && !c.is_mimo && sm_smem >= 228 * 1024 && !(cap && *cap)) {
        EXPECT_EQ(probe.chunk_length(L, true), L == 12 ? 12 : 42);
        EXPECT_EQ(auto_blocks, L == 12 ? 2 : 1) << "reverse kernel variant under auto";
        int fwd_blocks = 0;
        EXPECT_EQ(probe.forward_chunk_length(L, fwd_blocks), L == 12 ? 12 : 46);  // 46: 112 KiB of tiles
        EXPECT_EQ(fwd_blocks, 2) << "training forward's variant under auto";
      }
      for (bool tc : {false, true}) {
        const Precision p = tc ? Precision::BF16 : Precision::F32;
        const GpuResult one = run_gpu(mixer, u, dout, p, tc, true, 1);
        const GpuResult two = run_gpu(mixer, u, dout, p, tc, true, 2);
        const GpuResult aut = run_gpu(mixer, u, dout, p, tc, true, 0);
        EXPECT_TRUE(bit_identical(one, two)) << (tc ? "bf16 tc" : "f32") << ": two-block variants differ";
        EXPECT_TRUE(bit_identical(one, aut, false)) << (tc ? "bf16 tc" : "f32") << ": auto's gradients differ";
        EXPECT_LE(rel_l2(aut.out, one.out), tc ? kTolBF16 : 2 * kGoldenOutTol) << "auto's forward output";
      }
      std::printf("  %-38s L=%-3lld chunk %d, auto reverse variant %d blocks/SM\n", lc.name, (long long)L,
                  probe.chunk_length(L, true), auto_blocks);
    }
  cuda::Mamba3TrainGpu train(tensor_core_cases().front().c);
  EXPECT_THROW(train.set_chunk_blocks_per_sm(3), Error);
  EXPECT_THROW(train.set_chunk_blocks_per_sm(-1), Error);
}

TEST(Mamba3TrainGpu, UnsupportedConfigThrows) {
  Mamba3Config c = small(true, 5);
  EXPECT_THROW(cuda::Mamba3TrainGpu{c}, Error);
}

}  // namespace
}  // namespace mamba3::test
