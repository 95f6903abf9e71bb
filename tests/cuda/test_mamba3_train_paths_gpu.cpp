// The fast paths of the Mamba-3 mixer's GPU training pass against the paths they replace, on the same layer and
// inputs: the SISO and MIMO instances of the elementwise chunk kernels against the generic ones, the state chains
// against the products + scan (and a float64 scan), the fused backward cores against the split kernels and the
// batched products, the batched column sums, the fused angle scan, and the bf16 operands written by their producers.
// Bit-identical where the arithmetic is the same, within stated bounds where only the summation order changes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "cuda/train/mamba3_train_bwd_core.h"
#include "cuda/train/mamba3_train_gpu.h"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_state_chain.h"
#include "cuda/train/out_proj_beside.h"
#include "gpu_test_util.h"
#include "mamba3_train_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

// The SISO instances of the build, the rotation backward and the output-stage backward, and the MIMO ones of the
// build, the output stage and the rotation backward (set_siso_kernels) against the generic kernels on the chunk cores'
// shapes (MIMO R 4 and R 2 included): the same arithmetic and sums in the same order, so the output, du and every
// gradient agree to a few roundings (the test prints which tensors differ in any bit).
TEST(Mamba3TrainGpu, SisoKernelsMatchTheGenericOnes) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(true))  // (MIMO: the build's instance)
    for (const int64_t L : {65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const Mamba3Config& cfg = lc.c;
      const int64_t B = 2;
      auto [mixer, u, dout] = random_layer(cfg, B, L, uint32_t(900 + L));
      CoreLayerStep step(mixer, u, dout);
      ASSERT_TRUE(step.train.uses_chunk_cores(true, L)) << "the shape should take the cores";
      step.train.set_dqk16(false);  // (the generic rotation backward reads f32 dQ/dK: BfloatDqDkTracksTheF32Pair)
      step.train.set_zy16(false);   // (the generic output kernels read f32 Z and W·v: BfloatZyTracksTheF32Pair)
      auto run = [&](bool siso) {
        step.train.set_siso_kernels(siso);
        return step.run();
      };
      const GpuResult siso = run(true), generic = run(false), again = run(false);
      ASSERT_NO_FATAL_FAILURE(assert_finite(siso));
      ASSERT_TRUE(bit_identical(generic, again)) << "the generic path is not deterministic";
      // Which tensors differ at all, and by how much: the SISO kernels may contract a product into an FMA where the
      // generic ones do not (a last-bit difference that a bf16 rounding can widen), so the bound is a few bf16
      // roundings of the compared tensors, far below the bf16 mode's tolerance against the CPU (kTolBF16).
      std::string differ;
      double worst = 0;
      std::string where;
      compare(siso, generic.out, generic.du, generic.grads, kTolSisoVsGeneric, kTolSisoVsGeneric, worst, where);
      auto note = [&](const Tensor& a, const Tensor& b, const std::string& name) {
        if (std::memcmp(a.raw(), b.raw(), a.nbytes()) != 0) differ += " " + name;
      };
      note(siso.out, generic.out, "out");
      note(siso.du, generic.du, "grad.u");
      for (const auto& [name, t] : generic.grads) note(siso.grads.at(name), t, "grad." + name);
      std::printf("  %-34s L=%-3lld worst %.2e (%s); differing:%s\n", lc.name, (long long)L, worst, where.c_str(),
                  differ.empty() ? " none" : differ.c_str());
    }
}

// The state chain kernel (products and scan over chunks in one kernel) against a float64 host scan of the same bf16
// operands, forward and reverse, for every core shape, odd head counts, one chunk, and chunk counts that are not a
// multiple of its operand ring; blocks of 64 rows of P give the bits of blocks of 32.
TEST(Mamba3TrainGpu, StateChainMatchesAFloat64Scan) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {
    ~Restore() { cuda::train_detail::set_state_chain_slice(64); }  // (the default)
  } restore;
  cuda::Context ctx;
  std::mt19937 rng(44);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f), dec(0.3f, 1.0f);
  for (const auto& [N, P] : std::vector<std::pair<int, int>>{{128, 64}, {128, 32}, {64, 64}, {64, 32}, {32, 64},
                                                              {32, 32}})
    for (const auto& [B, H, nc] : std::vector<std::tuple<int, int, int>>{{1, 1, 1}, {3, 5, 7}, {2, 3, 33}})
      for (const bool reverse : {false, true}) {
        SCOPED_TRACE("N " + std::to_string(N) + " P " + std::to_string(P) + " B " + std::to_string(B) + " H " +
                     std::to_string(H) + " nc " + std::to_string(nc) + (reverse ? " reverse" : " forward"));
        cuda::train_detail::BatchedParams p{};
        p.d.B = B, p.d.H = H, p.d.N = N, p.d.P = P, p.d.R = 1, p.d.L = nc * 64;
        p.T = 64, p.nc = nc, p.rows = 64, p.bf16 = true;
        ASSERT_TRUE(cuda::train_detail::state_chain_supported(p));
        const int64_t chunks = int64_t(B) * H * nc;
        std::vector<uint16_t> a16(size_t(chunks * 64 * P)), b16(size_t(chunks * 64 * N));
        std::vector<float> decay(static_cast<size_t>(chunks));
        for (auto& v : a16) v = f32_to_bf16(uni(rng));
        for (auto& v : b16) v = f32_to_bf16(uni(rng));
        for (auto& v : decay) v = dec(rng);
        cuda::DeviceBuffer da(a16.size() * 2), db(b16.size() * 2), ddec(decay.size() * 4), dout(size_t(chunks * P * N) * 2);
        da.upload(a16.data(), da.bytes()), db.upload(b16.data(), db.bytes()), ddec.upload(decay.data(), ddec.bytes());
        poison(dout.raw(), dout.bytes());
        p.decay = ddec.as<float>();
        cuda::train_detail::set_state_chain_slice(32);
        cuda::train_detail::launch_state_chain(ctx.stream(), p, da.raw(), db.raw(), reverse, dout.raw());
        ctx.sync();
        const Tensor got = from_device_bf16(dout.as<uint16_t>(), {chunks, P, N});
        cuda::DeviceBuffer dout64(dout.bytes());
        poison(dout64.raw(), dout64.bytes());
        cuda::train_detail::set_state_chain_slice(64);  // (P 32 keeps slices of 32)
        cuda::train_detail::launch_state_chain(ctx.stream(), p, da.raw(), db.raw(), reverse, dout64.raw());
        ctx.sync();
        const Tensor got64 = from_device_bf16(dout64.as<uint16_t>(), {chunks, P, N});
        EXPECT_EQ(std::memcmp(got.raw(), got64.raw(), got.nbytes()), 0) << "slices of 64 rows: other bits";
        Tensor want = Tensor::empty(DType::F32, {chunks, P, N});
        std::vector<double> st(size_t(P * N));
        for (int64_t bh = 0; bh < int64_t(B) * H; ++bh) {
          std::fill(st.begin(), st.end(), 0.0);
          for (int i = 0; i < nc; ++i) {
            const int64_t c = bh * nc + (reverse ? nc - 1 - i : i);
            for (int64_t e = 0; e < P * N; ++e) want.data<float>()[c * P * N + e] = float(st[size_t(e)]);
            for (int pr = 0; pr < P; ++pr)
              for (int n = 0; n < N; ++n) {
                double acc = 0;
                for (int r = 0; r < 64; ++r)
                  acc += double(bf16_to_f32(a16[size_t((c * 64 + r) * P + pr)])) *
                         double(bf16_to_f32(b16[size_t((c * 64 + r) * N + n)]));
                st[size_t(pr * N + n)] = decay[size_t(c)] * st[size_t(pr * N + n)] + acc;
              }
          }
        }
        for (int64_t i = 0; i < got.numel(); ++i) ASSERT_TRUE(std::isfinite(got.data<float>()[i])) << i;
        if (nc == 1) {  // the only state is the zero one
          for (int64_t i = 0; i < got.numel(); ++i) ASSERT_EQ(got.data<float>()[i], 0.0f) << i;
        } else {
          EXPECT_LE(rel_l2(got, want), 5e-3);  // the bf16 rounding of the written states
        }
      }
}

// The state chains against the products + scan pass in a whole mixer step (bf16 mode, cores): the reverse chain
// forms G as the backward core does, so a backward from the same kept forward gives the same bits; the forward
// chain's products sum in the mma's order instead of cuBLAS's, so a whole step agrees to rounding. Both deterministic.
TEST(Mamba3TrainGpu, StateChainGivesThePassResults) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(true))
    for (const int64_t L : {1, 65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const Mamba3Config& cfg = lc.c;
      const int64_t B = 2;
      auto [mixer, u, dout] = random_layer(cfg, B, L, uint32_t(1300 + L));
      CoreLayerStep step(mixer, u, dout);
      if (!step.train.uses_chunk_cores(true, L)) continue;  // shapes the cores do not take keep the pass
      step.train.set_backward_core_fused(false);  // (the fused core needs the chain: FusedBackwardCoreGivesTheSplitBits)
      // forward_chain / backward_chain: the path of each half; keep: the backward reads the kept forward.
      auto run = [&](bool forward_chain, bool backward_chain, bool keep) {
        step.train.set_state_chain(forward_chain);
        return step.run(keep, [&] { step.train.set_state_chain(backward_chain); });
      };
      const GpuResult pass = run(false, false, true), rev_chain = run(false, true, true);
      ASSERT_NO_FATAL_FAILURE(assert_finite(rev_chain));
      EXPECT_TRUE(bit_identical(pass, rev_chain)) << "the reverse chain is not the core + scan path's bits";
      const GpuResult chain = run(true, true, false), again = run(true, true, false);
      EXPECT_TRUE(bit_identical(chain, again)) << "the chains are not deterministic";
      double worst = 0;
      std::string where;
      compare(chain, pass.out, pass.du, pass.grads, kTolChainVsPass, kTolChainVsPass, worst, where);
      std::printf("  %-38s L=%-3lld chain vs pass worst %.2e (%s)\n", lc.name, (long long)L, worst, where.c_str());
    }
}

// The fused backward core (backward core + post-scan core in one kernel, after the reverse chain) against the two
// kernels around it: dV and dK's first term stay in registers instead of going through global memory, every sum in
// the same order, so the same bits, with and without a kept forward, on the SISO core shapes and a padded last chunk;
// in both block widths (the two phases on separate warps, or four warps running both).
TEST(Mamba3TrainGpu, FusedBackwardCoreGivesTheSplitBits) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {
    ~Restore() { cuda::train_detail::set_fused_core_wide(true); }
  } restore;
  for (const LayerCase& lc : core_shape_cases(false))
    for (const int64_t L : {64, 65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const Mamba3Config& cfg = lc.c;
      const int64_t B = 3;
      auto [mixer, u, dout] = random_layer(cfg, B, L, uint32_t(1700 + L));
      CoreLayerStep step(mixer, u, dout);
      step.train.set_state_chain(true);
      // (the output part inside the core sums Λ's term and D's partial in another order than the output-stage kernel
      // the split path runs: OutputInsideTheFusedCoreTracksTheKernel)
      step.train.set_core_output(false);
      ASSERT_TRUE(step.train.uses_chunk_cores(true, L)) << "the shape should take the cores";
      auto run = [&](bool fused, bool keep) {
        step.train.set_backward_core_fused(fused);
        return step.run(keep);
      };
      for (const bool keep : {false, true}) {
        SCOPED_TRACE(keep ? "kept forward" : "recomputed forward");
        const GpuResult split = run(false, keep);
        for (const bool wide : {true, false}) {
          SCOPED_TRACE(wide ? "8 warps" : "4 warps");
          cuda::train_detail::set_fused_core_wide(wide);
          const GpuResult fused = run(true, keep);
          ASSERT_NO_FATAL_FAILURE(assert_finite(fused));
          EXPECT_TRUE(bit_identical(split, fused));
        }
      }
    }
}

// The SISO core cases and a 24-head layer of the 125M model's tiles (N 128, P 64, S 32).
std::vector<LayerCase> siso_cases_with_125m_tiles() {
  std::vector<LayerCase> cases = core_shape_cases(false);
  Mamba3Config c24 = small(false, 1);
  c24.d_model = 768, c24.d_state = 128, c24.headdim = 64;  // 24 heads
  cases.push_back({"siso N 128 P 64 (24 heads)", c24});
  return cases;
}

// The training step's path for the output part and w ⊙ v: z, x, dO and dzx in bf16, the chains, the fused core.
void take_fused_core_with_bf16_operands(CoreLayerStep& step) {
  step.train.set_zx_bf16(true);
  step.train.set_dzx_bf16(true);
  step.train.set_state_chain(true);
  step.train.set_backward_core_fused(true);
}

// The output stage's backward inside the SISO fused core (e^Λ ⊙ dy formed by the reverse chain from dO and z, or by a
// kernel before it: the same bits) against the output-stage kernel before the chain: the output is the same bits and
// dy and e^Λ ⊙ dy are the kernel's; D's partial is summed in another order and Λ's state-read term comes from dQ's
// state term (bf16 e^Λ ⊙ dy and H_c instead of f32 dy and bf16 Z), so du and the gradients move by about a bf16
// rounding of that term (kTolCoreOutput). With and without a kept forward, on sequences of whole chunks
// (batch 3; 4 and 24 heads; one and three chunks); deterministic; it must run where it applies and not elsewhere (the
// output norm, a padded last chunk, an odd in_proj width and the 4-warp block keep the kernel).
TEST(Mamba3TrainGpu, OutputInsideTheFusedCoreTracksTheKernel) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {
    ~Restore() {
      cuda::train_detail::set_fused_core_wide(true);
      cuda::train_detail::set_state_chain_slice(64);
    }
  } restore;
  const std::vector<LayerCase> cases = siso_cases_with_125m_tiles();
  int ran = 0;
  for (const LayerCase& lc : cases)
    for (const int64_t L : {64, 192, 65}) {
      if (lc.c.d_model == 768 && L != 192) continue;  // (one big case)
      for (const bool wide : {true, false}) {
        SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (wide ? " 8 warps" : " 4 warps"));
        auto [mixer, u, dout] = random_layer(lc.c, 3, L, uint32_t(4100 + L));
        CoreLayerStep step(mixer, u, dout);
        take_fused_core_with_bf16_operands(step);
        cuda::train_detail::set_fused_core_wide(wide);
        const bool applies = wide && !lc.c.is_outproj_norm && L % 64 == 0 && lc.c.d_in_proj() % 2 == 0;
        for (const bool keep : {false, true}) {
          SCOPED_TRACE(keep ? "kept forward" : "recomputed forward");
          auto run = [&](bool on) {
            step.train.set_core_output(on);
            GpuResult r = step.run(keep);
            EXPECT_EQ(step.train.core_output_used(), on && applies);
            return r;
          };
          const GpuResult kernel = run(false), core = run(true), again = run(true);
          step.train.set_chain_dye(false);  // e^Λ ⊙ dy from its kernel instead of formed in the reverse chain
          const GpuResult dye_kernel = run(true);
          step.train.set_chain_dye(true);
          cuda::train_detail::set_state_chain_slice(32);  // (the chains in blocks of 32 rows of P, not the default 64)
          const GpuResult slice32 = run(true);
          cuda::train_detail::set_state_chain_slice(64);
          EXPECT_TRUE(bit_identical(core, slice32)) << "chain blocks of 32 rows gave other bits";
          ASSERT_NO_FATAL_FAILURE(assert_finite(core));
          EXPECT_TRUE(bit_identical(core, again)) << "not deterministic";
          EXPECT_TRUE(bit_identical(core, dye_kernel)) << "the reverse chain's e^Λ ⊙ dy is not the kernel's";
          EXPECT_EQ(std::memcmp(kernel.out.raw(), core.out.raw(), kernel.out.nbytes()), 0) << "the forward moved";
          if (!applies) {
            EXPECT_TRUE(bit_identical(kernel, core)) << "the switch changed a path it does not apply to";
          }
          double worst = 0;
          std::string where;
          compare(core, kernel.out, kernel.du, kernel.grads, 0.0, kTolCoreOutput, worst, where);
          if (applies && !keep)
            std::printf("  %-34s L=%-3lld core's output part vs kernel: worst %.2e (%s)\n", lc.name, (long long)L,
                        worst, where.c_str());
          ran += applies;
        }
      }
    }
  EXPECT_GT(ran, 0) << "no case ran the output part inside the fused core";
}

// The fused core with the output part beside the reverse chain (launched while the chain runs, each chunk waiting for
// the chain's counter of its dH) and with its state tiles in its phases' own copies (staged), each and both, against
// the core after the chain with every tile in one group: the same bits — beside also with the chain in blocks of 32
// rows of P (two counts per chunk), after the counters were zeroed for another block count, and over repeated
// backwards (the counters only grow). Recomputed and kept forwards; one, three and sixteen chunks, batch 3 and 4 (the
// longest with the 24-head tiles, so that many blocks wait while the chain runs); both must run wherever the output
// part does.
TEST(Mamba3TrainGpu, CoreBesideTheChainAndStagedTilesGiveTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {
    ~Restore() { cuda::train_detail::set_state_chain_slice(64); }
  } restore;
  const std::vector<LayerCase> cases = siso_cases_with_125m_tiles();
  int ran = 0;
  for (const LayerCase& lc : cases)
    for (const int64_t L : {64, 192, 65, 1024}) {
      const bool big = lc.c.d_model == 768;
      if (big != (L == 1024) && !(big && L == 192)) continue;  // (the 24-head tiles: 3 and 16 chunks)
      const int64_t batch = L == 1024 ? 4 : 3;
      auto [mixer, u, dout] = random_layer(lc.c, batch, L, uint32_t(4700 + L));
      CoreLayerStep step(mixer, u, dout);
      take_fused_core_with_bf16_operands(step);
      const bool applies = !lc.c.is_outproj_norm && L % 64 == 0 && lc.c.d_in_proj() % 2 == 0;
      for (const bool keep : {false, true}) {
        SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (keep ? " kept" : " recomputed"));
        auto run = [&](bool beside, bool staged) {
          step.train.set_core_beside(beside);
          step.train.set_core_staged(staged);
          GpuResult r = step.run(keep);
          EXPECT_EQ(step.train.core_beside_used(), beside && applies);
          EXPECT_EQ(step.train.core_staged_used(), staged && applies);
          return r;
        };
        const GpuResult after = run(false, false), beside = run(true, false), again = run(true, false);
        const GpuResult staged = run(false, true), both = run(true, true);
        cuda::train_detail::set_state_chain_slice(32);
        const GpuResult slice32 = run(true, true);
        cuda::train_detail::set_state_chain_slice(64);
        const GpuResult back = run(true, false);
        step.train.set_core_beside(false);
        step.train.set_core_staged(false);
        ASSERT_NO_FATAL_FAILURE(assert_finite(beside));
        EXPECT_TRUE(bit_identical(after, beside)) << "beside the chain gave other bits";
        EXPECT_TRUE(bit_identical(after, again)) << "a second backward beside the chain gave other bits";
        EXPECT_TRUE(bit_identical(after, staged)) << "the staged state tiles gave other bits";
        EXPECT_TRUE(bit_identical(after, both)) << "staged and beside the chain gave other bits";
        EXPECT_TRUE(bit_identical(after, slice32)) << "beside chain blocks of 32 rows gave other bits";
        EXPECT_TRUE(bit_identical(after, back)) << "beside, after the counters were zeroed again, gave other bits";
        ran += applies;
      }
    }
  EXPECT_GT(ran, 0) << "no case ran the fused core beside the chain";
}

// out_proj's product beside the walk (out_proj_beside.h) on its own, its counters already at their target (so nothing
// waits), against a float64 product of the same bf16 operands: f32 results to f32 rounding, bf16 results to one bf16
// rounding. Several sequences and chunks, K of one and of 24 steps, one and six column tiles.
TEST(Mamba3TrainGpu, OutProjBesideMatchesAFloat64Product) {
  MAMBA3_REQUIRE_GPU();
  struct Shape3 {
    int64_t B, L;
    int K, D;
  };
  int ran = 0;
  for (const Shape3 sh : {Shape3{2, 192, 64, 128}, Shape3{3, 128, 192, 256}, Shape3{1, 128, 1536, 768}})
    for (const bool f32_out : {true, false}) {
      SCOPED_TRACE("B " + std::to_string(sh.B) + " L " + std::to_string(sh.L) + " K " + std::to_string(sh.K) + " D " +
                   std::to_string(sh.D) + (f32_out ? " f32" : " bf16"));
      const int64_t M = sh.B * sh.L;
      std::mt19937 rng(uint32_t(91 + M + sh.K));
      std::normal_distribution<float> nd(0.0f, 1.0f);
      Tensor a = Tensor::empty(DType::F32, {M, sh.K}), w = Tensor::empty(DType::F32, {sh.D, sh.K});
      for (int64_t i = 0; i < a.numel(); ++i) a.data<float>()[i] = nd(rng);
      for (int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = nd(rng) / std::sqrt(float(sh.K));
      const Tensor a16 = a.to(DType::BF16).to(DType::F32), w16 = w.to(DType::BF16).to(DType::F32);
      cuda::DeviceBuffer ad = to_device_activation(a, cuda::Precision::BF16);
      cuda::DeviceBuffer wd = to_device_activation(w, cuda::Precision::BF16);
      cuda::DeviceBuffer out(size_t(M * sh.D) * (f32_out ? 4 : 2));
      poison(out.raw(), out.bytes());
      const int nc = int(sh.L / 64);
      std::vector<unsigned> counts(size_t(sh.B * nc), 3u);  // (the target below: every chunk's rows there)
      cuda::DeviceBuffer ready(counts.size() * sizeof(unsigned));
      ready.upload(counts.data(), counts.size() * sizeof(unsigned));
      ASSERT_TRUE(cuda::train_detail::out_proj_beside_supported(sh.L, sh.K, sh.D, ad.raw(), wd.raw(), out.raw()));
      cuda::train_detail::OutProjBesideParams op{};
      op.o16 = ad.as<uint16_t>(), op.w16 = wd.as<uint16_t>();
      op.out16 = f32_out ? nullptr : out.as<uint16_t>(), op.out = f32_out ? out.as<float>() : nullptr;
      op.B = sh.B, op.L = sh.L, op.K = sh.K, op.D = sh.D, op.nc = nc, op.ready = ready.as<unsigned>(), op.target = 3;
      cuda::Context ctx;
      cuda::train_detail::launch_out_proj_beside(ctx.stream(), op);
      ctx.sync();
      Tensor got = Tensor::empty(f32_out ? DType::F32 : DType::BF16, {M, sh.D});
      out.download(got.raw(), got.nbytes());
      got = got.to(DType::F32);
      double err = 0, ref_sq = 0;
      for (int64_t r = 0; r < M; ++r)
        for (int n = 0; n < sh.D; ++n) {
          double ref = 0;
          for (int k = 0; k < sh.K; ++k)
            ref += double(a16.data<float>()[r * sh.K + k]) * double(w16.data<float>()[int64_t(n) * sh.K + k]);
          const double g = got.data<float>()[r * sh.D + n];
          ASSERT_TRUE(std::isfinite(g)) << "row " << r << " column " << n;
          err += (g - ref) * (g - ref), ref_sq += ref * ref;
        }
      const double rel = std::sqrt(err / ref_sq);
      EXPECT_LT(rel, f32_out ? 1e-6 : 3e-3) << "relative error " << rel;
      ++ran;
    }
  EXPECT_GT(ran, 0);
}

// out_proj beside the forward walk against cuBLAS after it, on the same layer (out_proj's weight given as its bf16
// mirror in both): out to f32 rounding (another summation order), du and every gradient the same bits (the backward
// does not read out). Recomputed and kept forwards, repeated forwards (the counters only grow); it must run wherever
// the walk runs with whole chunks, K % 64 and d_model % 128 — the 24-head tiles' layer at three and sixteen chunks.
TEST(Mamba3TrainGpu, OutProjBesideTheWalkTracksTheProduct) {
  MAMBA3_REQUIRE_GPU();
  const std::vector<LayerCase> cases = siso_cases_with_125m_tiles();
  int ran = 0;
  for (const LayerCase& lc : cases)
    for (const int64_t L : {64, 192, 1024}) {
      const bool big = lc.c.d_model == 768;
      if (L == 1024 && !big) continue;
      const int64_t batch = L == 1024 ? 2 : 3;
      auto [mixer, u, dout] = random_layer(lc.c, batch, L, uint32_t(4900 + L));
      CoreLayerStep step(mixer, u, dout);
      take_fused_core_with_bf16_operands(step);
      cuda::DeviceBuffer w16 = to_device_activation(mixer.param("out_proj.weight"), cuda::Precision::BF16);
      step.out_proj16 = w16.as<uint16_t>();
      for (const bool keep : {false, true}) {
        SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (keep ? " kept" : " recomputed"));
        step.train.set_out_proj_beside(false);
        const GpuResult after = step.run(keep);
        const bool applies = step.train.fwd_walk_used() && lc.c.d_model % 128 == 0 && lc.c.d_inner() % 64 == 0;
        step.train.set_out_proj_beside(true);
        const GpuResult beside = step.run(keep), again = step.run(keep);
        EXPECT_EQ(step.train.out_proj_beside_used(), applies);
        step.train.set_out_proj_beside(false);
        ASSERT_NO_FATAL_FAILURE(assert_finite(beside));
        EXPECT_TRUE(bit_identical(beside, again)) << "not deterministic";
        EXPECT_TRUE(bit_identical(after, beside, false)) << "the backward moved";
        double err = 0, ref_sq = 0;
        const float *x = beside.out.data<float>(), *y = after.out.data<float>();
        for (int64_t i = 0; i < after.out.numel(); ++i)
          err += double(x[i] - y[i]) * (x[i] - y[i]), ref_sq += double(y[i]) * y[i];
        EXPECT_LT(std::sqrt(err / ref_sq), 1e-5) << "out beside the walk is not cuBLAS's product to rounding";
        if (!applies) {
          EXPECT_TRUE(bit_identical(after, beside)) << "the switch changed a path it does not apply to";
        }
        ran += applies;
      }
    }
  EXPECT_GT(ran, 0) << "no case ran out_proj beside the walk";
}

// w ⊙ v left by the SISO build to its readers (the forward chain scales v's fragments; the fused core with the output
// part forms its tile from v; a backward on another path gets Vw from a kernel first) against the build writing it:
// the same bits. The forward leaves it only where the output part is expected (its switch on); a kept forward whose
// backward then runs the output-stage kernel takes the kernel that forms Vw. Recomputed and kept forwards; whole
// chunks only.
TEST(Mamba3TrainGpu, VwFormedByItsReadersGivesTheBuildsBits) {
  MAMBA3_REQUIRE_GPU();
  const std::vector<LayerCase> cases = siso_cases_with_125m_tiles();
  int ran = 0;
  for (const LayerCase& lc : cases)
    for (const int64_t L : {64, 192, 65}) {
      if (lc.c.d_model == 768 && L != 192) continue;  // (one big case)
      auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(4300 + L));
      CoreLayerStep step(mixer, u, dout);
      take_fused_core_with_bf16_operands(step);
      // (the SISO build's shapes, and the output part's: no output norm)
      const bool applies = L % 64 == 0 && lc.c.d_in_proj() % 4 == 0 && !lc.c.is_outproj_norm;
      for (const bool keep : {false, true})
        for (const bool core_output : {true, false}) {
          SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (keep ? " kept" : " recomputed") +
                       (core_output ? " core output" : " output kernel"));
          auto run = [&](bool on) {
            step.train.set_vw_formed(on);
            // a kept forward with the output part expected, its backward on the switch's path
            step.train.set_core_output(keep || core_output);
            GpuResult r = step.run(keep, [&] { step.train.set_core_output(core_output); });
            EXPECT_EQ(step.train.vw_formed_used(), on && applies && (keep || core_output));
            return r;
          };
          const GpuResult written = run(false), formed = run(true);
          ASSERT_NO_FATAL_FAILURE(assert_finite(formed));
          EXPECT_TRUE(bit_identical(written, formed)) << "w ⊙ v formed by its readers changed bits";
          ran += applies && (keep || core_output);
        }
    }
  EXPECT_GT(ran, 0) << "no case left w ⊙ v to its readers";
}

// q and k stored by the SISO build in their rotated columns only, the chains and cores forming the unrotated half from
// zx's B/C rows and the biases (the build's expression), against the build storing them whole: the same bits.
// Recomputed and kept forwards; a kept forward whose backward then leaves the fused core (the build runs again,
// whole); whole chunks only (L = 65 stores them whole), and the 3-head case's odd in_proj width neither.
TEST(Mamba3TrainGpu, QkRotatedColumnsOnlyGiveTheBuildsBits) {
  MAMBA3_REQUIRE_GPU();
  const std::vector<LayerCase> cases = siso_cases_with_125m_tiles();
  int ran = 0, rebuilt = 0;
  for (const LayerCase& lc : cases)
    for (const int64_t L : {64, 192, 65}) {
      if (lc.c.d_model == 768 && L != 192) continue;  // (one big case)
      auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(4500 + L));
      CoreLayerStep step(mixer, u, dout);
      take_fused_core_with_bf16_operands(step);
      const bool applies = L % 64 == 0 && lc.c.d_in_proj() % 4 == 0;
      for (const bool keep : {false, true})
        for (const bool fused_backward : {true, false}) {
          if (!keep && !fused_backward) continue;  // (a recomputed forward takes the backward's switches)
          SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (keep ? " kept" : " recomputed") +
                       (fused_backward ? " fused core" : " split cores"));
          auto run = [&](bool on) {
            step.train.set_qk_rotated_only(on);
            step.train.set_backward_core_fused(true);
            GpuResult r = step.run(keep, [&] { step.train.set_backward_core_fused(fused_backward); });
            EXPECT_EQ(step.train.qk_rotated_only_used(), on && applies);
            return r;
          };
          const GpuResult whole = run(false), half = run(true);
          ASSERT_NO_FATAL_FAILURE(assert_finite(half));
          EXPECT_TRUE(bit_identical(whole, half)) << "q and k formed in part by their readers changed bits";
          ran += applies;
          rebuilt += applies && !fused_backward;
        }
    }
  EXPECT_GT(ran, 0) << "no case stored q and k in part";
  EXPECT_GT(rebuilt, 0) << "no kept forward's backward built q and k again";
}

// k, v and the forward state chain in one kernel per sequence-head (set_kv_chain: the build writes q alone, before the
// kernel or beside it, or the kernel forms q too, or also runs the forward core's work: set_kv_chain_walk) against the
// build writing k and v, the chain reading them and the forward core: the same bits in the output, du and every
// gradient, with a recomputed and a kept forward (the backward then reads the kv chain's or the walk's q, k, v, states
// and y). Whole chunks only (L = 65 keeps the build and the chain), and every case where it applies must have taken
// it.
TEST(Mamba3TrainGpu, KvChainGivesTheBuildAndChainBits) {
  MAMBA3_REQUIRE_GPU();
  const std::vector<LayerCase> cases = siso_cases_with_125m_tiles();
  int ran = 0, walks = 0;
  for (const LayerCase& lc : cases)
    for (const int64_t L : {64, 192, 65}) {
      if (lc.c.d_model == 768 && L != 192) continue;  // (one big case)
      for (const int64_t B : {1, 3}) {
        auto [mixer, u, dout] = random_layer(lc.c, B, L, uint32_t(4700 + L + B));
        CoreLayerStep step(mixer, u, dout);
        take_fused_core_with_bf16_operands(step);
        for (const bool keep : {false, true}) {
          SCOPED_TRACE(std::string(lc.name) + " B=" + std::to_string(B) + " L=" + std::to_string(L) +
                       (keep ? " kept" : " recomputed"));
          bool used = false, walked = false;
          // (the forward's buffers after a run, to name the tensor that differs)
          const auto snapshot = [&] {
            std::vector<std::pair<std::string, std::vector<uint8_t>>> v;
            for (const auto& [name, buf] : step.train.forward_buffers_for_tests()) {
              v.emplace_back(name, std::vector<uint8_t>(buf->bytes()));
              if (buf->bytes()) buf->download(v.back().second.data(), buf->bytes());
            }
            return v;
          };
          std::vector<std::pair<std::string, std::vector<uint8_t>>> snap_apart, snap_walk;
          auto run = [&](bool on, bool beside, bool with_q = false, bool walk = false) {
            step.train.set_kv_chain(on);
            step.train.set_kv_chain_beside(beside);
            step.train.set_kv_chain_q(with_q);
            step.train.set_kv_chain_walk(walk);
            GpuResult r = step.run(keep);
            if (on) {
              used = step.train.kv_chain_used();
            } else {
              EXPECT_FALSE(step.train.kv_chain_used());
            }
            if (walk && !keep) {
              walked = step.train.fwd_walk_used();
            } else if (!keep) {
              EXPECT_FALSE(step.train.fwd_walk_used());
            }
            return r;
          };
          const GpuResult apart = run(false, false);
          snap_apart = snapshot();
          const GpuResult before = run(true, false), beside = run(true, true), with_q = run(true, false, true),
                          walk = run(true, false, false, true);
          snap_walk = snapshot();
          for (size_t t = 0; t < snap_apart.size() && t < snap_walk.size(); ++t) {
            const auto& [name, a] = snap_apart[t];
            const std::vector<uint8_t>& w = snap_walk[t].second;
            if (a.size() != w.size()) continue;
            const auto at = std::mismatch(a.begin(), a.end(), w.begin());
            EXPECT_TRUE(at.first == a.end())
                << "the walk's " << name << " differs first at byte " << (at.first - a.begin()) << " of " << a.size();
          }
          ASSERT_NO_FATAL_FAILURE(assert_finite(before));
          ASSERT_NO_FATAL_FAILURE(assert_finite(beside));
          ASSERT_NO_FATAL_FAILURE(assert_finite(with_q));
          ASSERT_NO_FATAL_FAILURE(assert_finite(walk));
          EXPECT_TRUE(bit_identical(apart, before)) << "k, v and the forward chain in one kernel changed bits";
          EXPECT_TRUE(bit_identical(apart, beside)) << "q's build beside the kv chain changed bits";
          EXPECT_TRUE(bit_identical(apart, with_q)) << "q formed by the kv chain changed bits";
          EXPECT_TRUE(bit_identical(apart, walk)) << "the forward core's work in the walk changed bits";
          // (where w ⊙ v is left to its readers — whole chunks, in_proj rows of whole 16-byte pieces, no output
          // norm: VwFormedByItsReadersGivesTheBuildsBits — and S is a multiple of 8)
          if (L % 64 == 0 && lc.c.d_in_proj() % 4 == 0 && !lc.c.is_outproj_norm && lc.c.num_angles() % 8 == 0) {
            EXPECT_TRUE(used) << "the kv chain did not run where it applies";
            if (!keep) {
              EXPECT_TRUE(walked) << "the walk did not run where it applies";
            }
          }
          ran += used;
          walks += walked;
        }
      }
    }
  EXPECT_GT(ran, 0) << "no case took the kv chain";
  EXPECT_GT(walks, 0) << "no case took the walk";
}

// dQ and dK handed from the SISO cores to the rotation backward in bf16 (the default) against the f32 pair: the
// forward is untouched (the same bits), and du and every gradient move by about a bf16 rounding of dQ and dK, far below
// the bf16 mode's tolerance against the CPU; some gradient must move (else the switch did nothing). SISO: fused and
// split cores, with the chain and with the scan pass; MIMO: its state core after the chain.
TEST(Mamba3TrainGpu, BfloatDqDkTracksTheF32Pair) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(true))
    for (const int64_t L : {65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const int64_t B = 2;
      auto [mixer, u, dout] = random_layer(lc.c, B, L, uint32_t(2100 + L));
      CoreLayerStep step(mixer, u, dout);
      ASSERT_TRUE(step.train.uses_chunk_cores(true, L)) << "the shape should take the cores";
      for (const bool fused : {true, false}) {
        if (lc.c.is_mimo && !fused) continue;  // (MIMO's split path adds dK's second term in cuBLAS: f32 there)
        SCOPED_TRACE(fused ? "fused core, chain" : "split cores, scan pass");
        step.train.set_backward_core_fused(fused);
        step.train.set_state_chain(fused);
        auto run = [&](bool dqk16) {
          step.train.set_dqk16(dqk16);
          return step.run();
        };
        const GpuResult f32 = run(false), b16 = run(true), again = run(true);
        ASSERT_NO_FATAL_FAILURE(assert_finite(b16));
        EXPECT_TRUE(bit_identical(b16, again)) << "not deterministic";
        EXPECT_EQ(std::memcmp(f32.out.raw(), b16.out.raw(), f32.out.nbytes()), 0) << "the forward moved";
        EXPECT_FALSE(bit_identical(f32, b16)) << "the switch changed nothing";
        double worst = 0;
        std::string where;
        compare(b16, f32.out, f32.du, f32.grads, 0.0, kTolDqk16, worst, where);
        std::printf("  %-34s L=%-3lld %-24s bf16 vs f32 dQ/dK worst %.2e (%s)\n", lc.name, (long long)L,
                    fused ? "fused, chain" : "split, pass", worst, where.c_str());
      }
    }
}

// The angle codes as the segment-block scan writes them (launch_angle_codes) against the same scan's f32 angles: each
// code within half a step (π/65536 ≈ 4.8e-5) of its angle modulo 2π, on the 125M shape's 24 heads and 32 angles and
// on 5 heads of 6 angles, over a partial last segment (L 300), with rates and Δ large enough to wrap many times.
TEST(Mamba3TrainGpu, AngleCodesHoldTheScansAngles) {
  MAMBA3_REQUIRE_GPU();
  using cuda::train_detail::AnglesMode;
  cuda::train_detail::set_angles_mode(AnglesMode::kBlocks);
  cuda::Context ctx;
  std::mt19937 rng(61);
  std::uniform_real_distribution<float> theta(-3.0f, 3.0f), delta(0.0f, 2.0f);
  for (const auto& [H, S] : std::vector<std::pair<int, int>>{{24, 32}, {5, 6}}) {
    SCOPED_TRACE("H " + std::to_string(H) + " S " + std::to_string(S));
    cuda::train_detail::MixerDims d{};
    d.B = 2, d.L = 300, d.H = H, d.S = S, d.din = S, d.off_ang = 0, d.R = 1, d.G = 1;  // (zx: the angle columns)
    const int64_t M = int64_t(d.B) * d.L, BHL = int64_t(d.B) * H * d.L;
    std::vector<float> zx(size_t(M * S)), dt(static_cast<size_t>(BHL));
    for (auto& v : zx) v = theta(rng);
    for (auto& v : dt) v = delta(rng);
    cuda::DeviceBuffer dzx(zx.size() * 4), ddt(dt.size() * 4), phi(size_t(BHL * S) * 4), codes(size_t(BHL * S) * 2);
    cuda::DeviceBuffer seg(cuda::train_detail::angle_scratch_floats(d) * 4);
    dzx.upload(zx.data(), dzx.bytes()), ddt.upload(dt.data(), ddt.bytes());
    poison(codes.raw(), codes.bytes());
    cuda::train_detail::launch_angles(ctx.stream(), d, dzx.as<float>(), ddt.as<float>(), phi.as<float>(),
                                      seg.as<float>());
    ASSERT_TRUE(cuda::train_detail::launch_angle_codes(ctx.stream(), d, dzx.as<float>(), ddt.as<float>(),
                                                       codes.as<uint16_t>(), seg.as<float>()));
    ctx.sync();
    std::vector<float> ph(size_t(BHL * S));
    std::vector<uint16_t> cd(ph.size());
    phi.download(ph.data(), phi.bytes()), codes.download(cd.data(), codes.bytes());
    const double two_pi = 2.0 * 3.14159265358979323846;
    double worst = 0;
    int64_t nonzero = 0;
    for (size_t i = 0; i < ph.size(); ++i) {
      double e = std::fmod(double(cd[i]) * two_pi / 65536.0 - double(ph[i]), two_pi);
      if (e > two_pi / 2) e -= two_pi;
      if (e < -two_pi / 2) e += two_pi;
      worst = std::max(worst, std::fabs(e));
      nonzero += cd[i] != 0;
    }
    // (half a step, and the rounding of φ·65536/2π in f32: 4.84e-5 measured on an H100)
    EXPECT_LE(worst, 3.14159265358979323846 / 65536.0 * 1.05) << "a code further than half a step from its angle";
    EXPECT_GT(nonzero, int64_t(ph.size() / 2)) << "the codes were not written";
    std::printf("  H %d S %d: worst |code − φ| %.3e rad (half a step %.3e)\n", H, S, worst, 3.14159265358979 / 65536.0);
  }
}

// The angles as 16-bit codes (set_angle_codes, the bf16 mode's default) against f32 angles, on the cores' shapes
// (MIMO too: every batched reader decodes them): each reader takes the same code, within 4.8e-5 of φ, so a rotated q
// or k moves by at most that fraction of its length before its bf16 rounding (2^-9), and the output, du and every
// gradient stay within kTolAngleCodes (measured ≤ 6.2e-3, in B_bias's gradient: a sum over tokens of small terms);
// deterministic; the codes must have been written and must change something.
TEST(Mamba3TrainGpu, AngleCodesTrackTheF32Angles) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(true))
    for (const int64_t L : {65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const int64_t B = 2;
      auto [mixer, u, dout] = random_layer(lc.c, B, L, uint32_t(2300 + L));
      CoreLayerStep step(mixer, u, dout);
      auto run = [&](bool codes) {
        step.train.set_angle_codes(codes);
        GpuResult r = step.run();
        EXPECT_EQ(step.train.angle_codes_used(), codes);
        return r;
      };
      const GpuResult f32 = run(false), coded = run(true), again = run(true);
      ASSERT_NO_FATAL_FAILURE(assert_finite(coded));
      EXPECT_TRUE(bit_identical(coded, again)) << "not deterministic";
      EXPECT_FALSE(bit_identical(f32, coded)) << "the switch changed nothing";
      double worst = 0;
      std::string where;
      compare(coded, f32.out, f32.du, f32.grads, kTolAngleCodes, kTolAngleCodes, worst, where);
      std::printf("  %-34s L=%-3lld angle codes vs f32 angles worst %.2e (%s)\n", lc.name, (long long)L, worst,
                  where.c_str());
    }
}

// dφ, dBn and dCn poisoned with NaN between a forward and a backward (those the backward has reserved).
void poison_backward_scratch(CoreLayerStep& step) {
  step.ctx.sync();
  for (cuda::DeviceBuffer* b : step.train.backward_scratch_for_tests())
    if (b->bytes() > 0) poison(b->raw(), b->bytes());
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
}

// The switches the un-rotating core's paths depend on, set whatever the environment says: the reverse state chain,
// the fused backward core, bf16 dQ/dK and the B/C norm inside the rotation backward; the shape must take the cores.
void pin_fused_core_path(CoreLayerStep& step, int64_t L) {
  step.train.set_state_chain(true);
  step.train.set_backward_core_fused(true);
  step.train.set_dqk16(true);
  step.train.set_bc_norm_fusion(true);
  ASSERT_TRUE(step.train.uses_chunk_cores(true, L)) << "the shape should take the cores";
}

// The fused core un-rotating dQ and dK and forming dφ itself (set_core_unrotate) against the rotation backward doing
// both (the default): the forward untouched, du and every gradient within kTolDqk16 (dQ and dK are rounded to bf16
// after their un-rotation instead of before it), deterministic, in both block widths (the phases' dφ terms meet
// through a named barrier in the 8-warp block, in one warp in the 4-warp one), with a padded last chunk. dφ's buffer
// is poisoned with NaN before each un-rotating backward, so a dφ element the core leaves unwritten fails the
// finiteness check (the default run before it would otherwise have left the right values there). The path must run
// where it applies — N 32 at rope_fraction 1.0 too, every column rotating — and not where it does not: rope 1.0 at
// N 128 (rotating columns past the core's first 64) and at N 64 P 32 (dφ's exchange rows exceed e^Λ ⊙ dy's), where
// the bits must be the default's.
TEST(Mamba3TrainGpu, UnrotatingFusedCoreTracksTheRotationBackward) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {
    ~Restore() { cuda::train_detail::set_fused_core_wide(true); }
  } restore;
  struct Case {
    LayerCase lc;
    bool applies;
  };
  std::vector<Case> cases;
  for (const LayerCase& lc : core_shape_cases(false)) {
    cases.push_back({lc, true});
    LayerCase full = lc;
    full.c.rope_fraction = 1.0;
    full.name = lc.c.d_state == 128  ? "siso N 128 P 64 rope 1.0 (not taken)"
                : lc.c.d_state == 64 ? "siso N 64 P 32 rope 1.0 (not taken)"
                                     : "siso N 32 P 32 rope 1.0";
    cases.push_back({full, lc.c.d_state == 32});
  }
  for (const Case& tc : cases)
    for (const int64_t L : {65, 300}) {
      const LayerCase& lc = tc.lc;
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(3900 + L));
      CoreLayerStep step(mixer, u, dout);
      ASSERT_NO_FATAL_FAILURE(pin_fused_core_path(step, L));
      auto run = [&](bool on) {
        step.train.set_core_unrotate(on);
        GpuResult r = step.run(false, [&] {
          if (on) poison_backward_scratch(step);
        });
        EXPECT_EQ(step.train.last_backward_core_unrotated(), on && tc.applies) << "the switch did not select the path";
        return r;
      };
      const GpuResult base = run(false);
      for (const bool wide : {true, false}) {
        SCOPED_TRACE(wide ? "8 warps" : "4 warps");
        cuda::train_detail::set_fused_core_wide(wide);
        const GpuResult un = run(true), again = run(true);
        ASSERT_NO_FATAL_FAILURE(assert_finite(un));
        EXPECT_TRUE(bit_identical(un, again)) << "not deterministic";
        EXPECT_EQ(std::memcmp(base.out.raw(), un.out.raw(), base.out.nbytes()), 0) << "the forward moved";
        if (tc.applies)
          EXPECT_FALSE(bit_identical(base, un)) << "the switch changed nothing";
        else
          EXPECT_TRUE(bit_identical(base, un)) << "not taken, yet the bits moved";
        double worst = 0;
        std::string where;
        compare(un, base.out, base.du, base.grads, 0.0, kTolDqk16, worst, where);
        std::printf("  %-38s L=%-3lld %s un-rotating core vs rotation backward worst %.2e (%s)\n", lc.name,
                    (long long)L, wide ? "8 warps" : "4 warps", worst, where.c_str());
      }
    }
}

// The fused core also summing dQ and dK over clusters of 8 heads (set_core_head_sum on top of set_core_unrotate): no
// rotation backward, the B/C norm backward's own kernel over H/8 slots. Against the un-rotating core without it (the
// same dQ/dK tiles, the heads' sums in another order) within kTolSisoVsGeneric, and against the default within
// kTolDqk16; deterministic; a padded last chunk. What the rotation backward wrote must now come from the core: dφ,
// dBn and dCn are poisoned with NaN before each such backward, and a default backward of the same layer with dout
// doubled runs just before it, so that bias partials the core failed to write would hold another problem's values.
// Cases of 8 heads (one cluster), 16 heads in 2 groups (a cluster per group), 24 heads in one group (three slots, as
// at 125M), N 32/64/128; at 4 heads the sum is not taken and the bits are the un-rotating core's.
TEST(Mamba3TrainGpu, HeadSumInTheFusedCoreTracksTheRotationBackward) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {
    ~Restore() { cuda::train_detail::set_fused_core_wide(true); }
  } restore;
  cuda::train_detail::set_fused_core_wide(true);  // (the head sum runs in the 8-warp block only)
  struct Case {
    LayerCase lc;
    bool applies;
  };
  std::vector<Case> cases;
  Mamba3Config c = small(false, 1);
  c.d_model = 256, c.d_state = 128, c.headdim = 64;  // 8 heads
  cases.push_back({{"siso N 128 P 64 (8 heads)", c}, true});
  c = small(false, 1);
  c.d_model = 256, c.d_state = 64, c.headdim = 32, c.ngroups = 2, c.is_outproj_norm = true;  // 16 heads, 2 groups
  cases.push_back({{"siso N 64 P 32 (16 heads, 2 groups) outnorm", c}, true});
  c = small(false, 1);
  c.d_model = 128, c.d_state = 32, c.headdim = 32;  // 8 heads
  cases.push_back({{"siso N 32 P 32 (8 heads)", c}, true});
  c = small(false, 1);
  c.d_model = 768, c.d_state = 128, c.headdim = 64;  // 24 heads in one group: three slots (the 125M model's heads)
  cases.push_back({{"siso N 128 P 64 (24 heads, 3 slots)", c}, true});
  cases.push_back({core_shape_cases(false).front(), false});  // 4 heads
  // The head sum adds the same bf16 values as the slots do, in another order; f32 sums of a few bf16 values are often
  // exact, so a (case, length) may give the same bits by chance (seen once with the angle codes' inputs, 8 heads at
  // N 32, L 300), but not every one: at least one must differ.
  int changed = 0;
  for (const Case& tc : cases)
    for (const int64_t L : {65, 300}) {
      const LayerCase& lc = tc.lc;
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(4100 + L));
      CoreLayerStep step(mixer, u, dout);
      ASSERT_NO_FATAL_FAILURE(pin_fused_core_path(step, L));
      Tensor dout2 = Tensor::empty(DType::F32, dout.shape());
      for (int64_t i = 0; i < dout.numel(); ++i) dout2.data<float>()[i] = 2.0f * dout.data<float>()[i];
      const cuda::DeviceBuffer dd2 = to_device_activation(dout2, Precision::F32),
                               dd1 = to_device_activation(dout, Precision::F32);
      auto use_dout = [&](const cuda::DeviceBuffer& src) {  // (on the step's stream: ordered before its backward)
        MAMBA3_CUDA_CHECK(
            cudaMemcpyAsync(step.dd.raw(), src.raw(), step.dd.bytes(), cudaMemcpyDeviceToDevice, step.ctx.stream()));
        step.ctx.sync();
      };
      auto run = [&](bool unrotate, bool head_sum) {
        step.train.set_core_unrotate(unrotate);
        step.train.set_core_head_sum(head_sum);
        if (head_sum) {  // another problem's values left in every buffer the core must now write
          step.train.set_core_unrotate(false);
          use_dout(dd2);
          step.run();
          use_dout(dd1);
          step.train.set_core_unrotate(true);
        }
        GpuResult r = step.run(false, [&] {
          if (head_sum) poison_backward_scratch(step);
        });
        EXPECT_EQ(step.train.last_backward_core_head_summed(), head_sum && tc.applies)
            << "the switch did not select the path";
        return r;
      };
      const GpuResult base = run(false, false), unrot = run(true, false);
      const GpuResult summed = run(true, true), again = run(true, true);
      ASSERT_NO_FATAL_FAILURE(assert_finite(summed));
      EXPECT_TRUE(bit_identical(summed, again)) << "not deterministic";
      EXPECT_EQ(std::memcmp(base.out.raw(), summed.out.raw(), base.out.nbytes()), 0) << "the forward moved";
      if (tc.applies) {
        changed += !bit_identical(unrot, summed);
      } else {
        EXPECT_TRUE(bit_identical(unrot, summed)) << "not taken, yet the bits moved";
      }
      double worst = 0, worst_base = 0;
      std::string where, where_base;
      compare(summed, unrot.out, unrot.du, unrot.grads, 0.0, kTolSisoVsGeneric, worst, where);
      compare(summed, base.out, base.du, base.grads, 0.0, kTolDqk16, worst_base, where_base);
      std::printf("  %-44s L=%-3lld head sum vs un-rotating core %.2e (%s), vs default %.2e (%s)\n", lc.name,
                  (long long)L, worst, where.c_str(), worst_base, where_base.c_str());
    }
  EXPECT_GT(changed, 0) << "the head sum changed nothing on any case";
}

// The SISO output-stage backward with two of a warp's tokens in flight (the default) against one at a time: the same
// expressions and the partials' sums in the same token order, on shapes with padding tokens. The two instantiations
// are compiled apart and the compiler may contract a product into an FMA in one and not the other (the H200 run saw
// last-bit differences at P 32, none at P 64), so the bound is SISO-vs-generic's: a few bf16 roundings.
TEST(Mamba3TrainGpu, OutputBackwardTokensInFlightMatchOneAtATime) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(false))
    for (const int64_t L : {65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(2500 + L));
      CoreLayerStep step(mixer, u, dout);
      auto run = [&](int tokens) {
        step.train.set_output_tokens(tokens);
        return step.run();
      };
      const GpuResult one = run(1), two = run(2), again = run(2);
      ASSERT_NO_FATAL_FAILURE(assert_finite(two));
      EXPECT_TRUE(bit_identical(two, again)) << "not deterministic";
      double worst = 0;
      std::string where;
      compare(two, one.out, one.du, one.grads, kTolSisoVsGeneric, kTolSisoVsGeneric, worst, where);
      std::printf("  %-34s L=%-3lld two tokens vs one: %s, worst %.2e (%s)\n", lc.name, (long long)L,
                  bit_identical(one, two) ? "same bits" : "differ", worst, where.c_str());
    }
}

// The SISO build for sequences of whole chunks (chunk_scalars_kernel, then batched_build_siso_full_kernel: pointers
// stepped per row, no padding predicates, no barriers) against its general kernel: the same loads and the same explicit
// roundings (chunk_token_scalars, Λ's fused multiply-adds in token order, rotated_pair, w·x rounded once), so every
// output and gradient must have the same bits — with x read from the in_proj's bf16 copy and from zx's f32 columns;
// L = 64 and 192 take the new kernels, L = 65 (a partial chunk) the general one in both runs.
TEST(Mamba3TrainGpu, BuildFastPathGivesTheGeneralLoopsBits) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(false))
    for (const int64_t L : {64, 192, 65})
      for (const bool zx16 : {true, false}) {
        SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (zx16 ? " bf16 x" : " f32 x"));
        auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(2700 + L));
        CoreLayerStep step(mixer, u, dout);
        step.train.set_zx_bf16(zx16);
        auto run = [&](bool fast) {
          step.train.set_build_fast(fast);
          return step.run();
        };
        const GpuResult general = run(false), fast = run(true);
        ASSERT_NO_FATAL_FAILURE(assert_finite(fast));
        EXPECT_TRUE(bit_identical(general, fast)) << "the full-chunk path changed bits";
      }
}

// The SISO output-stage backward's kernel for whole chunks (the training step's configuration: z, dO and dzx in bf16,
// the forward's o kept; compile-time flags, stepped pointers) against its general kernel: the same expressions and sum
// orders, compiled apart (the compiler may contract a product differently: the bound is SISO-vs-generic's, a few bf16
// roundings), with and without the output norm, on sequences of whole chunks.
TEST(Mamba3TrainGpu, OutputBackwardFullChunksMatchTheGeneralKernel) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(false))
    for (const int64_t L : {64, 192}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(2900 + L));
      CoreLayerStep step(mixer, u, dout);
      step.train.set_zx_bf16(true);
      step.train.set_dzx_bf16(true);
      auto run = [&](bool full) {
        step.train.set_output_full(full);
        return step.run(true);
      };
      const GpuResult general = run(false), full = run(true), again = run(true);
      ASSERT_NO_FATAL_FAILURE(assert_finite(full));
      EXPECT_TRUE(bit_identical(full, again)) << "not deterministic";
      double worst = 0;
      std::string where;
      compare(full, general.out, general.du, general.grads, kTolSisoVsGeneric, kTolSisoVsGeneric, worst, where);
      std::printf("  %-34s L=%-3lld whole-chunk kernel vs general: %s, worst %.2e (%s)\n", lc.name, (long long)L,
                  bit_identical(general, full) ? "same bits" : "differ", worst, where.c_str());
    }
}

// The B/C norm backward inside the SISO rotation backward (a block walks all head slots of its B/C group, the slot
// sums in shared memory, then the norm backward) against the rotation backward writing dBn/dCn per slot for the
// separate kernel: the same sums in the same order and the same expressions, so du and every gradient agree to a
// last-bit difference (where the compiler contracts a product of the norm's differently); one and several slots per
// group (heads per block 1, 2 or the default), deterministic, and the fused path must actually run.
TEST(Mamba3TrainGpu, BcNormInsideTheRotationBackwardMatchesItsKernel) {
  MAMBA3_REQUIRE_GPU();
  std::vector<LayerCase> cases = core_shape_cases(false);
  Mamba3Config c8 = small(false, 1);
  c8.d_model = 256, c8.d_state = 128, c8.headdim = 64;  // 8 heads in one group
  cases.push_back({"siso N 128 P 64 (8 heads)", c8});
  for (const LayerCase& lc : cases)
    for (const int hpb : {0, 1, 2})
      for (const int64_t L : {65, 300}) {
        const int per_group = int(lc.c.nheads() / lc.c.ngroups);
        if (hpb > 0 && per_group % hpb != 0) continue;
        SCOPED_TRACE(std::string(lc.name) + " heads/block " + std::to_string(hpb) + " L=" + std::to_string(L));
        const int64_t B = 2;
        auto [mixer, u, dout] = random_layer(lc.c, B, L, uint32_t(3100 + L + hpb));
        CoreLayerStep step(mixer, u, dout);
        step.train.set_epilogue_heads(hpb);
        auto run = [&](bool fused) {
          step.train.set_bc_norm_fusion(fused);
          GpuResult r = step.run();
          EXPECT_EQ(step.train.last_backward_fused_bc_norm(), fused) << "the switch did not select the path";
          return r;
        };
        const GpuResult apart = run(false), inside = run(true), again = run(true);
        ASSERT_NO_FATAL_FAILURE(assert_finite(inside));
        EXPECT_TRUE(bit_identical(inside, again)) << "not deterministic";
        EXPECT_EQ(std::memcmp(apart.out.raw(), inside.out.raw(), apart.out.nbytes()), 0) << "the forward moved";
        double worst = 0;
        std::string where;
        compare(inside, apart.out, apart.du, apart.grads, kTolSisoVsGeneric, kTolSisoVsGeneric, worst, where);
        std::printf("  %-30s hpb %d L=%-3lld B/C norm inside vs apart: worst %.2e (%s)\n", lc.name, hpb, (long long)L,
                    worst, where.c_str());
      }
}

// The SISO rotation backward with and without the L2 prefetch of each warp's next token (a hint: no value may move),
// with the B/C norm inside and apart, one and the default heads per block, a partial last chunk.
TEST(Mamba3TrainGpu, RotationPrefetchKeepsTheBits) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(false))
    for (const bool fused : {true, false})
      for (const int hpb : {0, 1}) {
        SCOPED_TRACE(std::string(lc.name) + (fused ? " norm inside" : " norm apart") + " hpb " + std::to_string(hpb));
        auto [mixer, u, dout] = random_layer(lc.c, 2, 100, uint32_t(3500 + hpb));
        CoreLayerStep step(mixer, u, dout);
        step.train.set_epilogue_heads(hpb);
        step.train.set_bc_norm_fusion(fused);
        auto run = [&](bool prefetch) {
          step.train.set_rotation_prefetch(prefetch);
          return step.run();
        };
        const GpuResult with = run(true), without = run(false);
        ASSERT_NO_FATAL_FAILURE(assert_finite(without));
        EXPECT_TRUE(bit_identical(with, without)) << "the prefetch changed bits";
      }
}

// The SISO rotation backward at N 128 with a lane on the rotary pairs l and l + 32 (and with a warp's next token loaded
// into registers ahead) against four consecutive elements per lane: the same bits, with the B/C norm inside and apart,
// one and the default heads per block, the angle totals on and off, S 32 (the presets) and 64 (every pair rotates),
// whole and partial last chunks.
TEST(Mamba3TrainGpu, RotationSplitLanesKeepTheBits) {
  MAMBA3_REQUIRE_GPU();
  for (const double rope : {0.5, 1.0})
    for (const bool fused : {true, false})
      for (const int hpb : {0, 1})
        for (const int64_t L : {128, 100}) {
          Mamba3Config c = small(false, 1);
          c.d_model = 128, c.d_state = 128, c.headdim = 64, c.rope_fraction = rope;  // 4 heads
          SCOPED_TRACE("rope " + std::to_string(rope) + (fused ? " norm inside" : " norm apart") + " hpb " +
                       std::to_string(hpb) + " L " + std::to_string(L));
          auto [mixer, u, dout] = random_layer(c, 2, L, uint32_t(3600 + hpb + L));
          CoreLayerStep step(mixer, u, dout);
          step.train.set_epilogue_heads(hpb);
          step.train.set_bc_norm_fusion(fused);
          step.train.set_rotation_totals(L == 128);
          auto run = [&](bool split, bool pipe) {
            step.train.set_rotation_split(split);
            step.train.set_rotation_pipe(pipe);
            return step.run();
          };
          const GpuResult piped = run(true, true), split = run(true, false), consecutive = run(false, false);
          ASSERT_NO_FATAL_FAILURE(assert_finite(piped));
          EXPECT_TRUE(bit_identical(split, consecutive)) << "the lane map changed bits";
          EXPECT_TRUE(bit_identical(piped, consecutive)) << "the next token in registers changed bits";
        }
}

// The SISO rotation backward summing dφ over each angle segment for the angle backward (set_rotation_totals) against
// the angle backward's totals kernel: the output, du and every gradient the same bits, with the B/C norm inside and
// apart, one and the default heads per block, whole and partial last segments (L 64, 65, 300), and the 125M layer's
// 24 heads. It must run where its shapes take it (S 16 and 32, chunks of 64 tokens) and nowhere else (S 8; L < 64).
TEST(Mamba3TrainGpu, RotationTotalsGiveTheKernelsBits) {
  MAMBA3_REQUIRE_GPU();
  const std::vector<LayerCase> cases = siso_cases_with_125m_tiles();
  int ran = 0;
  for (const LayerCase& lc : cases)
    for (const bool fused : {true, false})
      for (const int hpb : {0, 1})
        for (const int64_t L : {64, 65, 300, 40}) {
          if (lc.c.d_model == 768 && (!fused || hpb != 0 || L == 40)) continue;  // (one big case)
          SCOPED_TRACE(std::string(lc.name) + (fused ? " norm inside" : " norm apart") + " hpb " + std::to_string(hpb) +
                       " L=" + std::to_string(L));
          auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(3700 + L + hpb));
          CoreLayerStep step(mixer, u, dout);
          step.train.set_epilogue_heads(hpb);
          step.train.set_bc_norm_fusion(fused);
          const int64_t S = lc.c.num_angles();
          const bool applies = (S == 16 || S == 32) && L >= 64;
          auto run = [&](bool on) {
            step.train.set_rotation_totals(on);
            GpuResult r = step.run();
            EXPECT_EQ(step.train.last_backward_rotation_totals(), on && applies) << "S " << S;
            return r;
          };
          const GpuResult kernel = run(false), rotation = run(true);
          ASSERT_NO_FATAL_FAILURE(assert_finite(rotation));
          EXPECT_TRUE(bit_identical(rotation, kernel)) << "the rotation backward's segment sums changed bits";
          ran += applies;
        }
  EXPECT_GT(ran, 0) << "no case took the rotation backward's segment sums";
}

// Z = q·H_cᵀ and the pre-norm output y in bf16 between the SISO forward core and the output-stage backward (y as the
// forward formed it, rounded once) against Z and W·v in f32: the output unchanged bit for bit (the forward core forms
// o from its registers either way), du and every gradient within kTolZy16 (y's bf16 rounding reaches every gradient
// through the output norm and gate: measured up to ~1e-2 on the bias gradients of the tiny random layers, whose sums
// cancel), with a kept and a recomputed forward, both output-backward kernels (L 192: whole chunks; L 65: the
// general one), deterministic; the bf16 path must run where its shapes apply.
TEST(Mamba3TrainGpu, BfloatZyTracksTheF32Pair) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(true))
    for (const int64_t L : {65, 192})
      for (const bool keep : {true, false}) {
        SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (keep ? " kept" : " recomputed"));
        auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(3700 + L));
        CoreLayerStep step(mixer, u, dout);
        auto run = [&](bool zy16) {
          step.train.set_zy16(zy16);
          GpuResult r = step.run(keep);
          EXPECT_EQ(step.train.zy16_used(), zy16 && !lc.c.is_mimo) << "the switch did not select the path";
          return r;
        };
        const GpuResult f32 = run(false), b16 = run(true), again = run(true);
        ASSERT_NO_FATAL_FAILURE(assert_finite(b16));
        EXPECT_TRUE(bit_identical(b16, again)) << "not deterministic";
        EXPECT_EQ(std::memcmp(f32.out.raw(), b16.out.raw(), f32.out.nbytes()), 0) << "the forward moved";
        double worst = 0;
        std::string where;
        compare(b16, f32.out, f32.du, f32.grads, 0.0, kTolZy16, worst, where);
        std::printf("  %-34s L=%-3lld %s bf16 Z, y vs f32: worst %.2e (%s)\n", lc.name, (long long)L,
                    keep ? "kept      " : "recomputed", worst, where.c_str());
      }
}

// MIMO's backward core with the state products in it (after the reverse chain: dK's second term in the core's
// accumulators, tp written by the core) against the batched products it replaces: to rounding (the products sum in
// cuBLAS's order), deterministic, with and without a kept forward, in both block widths; and no effect on SISO (its
// fused core is another test's).
TEST(Mamba3TrainGpu, MimoStateCoreMatchesTheProducts) {
  MAMBA3_REQUIRE_GPU();
  struct Restore {
    ~Restore() { cuda::train_detail::set_fused_core_wide(true); }
  } restore;
  for (const LayerCase& lc : core_shape_cases(true)) {
    if (!lc.c.is_mimo) continue;
    for (const int64_t L : {65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      const Mamba3Config& cfg = lc.c;
      const int64_t B = 2;
      auto [mixer, u, dout] = random_layer(cfg, B, L, uint32_t(1900 + L));
      CoreLayerStep step(mixer, u, dout);
      step.train.set_state_chain(true);
      step.train.set_dqk16(false);  // (the products path keeps f32 dQ/dK; bf16 ones: BfloatDqDkTracksTheF32Pair)
      ASSERT_TRUE(step.train.uses_chunk_cores(true, L)) << "the shape should take the cores";
      auto run = [&](bool in_core, bool keep) {
        step.train.set_backward_core_fused(in_core);
        return step.run(keep);
      };
      for (const bool keep : {false, true}) {
        SCOPED_TRACE(keep ? "kept forward" : "recomputed forward");
        const GpuResult products = run(false, keep);
        for (const bool wide : {true, false}) {
          SCOPED_TRACE(wide ? "8 warps" : "4 warps");
          cuda::train_detail::set_fused_core_wide(wide);
          const GpuResult core = run(true, keep), again = run(true, keep);
          ASSERT_NO_FATAL_FAILURE(assert_finite(core));
          EXPECT_TRUE(bit_identical(core, again)) << "not deterministic";
          double worst = 0;
          std::string where;
          compare(core, products.out, products.du, products.grads, kTolChainVsPass, kTolChainVsPass, worst, where);
          std::printf("  %-32s L=%-3lld %s %s: core vs products worst %.2e (%s)\n", lc.name, (long long)L,
                      keep ? "kept" : "recomputed", wide ? "8 warps" : "4 warps", worst, where.c_str());
        }
      }
    }
  }
}

// Runs body(case name, L, keep, step) for every MIMO layer on the chunk cores' shapes, L 65 and 300 (a partial last
// chunk), with a recomputed and a kept forward, each on its own random layer (seeded from seed + L); fails when there
// is no such case.
template <typename Body>
void for_each_mimo_core_case(uint32_t seed, Body body) {
  int cases = 0;
  for (const LayerCase& lc : core_shape_cases(true)) {
    if (!lc.c.is_mimo) continue;
    for (const int64_t L : {65, 300})
      for (const bool keep : {false, true}) {
        SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L) + (keep ? " kept" : " recomputed"));
        auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(seed + L));
        CoreLayerStep step(mixer, u, dout);
        body(lc.name, L, keep, step);
        ++cases;
      }
  }
  EXPECT_GT(cases, 0) << "no MIMO case on the cores' shapes";
}

// MIMO's state core running the epilogue's state part against the epilogue kernel reading tp and dV back: dv and dx
// are the same expressions, only the sums Σ_p v·tp, ⟨dH, H_c⟩ and the mimo_x partials run in other orders, so the
// output is the same bits and the gradients agree to a few roundings of those sums (they reach mimo_x and Λ's and
// scale's state-carry terms: dt, A, trap and, through them, du). With and without a kept forward.
TEST(Mamba3TrainGpu, MimoEpilogueInCoreTracksTheKernel) {
  MAMBA3_REQUIRE_GPU();
  for_each_mimo_core_case(4100, [](const char* name, int64_t L, bool keep, CoreLayerStep& step) {
    step.train.set_state_chain(true);
    step.train.set_backward_core_fused(true);
    auto run = [&](bool in_core) {
      step.train.set_mimo_epilogue_in_core(in_core);
      GpuResult r = step.run(keep);
      EXPECT_EQ(step.train.mimo_epilogue_in_core_used(), in_core) << "the switch did not select the path";
      return r;
    };
    const GpuResult kernel = run(false), in_core = run(true), again = run(true);
    ASSERT_NO_FATAL_FAILURE(assert_finite(in_core));
    EXPECT_TRUE(bit_identical(in_core, again)) << "not deterministic";
    EXPECT_EQ(std::memcmp(kernel.out.raw(), in_core.out.raw(), in_core.out.nbytes()), 0) << "the forward moved";
    double worst = 0;
    std::string where;
    compare(in_core, kernel.out, kernel.du, kernel.grads, 0.0, kTolEpilogueInCore, worst, where);
    std::printf("  %-34s L=%-3lld %s epilogue in core vs kernel: worst %.2e (%s)\n", name, (long long)L,
                keep ? "kept      " : "recomputed", worst, where.c_str());
  });
}

// MIMO's forward core storing the pre-norm output y for the output stage against the output stage forming it from
// W·v, Z and v: y is one expression with its roundings spelled out (chunk_row_y) in both, so the output and every
// gradient are the same bits. With and without a kept forward (a kept forward's choice holds for its backward).
TEST(Mamba3TrainGpu, MimoForwardCoreYGivesTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  for_each_mimo_core_case(4300, [](const char*, int64_t, bool keep, CoreLayerStep& step) {
    auto run = [&](bool y) {
      step.train.set_mimo_y(y);
      GpuResult r = step.run(keep);
      EXPECT_EQ(step.train.mimo_y_used(), y) << "the switch did not select the path";
      return r;
    };
    const GpuResult formed = run(false), stored = run(true);
    ASSERT_NO_FATAL_FAILURE(assert_finite(stored));
    EXPECT_TRUE(bit_identical(stored, formed)) << "y stored by the forward core moved a bit";
  });
}

// The batched column sums (one launch per level for all of a layer's parameter sums) against one colsum_add per sum
// and a float64 host sum: the same bits as colsum_add (the same per-block order), and close to the exact sums, for
// sums within one row segment and over several (two levels), with columns not a multiple of 32.
TEST(Mamba3TrainGpu, BatchedColumnSumsMatchSingleOnes) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(31);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{8, 24}, {256, 3072}, {5000, 130}, {1, 1}, {3001, 33}};
  std::vector<Tensor> ins, outs0;
  std::vector<cuda::DeviceBuffer> din, dout_single, dout_batch, dscratch;
  for (const auto& [rows, cols] : shapes) {
    ins.push_back(random_tensor(rng, {rows, cols}));
    outs0.push_back(random_tensor(rng, {cols}));
    din.push_back(to_device_activation(ins.back(), Precision::F32));
    dout_single.push_back(to_device_activation(outs0.back(), Precision::F32));
    dout_batch.push_back(to_device_activation(outs0.back(), Precision::F32));
    dscratch.emplace_back(cuda::train_detail::colsum_scratch_floats(rows, cols) * sizeof(float));
  }
  std::vector<cuda::train_detail::ColsumJob> jobs;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [rows, cols] = shapes[i];
    cuda::train_detail::colsum_add(ctx.stream(), din[i].as<float>(), rows, cols, dout_single[i].as<float>(),
                                   dscratch[i].as<float>());
    jobs.push_back({din[i].as<float>(), rows, cols, dout_batch[i].as<float>(), dscratch[i].as<float>()});
  }
  ctx.sync();
  cuda::train_detail::colsum_add_batch(ctx.stream(), jobs.data(), int(jobs.size()));
  ctx.sync();
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [rows, cols] = shapes[i];
    SCOPED_TRACE("rows " + std::to_string(rows) + " cols " + std::to_string(cols));
    const Tensor single = from_device_f32(dout_single[i].raw(), {cols}), batch = from_device_f32(dout_batch[i].raw(), {cols});
    EXPECT_EQ(std::memcmp(single.raw(), batch.raw(), single.nbytes()), 0) << "not colsum_add's bits";
    Tensor exact = Tensor::empty(DType::F32, {cols});
    for (int64_t c = 0; c < cols; ++c) {
      double acc = outs0[i].data<float>()[c];
      for (int64_t r = 0; r < rows; ++r) acc += ins[i].data<float>()[r * cols + c];
      exact.data<float>()[c] = float(acc);
    }
    EXPECT_LE(rel_l2(batch, exact), 1e-4);
  }
}

// The angle kernels' three forms — segment blocks over all heads (scan and backward), the fused scan (one kernel per
// head and tile of angles), the split scan (local scans, carries, finish pass) with the per-angle backward — give the
// same φ and dφ sums bit for bit, so the same output and gradients, in the f32 and bf16 modes, on every layer case
// (no_rotary, odd angle counts, MIMO) and on layers of 24 and 30 heads (the block backward's warps taking one or two
// heads; at S = 32 with Δ's shares summed after the walk or by the warp, and 25 heads: two per warp), lengths within a
// segment, across segments, a partial tile of the backward (L 300: a last segment of 44 tokens) and past the fused
// kernel's reach (L 4097: blocks, then split).
TEST(Mamba3TrainGpu, FusedAnglesGiveTheSplitBits) {
  MAMBA3_REQUIRE_GPU();
  using cuda::train_detail::AnglesMode;
  struct Restore {
    ~Restore() {
      cuda::train_detail::set_angles_mode(AnglesMode::kBlocks);
      cuda::train_detail::set_angle_shares_in_pass(-1);
    }
  } restore;
  std::vector<LayerCase> cases = tensor_core_cases();
  // Many heads: 24 (the 125M shape's heads and S 32: one warp per head) and 30 (the block backward's warps take two).
  Mamba3Config c = small(false, 1);
  c.d_model = 96, c.headdim = 8, c.d_state = 128;
  cases.push_back({"siso 24 heads d_state 128", c});
  c.d_model = 120, c.d_state = 64;
  cases.push_back({"siso 30 heads d_state 64", c});
  c.d_model = 100, c.d_state = 128;  // S 32 with two heads per warp (the most heads the 48 KB of shared memory take)
  cases.push_back({"siso 25 heads d_state 128", c});
  for (const LayerCase& lc : cases)
    for (const int64_t L : {1, 63, 65, 300, 4097}) {
      if (L == 4097 && (lc.c.d_state != 128 || lc.c.d_model >= 96)) continue;  // one long case
      if (lc.c.d_model >= 96 && (L == 1 || L == 63)) continue;
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      auto [mixer, u, dout] = random_layer(lc.c, L == 4097 ? 1 : 2, L, uint32_t(70 + L));
      for (const Precision p : {Precision::F32, Precision::BF16}) {
        cuda::train_detail::set_angles_mode(AnglesMode::kSplit);
        // (f32 angles in every mode: the blocks mode would keep bf16's as codes, AngleCodesTrackTheF32Angles)
        const GpuResult split = run_gpu(mixer, u, dout, p, true, true, 0, true, 0, false);
        for (int64_t i = 0; i < split.du.numel(); ++i) ASSERT_TRUE(std::isfinite(split.du.data<float>()[i]));
        for (const AnglesMode mode : {AnglesMode::kFused, AnglesMode::kBlocks}) {
          cuda::train_detail::set_angles_mode(mode);
          // The block backward's S = 32 form both ways: Δ's shares summed after the walk and by the warp in it.
          for (const int shares_in_pass : {1, 0}) {
            if (mode == AnglesMode::kFused && shares_in_pass == 0) continue;
            cuda::train_detail::set_angle_shares_in_pass(shares_in_pass);
            const GpuResult got = run_gpu(mixer, u, dout, p, true, true, 0, true, 0, false);
            EXPECT_TRUE(bit_identical(got, split))
                << precision_name(p)
                << (mode == AnglesMode::kBlocks ? (shares_in_pass ? " blocks" : " blocks, warp shares") : " fused");
          }
        }
      }
    }
}

// The bf16 mode with u's rounding given by its producer (u16; u given too, or null): the in_proj products read it
// instead of rounding u, so the output and every gradient are the same bits, with and without kept activations;
// likewise dout's (dout16, from the norm backward) for the out_proj products.
TEST(Mamba3TrainGpu, RoundedInputGivesTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : tensor_core_cases()) {
    SCOPED_TRACE(lc.name);
    const Mamba3Config& c = lc.c;
    const int64_t B = 2, L = 97;
    auto [mixer, u, dout] = random_layer(c, B, L, 12);
    cuda::Context ctx;
    cuda::TrainGemm gemm(Precision::BF16);
    cuda::Mamba3TrainGpu train(c);
    train.set_chunk_batched(true);
    DeviceLayer layer(mixer);
    cuda::DeviceBuffer ud = to_device_activation(u, Precision::F32), dd = to_device_activation(dout, Precision::F32);
    cuda::DeviceBuffer u16(size_t(B * L * c.d_model) * 2), out(ud.bytes()), du(ud.bytes());
    cuda::f32_to_bf16_2d(ctx.stream(), ud.as<float>(), B * L, c.d_model, c.d_model, u16.as<uint16_t>());
    cuda::DeviceBuffer dout16(size_t(B * L * c.d_model) * 2);
    cuda::f32_to_bf16_2d(ctx.stream(), dd.as<float>(), B * L, c.d_model, c.d_model, dout16.as<uint16_t>());
    cuda::Mamba3TrainActivations kept;
    auto step = [&](const float* uin, const uint16_t* uin16, bool keep, const uint16_t* dout_16 = nullptr) {
      layer.zero_grads();
      poison(du.raw(), du.bytes());
      poison(out.raw(), out.bytes());
      train.forward(ctx, gemm, layer.weights(), B, L, uin, out.as<float>(), keep ? &kept : nullptr, uin16);
      train.backward(ctx, gemm, layer.weights(), layer.grads(), B, L, uin, dd.as<float>(), du.as<float>(),
                     keep ? &kept : nullptr, uin16, dout_16);
      ctx.sync();
      return std::make_tuple(from_device_f32(out.raw(), {B, L, c.d_model}), from_device_f32(du.raw(), {B, L, c.d_model}),
                             layer.download_grads());
    };
    for (const bool keep : {false, true}) {
      SCOPED_TRACE(keep ? "kept forward" : "recomputed forward");
      const auto [out_ref, du_ref, g_ref] = step(ud.as<float>(), nullptr, keep);
      for (int64_t i = 0; i < du_ref.numel(); ++i) ASSERT_TRUE(std::isfinite(du_ref.data<float>()[i])) << "du " << i;
      for (const bool with_u : {true, false}) {
        SCOPED_TRACE(with_u ? "u and u16" : "u16 alone");
        const auto [out_got, du_got, g_got] = step(with_u ? ud.as<float>() : nullptr, u16.as<uint16_t>(), keep);
        EXPECT_EQ(std::memcmp(out_ref.raw(), out_got.raw(), out_ref.nbytes()), 0) << "out";
        EXPECT_EQ(std::memcmp(du_ref.raw(), du_got.raw(), du_ref.nbytes()), 0) << "du";
        for (const auto& [name, t] : g_ref)
          EXPECT_EQ(std::memcmp(t.raw(), g_got.at(name).raw(), t.nbytes()), 0) << "grad." << name;
      }
      const auto [out_got, du_got, g_got] = step(ud.as<float>(), nullptr, keep, dout16.as<uint16_t>());
      EXPECT_EQ(std::memcmp(du_ref.raw(), du_got.raw(), du_ref.nbytes()), 0) << "du with dout16";
      for (const auto& [name, t] : g_ref)
        EXPECT_EQ(std::memcmp(t.raw(), g_got.at(name).raw(), t.nbytes()), 0) << "grad." << name << " with dout16";
    }
  }
}

// The bf16 mode's dzx (in_proj's output gradient) rounded to bf16 by the kernels that write it (the output stage:
// z columns, the epilogue: x, the angle/scalar backward: dt, A, trap, the B/C norm backward: B, C, angles), read by
// du = dzx·W_in and dW_in += dzxᵀ·u, against rounding all of dzx afterwards (set_dzx_bf16(false), TrainGemm::HeldA):
// du and every gradient the same bits on the tensor-core cases (SISO, MIMO R 2–4, groups, output norm, euler,
// no_rotary, A_floor, N 128/P 64), L = 130 (a partial last chunk), batch 2, with the forward recomputed or kept. A
// backward on another dout runs first, so that a column its writers missed would hold that call's stale values, and
// the switch must take effect (the products read the producers' copy).
TEST(Mamba3TrainGpu, DzxRoundedByItsWritersGivesTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : tensor_core_cases()) {
    SCOPED_TRACE(lc.name);
    const Mamba3Config& c = lc.c;
    const int64_t B = 2, L = 130;
    auto [mixer, u, dout] = random_layer(c, B, L, 14);
    std::mt19937 rng(15);
    const Tensor dout_other = random_tensor(rng, {B, L, c.d_model});
    cuda::Context ctx;
    cuda::TrainGemm gemm(Precision::BF16);
    cuda::Mamba3TrainGpu train(c);
    train.set_chunk_batched(true);
    DeviceLayer layer(mixer);
    cuda::DeviceBuffer ud = to_device_activation(u, Precision::F32), dd = to_device_activation(dout, Precision::F32);
    cuda::DeviceBuffer dd_other = to_device_activation(dout_other, Precision::F32);
    cuda::DeviceBuffer out(ud.bytes()), du(ud.bytes());
    cuda::Mamba3TrainActivations kept;
    auto step = [&](bool dzx16, bool keep, const cuda::DeviceBuffer& g_out) {
      train.set_dzx_bf16(dzx16);
      layer.zero_grads();
      poison(du.raw(), du.bytes());
      train.forward(ctx, gemm, layer.weights(), B, L, ud.as<float>(), out.as<float>(), keep ? &kept : nullptr);
      train.backward(ctx, gemm, layer.weights(), layer.grads(), B, L, ud.as<float>(), g_out.as<float>(),
                     du.as<float>(), keep ? &kept : nullptr);
      ctx.sync();
      EXPECT_EQ(train.last_backward_read_dzx16(), dzx16)
          << (dzx16 ? "the chunk stage did not take dzx16 (BatchedParams::dzx16, set in batched_chunks)"
                    : "dzx16 read although switched off");
      return std::make_pair(from_device_f32(du.raw(), {B, L, c.d_model}), layer.download_grads());
    };
    for (const bool keep : {false, true}) {
      SCOPED_TRACE(keep ? "kept forward" : "recomputed forward");
      step(true, keep, dd_other);  // leaves another backward's values in the bf16 copy
      const auto [du_ref, g_ref] = step(false, keep, dd);
      for (int64_t i = 0; i < du_ref.numel(); ++i) ASSERT_TRUE(std::isfinite(du_ref.data<float>()[i])) << "du " << i;
      const auto [du_got, g_got] = step(true, keep, dd);
      EXPECT_EQ(std::memcmp(du_ref.raw(), du_got.raw(), du_ref.nbytes()), 0) << "du";
      for (const auto& [name, t] : g_ref)
        EXPECT_EQ(std::memcmp(t.raw(), g_got.at(name).raw(), t.nbytes()), 0) << "grad." << name;
    }
  }
}

// z, x and dO in bf16 (set_zx_bf16, the default) against f32: the in_proj writes its z and x columns rounded to bf16
// (as autocast's linear gives them) and the dO product its result, and the chunk kernels read those. out, du and every
// gradient move by about a bf16 rounding of z and dO (x reaches the products as bf16 either way): within the bf16
// projections' bound (the small parameters' gradients, sums over every token, move most: 0.4–1.7 % on the H200),
// and something must move. With a kept forward, the f32 zx is poisoned (NaN in every column) between two identical
// steps: the in_proj rewrites only the columns after z and x, so a kernel still reading z or x from zx there would
// turn the second step's results to NaN or change their bits. SISO (its instances and the generic kernels) on the
// cores' shapes, L 65 and 300 (padded last chunks), batch 2; MIMO keeps f32 z, x and dO (set_zx_bf16), so there the
// switch must change no bit.
TEST(Mamba3TrainGpu, BfloatZxTracksTheF32Zx) {
  MAMBA3_REQUIRE_GPU();
  for (const LayerCase& lc : core_shape_cases(true))
    for (const int64_t L : {65, 300}) {
      SCOPED_TRACE(std::string(lc.name) + " L=" + std::to_string(L));
      auto [mixer, u, dout] = random_layer(lc.c, 2, L, uint32_t(2500 + L));
      CoreLayerStep step(mixer, u, dout);
      for (const bool instances : {true, false}) {
        SCOPED_TRACE(instances ? "SISO/MIMO instances" : "generic kernels");
        step.train.set_siso_kernels(instances);
        for (const bool keep : {false, true}) {
          SCOPED_TRACE(keep ? "kept forward" : "recomputed forward");
          step.train.set_zx_bf16(false);
          const GpuResult f32 = step.run(keep);
          step.train.set_zx_bf16(true);
          const GpuResult b16 = step.run(keep);
          ASSERT_NO_FATAL_FAILURE(assert_finite(b16));
          if (lc.c.is_mimo) {
            EXPECT_TRUE(bit_identical(f32, b16)) << "MIMO's z, x and dO should stay f32";
            continue;
          }
          EXPECT_FALSE(bit_identical(f32, b16)) << "the switch changed nothing";
          if (keep) {
            ASSERT_GT(step.kept.zx.bytes(), 0u);
            poison(step.kept.zx.raw(), step.kept.zx.bytes());
            const GpuResult again = step.run(true);
            ASSERT_NO_FATAL_FAILURE(assert_finite(again));
            EXPECT_TRUE(bit_identical(b16, again)) << "a kernel read z or x from the f32 zx (or not deterministic)";
          }
          double worst = 0;
          std::string where;
          compare(b16, f32.out, f32.du, f32.grads, kTolBF16, kTolBF16, worst, where);
          std::printf("  %-34s L=%-3lld %-9s %-10s bf16 vs f32 z/x/dO worst %.2e (%s)\n", lc.name, (long long)L,
                      instances ? "instances" : "generic", keep ? "kept" : "recomputed", worst, where.c_str());
        }
      }
    }
}

}  // namespace
}  // namespace mamba3::test
