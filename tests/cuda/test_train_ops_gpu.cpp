// The dense ops of GPU training against their CPU counterparts, on awkward shapes (rows 1/3/67/300, D 48/130,
// d_ff 70, Vp 259 and a few thousand): RMSNorm/LayerNorm forward and backward, GatedMLP forward and backward,
// the lm_head + cross-entropy (ignored targets, several row blocks; the bf16 mode's bf16 logits and their softmax
// against float64 and against the f32 mode), the embedding backward (a CPU scatter-add),
// and AdamW with gradient clipping and accumulation over several steps. Relative L2 within 1e-5 in the exact f32
// mode and 2e-2 with bf16 matrix products. Outputs that are overwritten start as NaN; accumulated (+=) outputs
// start random and their increments are compared. Every reduction is run twice and must repeat bit for bit.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "cuda/train/adamw_gpu.h"
#include "cuda/train/embedding_train_gpu.h"
#include "cuda/train/gated_mlp_train_gpu.h"
#include "cuda/train/lm_head_loss_gpu.h"
#include "cuda/train/norm_train_gpu.h"
#include "cuda/train/train_gemm.h"
#include "gpu_test_util.h"
#include "ops/norm.h"
#include "ops/norm_backward.h"
#include "support/test_support.h"
#include "train/gated_mlp_grad.h"
#include "train/lm_head_loss.h"
#include "train/optimizer.h"

namespace mamba3::test {
namespace {

using cuda::DeviceBuffer;
using cuda::Precision;

double tol_for(Precision p) { return p == Precision::F32 ? 1e-5 : 2e-2; }

// Uploads and waits, so kernels on the context's (non-blocking) stream see the data.
DeviceBuffer up(const Tensor& t) {
  DeviceBuffer b(t.nbytes());
  b.upload(t.raw(), t.nbytes());
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  return b;
}
DeviceBuffer poisoned(int64_t floats) {
  DeviceBuffer b(size_t(floats) * sizeof(float));
  poison(b.raw(), b.bytes());
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  return b;
}
Tensor down(const DeviceBuffer& b, Shape shape) { return from_device_f32(b.raw(), std::move(shape)); }
// The first numel(shape) bf16 values of b, as f32.
Tensor down_bf16(const DeviceBuffer& b, Shape shape) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  std::vector<uint16_t> bits(size_t(t.numel()));
  MAMBA3_CUDA_CHECK(cudaMemcpy(bits.data(), b.raw(), bits.size() * 2, cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = bf16_to_f32(bits[size_t(i)]);
  return t;
}

Tensor minus(const Tensor& a, const Tensor& b) {
  Tensor d = a.clone();
  for (int64_t i = 0; i < d.numel(); ++i) d.data<float>()[i] -= b.data<float>()[i];
  return d;
}
bool same_bits(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

struct Shape2 {
  int64_t rows, D;
};
// Widths 48 and 130 take the generic kernels, 256 the register-row ones, 768 those in the residual step only.
const Shape2 kNormShapes[] = {{1, 48}, {3, 130}, {67, 48}, {300, 130}, {300, 48}, {4099, 130}, {37, 256}, {301, 768}};

// ---------------------------------------------------------------------------------------------------------- norms

TEST(TrainOpsGpu, NormForwardMatchesCpu) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(1);
  for (const auto [rows, D] : kNormShapes)
    for (bool layer : {false, true}) {
      SCOPED_TRACE(fmt::format("rows {} D {} {}", rows, D, layer ? "LayerNorm" : "RMSNorm"));
      const Tensor x = random_tensor(rng, {rows, D}, -1.5f, 2.5f), w = random_tensor(rng, {D}, 0.5f, 1.5f),
                   b = random_tensor(rng, {D}, -0.5f, 0.5f);
      Tensor ref = Tensor::empty(DType::F32, {rows, D});
      if (layer)
        layernorm(x.data<float>(), rows, D, w.data<float>(), b.data<float>(), 1e-5f, ref.data<float>());
      else
        rmsnorm(x.data<float>(), rows, D, w.data<float>(), 1e-5f, ref.data<float>());
      DeviceBuffer dx = up(x), dw = up(w), db = up(b), dy = poisoned(rows * D);
      cuda::norm_forward_gpu(ctx.stream(), dx.as<float>(), rows, D, dw.as<float>(), layer ? db.as<float>() : nullptr,
                             1e-5f, dy.as<float>());
      EXPECT_LE(rel_l2(down(dy, {rows, D}), ref), 1e-6);
      // In place (y aliases x), as ops/norm.h allows.
      cuda::norm_forward_gpu(ctx.stream(), dx.as<float>(), rows, D, dw.as<float>(), layer ? db.as<float>() : nullptr,
                             1e-5f, dx.as<float>());
      EXPECT_TRUE(same_bits(down(dx, {rows, D}), down(dy, {rows, D})));
    }
}

// The residual step before a norm: res = prev + hidden (bit-exact: one f32 add) and its norm against the CPU's; with
// no hidden a copy of prev; y written over hidden (the trainer's final norm) gives the same bits.
TEST(TrainOpsGpu, ResidualNormForwardMatchesCpu) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(5);
  for (const auto [rows, D] : kNormShapes)
    for (bool layer : {false, true})
      for (bool with_hidden : {true, false}) {
        SCOPED_TRACE(fmt::format("rows {} D {} {} hidden {}", rows, D, layer ? "LayerNorm" : "RMSNorm", with_hidden));
        const Tensor prev = random_tensor(rng, {rows, D}, -1.5f, 2.5f), hid = random_tensor(rng, {rows, D});
        const Tensor w = random_tensor(rng, {D}, 0.5f, 1.5f), b = random_tensor(rng, {D}, -0.5f, 0.5f);
        Tensor res = prev.clone();
        if (with_hidden)
          for (int64_t i = 0; i < res.numel(); ++i) res.data<float>()[i] = prev.data<float>()[i] + hid.data<float>()[i];
        Tensor ref = Tensor::empty(DType::F32, {rows, D});
        if (layer)
          layernorm(res.data<float>(), rows, D, w.data<float>(), b.data<float>(), 1e-5f, ref.data<float>());
        else
          rmsnorm(res.data<float>(), rows, D, w.data<float>(), 1e-5f, ref.data<float>());
        DeviceBuffer dp = up(prev), dh = up(hid), dw = up(w), db = up(b), dres = poisoned(rows * D),
                     dy = poisoned(rows * D);
        const float* hidden = with_hidden ? dh.as<float>() : nullptr;
        const float* bias = layer ? db.as<float>() : nullptr;
        cuda::residual_norm_forward_gpu(ctx.stream(), dp.as<float>(), hidden, rows, D, dw.as<float>(), bias, 1e-5f,
                                        dres.as<float>(), dy.as<float>());
        EXPECT_TRUE(same_bits(down(dres, {rows, D}), res)) << "residual";
        EXPECT_LE(rel_l2(down(dy, {rows, D}), ref), 1e-6) << "norm";
        // y over hidden, res over prev (both aliases the trainer uses).
        cuda::residual_norm_forward_gpu(ctx.stream(), dp.as<float>(), hidden, rows, D, dw.as<float>(), bias, 1e-5f,
                                        dp.as<float>(), with_hidden ? dh.as<float>() : dy.as<float>());
        EXPECT_TRUE(same_bits(down(dp, {rows, D}), res)) << "residual in place";
        if (with_hidden) {
          EXPECT_TRUE(same_bits(down(dh, {rows, D}), down(dy, {rows, D}))) << "y over hidden";
        }
      }
}

TEST(TrainOpsGpu, NormBackwardMatchesCpuAndRepeats) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::NormGradScratch scratch;
  std::mt19937 rng(2);
  for (const auto [rows, D] : kNormShapes)
    for (bool layer : {false, true})
      for (bool accumulate : {false, true}) {
        SCOPED_TRACE(fmt::format("rows {} D {} {} accumulate {}", rows, D, layer ? "LayerNorm" : "RMSNorm",
                                 accumulate));
        const Tensor x = random_tensor(rng, {rows, D}, -1.5f, 2.5f), g = random_tensor(rng, {rows, D}),
                     w = random_tensor(rng, {D}, 0.5f, 1.5f), b = random_tensor(rng, {D}, -0.5f, 0.5f);
        const Tensor dx0 = random_tensor(rng, {rows, D}), dw0 = random_tensor(rng, {D}, -5.0f, 5.0f),
                     db0 = random_tensor(rng, {D}, -5.0f, 5.0f);
        Tensor dx_ref = dx0.clone(), dw_ref = dw0.clone(), db_ref = db0.clone();
        if (layer)
          layernorm_backward(x.data<float>(), g.data<float>(), rows, D, w.data<float>(), 1e-5f,
                             dx_ref.data<float>(), dw_ref.data<float>(), db_ref.data<float>(), accumulate);
        else
          rmsnorm_backward(x.data<float>(), g.data<float>(), rows, D, w.data<float>(), 1e-5f, dx_ref.data<float>(),
                           dw_ref.data<float>(), accumulate);
        DeviceBuffer dev_x = up(x), dev_g = up(g), dev_w = up(w), dev_b = up(b);
        Tensor results[2][3];
        for (auto& res : results) {  // twice from the same start: the sums must repeat bit for bit
          DeviceBuffer dev_dx = accumulate ? up(dx0) : poisoned(rows * D), dev_dw = up(dw0), dev_db = up(db0);
          cuda::norm_backward_gpu(ctx.stream(), dev_x.as<float>(), dev_g.as<float>(), rows, D, dev_w.as<float>(),
                                  layer ? dev_b.as<float>() : nullptr, 1e-5f, dev_dx.as<float>(), accumulate,
                                  dev_dw.as<float>(), layer ? dev_db.as<float>() : nullptr, scratch);
          res[0] = down(dev_dx, {rows, D});
          res[1] = down(dev_dw, {D});
          res[2] = down(dev_db, {D});
        }
        const Tensor& got_dx = results[0][0];
        EXPECT_LE(rel_l2(accumulate ? minus(got_dx, dx0) : got_dx, accumulate ? minus(dx_ref, dx0) : dx_ref), 1e-5);
        EXPECT_LE(rel_l2(minus(results[0][1], dw0), minus(dw_ref, dw0)), 1e-5) << "dw";
        if (layer) {
          EXPECT_LE(rel_l2(minus(results[0][2], db0), minus(db_ref, db0)), 1e-5) << "db";
        } else {
          EXPECT_TRUE(same_bits(results[0][2], db0)) << "RMSNorm touched db";
        }
        for (int k = 0; k < 3; ++k) EXPECT_TRUE(same_bits(results[0][k], results[1][k])) << "not repeatable " << k;
        if (!accumulate) {  // dx may alias dy
          DeviceBuffer dev_gx = up(g), dev_dw = up(dw0), dev_db = up(db0);
          cuda::norm_backward_gpu(ctx.stream(), dev_x.as<float>(), dev_gx.as<float>(), rows, D, dev_w.as<float>(),
                                  layer ? dev_b.as<float>() : nullptr, 1e-5f, dev_gx.as<float>(), false,
                                  dev_dw.as<float>(), layer ? dev_db.as<float>() : nullptr, scratch);
          EXPECT_TRUE(same_bits(down(dev_gx, {rows, D}), results[0][0])) << "dx aliasing dy";
          EXPECT_TRUE(same_bits(down(dev_dw, {D}), results[0][1])) << "dw with dx aliasing dy";
        }
      }
}

// The register-row kernels (D = 32·k) and the staged backward rows (wider D, D % 4 == 0; here 768, 1156 and 2048
// with a last block of fewer rows; 20,011 rows: more than 2048 blocks of 8) against the generic ones: the same
// arithmetic in the same order, so the residual, y, its bf16 rounding, dx, its bf16 rounding, dw and db are the same
// bits, with and without accumulation.
TEST(TrainOpsGpu, NormRegisterRowsGiveTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::NormGradScratch scratch;
  std::mt19937 rng(11);
  struct Restore {
    ~Restore() { cuda::set_norm_register_rows(true); }
  } restore;
  for (const auto [rows, D] :
       {Shape2{301, 256}, Shape2{130, 512}, Shape2{1029, 768}, Shape2{45, 1156}, Shape2{77, 2048}, Shape2{20011, 768}})
    for (bool layer : {false, true}) {
      SCOPED_TRACE(fmt::format("rows {} D {} {}", rows, D, layer ? "LayerNorm" : "RMSNorm"));
      const Tensor prev = random_tensor(rng, {rows, D}, -1.5f, 2.5f), hid = random_tensor(rng, {rows, D});
      const Tensor g = random_tensor(rng, {rows, D}), dx0 = random_tensor(rng, {rows, D});
      const Tensor w = random_tensor(rng, {D}, 0.5f, 1.5f), b = random_tensor(rng, {D}, -0.5f, 0.5f);
      const Tensor dw0 = random_tensor(rng, {D}, -5.0f, 5.0f), db0 = random_tensor(rng, {D}, -5.0f, 5.0f);
      DeviceBuffer dp = up(prev), dh = up(hid), dg = up(g), dev_w = up(w), dev_b = up(b);
      const float* bias = layer ? dev_b.as<float>() : nullptr;
      std::vector<Tensor> got[2];
      for (int reg = 0; reg < 2; ++reg) {
        cuda::set_norm_register_rows(reg == 1);
        DeviceBuffer res = poisoned(rows * D), y = poisoned(rows * D), y16(size_t(rows * D) * 2);
        cuda::residual_norm_forward_gpu(ctx.stream(), dp.as<float>(), dh.as<float>(), rows, D, dev_w.as<float>(),
                                        bias, 1e-5f, res.as<float>(), y.as<float>(), y16.as<uint16_t>());
        Tensor y16_host = Tensor::empty(DType::F32, {(rows * D + 1) / 2});
        ctx.sync();
        y16.download(y16_host.raw(), size_t(rows * D) * 2);
        got[reg].push_back(down(res, {rows, D}));
        got[reg].push_back(down(y, {rows, D}));
        got[reg].push_back(y16_host);
        for (bool accumulate : {false, true}) {
          DeviceBuffer dx = up(dx0), dw = up(dw0), db = up(db0), dx16(size_t(rows * D) * 2);
          cuda::norm_backward_gpu(ctx.stream(), res.as<float>(), dg.as<float>(), rows, D, dev_w.as<float>(), bias,
                                  1e-5f, dx.as<float>(), accumulate, dw.as<float>(), layer ? db.as<float>() : nullptr,
                                  scratch, dx16.as<uint16_t>());
          got[reg].push_back(down(dx, {rows, D}));
          Tensor dx16_host = Tensor::empty(DType::F32, {(rows * D + 1) / 2});
          ctx.sync();
          dx16.download(dx16_host.raw(), size_t(rows * D) * 2);
          got[reg].push_back(dx16_host);
          got[reg].push_back(down(dw, {D}));
          got[reg].push_back(down(db, {D}));
        }
      }
      cuda::set_norm_register_rows(true);
      ASSERT_EQ(got[0].size(), got[1].size());
      for (size_t i = 0; i < got[0].size(); ++i) {
        EXPECT_TRUE(same_bits(got[0][i], got[1][i])) << "output " << i;
        const Tensor& t = got[1][i];
        if (i != 2 && !(i >= 3 && (i - 3) % 4 == 1)) {  // (the bf16 copies y16 and dx16 are bits, not floats)
          for (int64_t e = 0; e < t.numel(); ++e) ASSERT_TRUE(std::isfinite(t.data<float>()[e])) << "output " << i;
        }
      }
    }
}

// Norm backwards with their weight sums deferred (queued, then launched together by flush_norm_grad_sums) against
// each sum launched at once: dx, dw and db the same bits; dw and db untouched until the flush (the sums were
// queued); with a budget of about two norms' partials (flushes between them, the buffer regrown) and one dw given
// twice (accumulated in order).
TEST(TrainOpsGpu, DeferredNormSumsGiveTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(23);
  struct Norm {
    int64_t rows, D;
    bool layer;
    int out;  // which dw/db pair it adds to
  };
  const Norm norms[] = {{300, 130, true, 0}, {67, 48, false, 1},   {1029, 768, false, 2}, {4099, 130, false, 3},
                        {37, 256, true, 4},  {1029, 768, false, 2}, {301, 768, true, 5},  {45, 1156, false, 6}};
  constexpr int kOuts = 7;
  std::vector<Tensor> x, dy, w, b;
  for (const Norm& n : norms) {
    x.push_back(random_tensor(rng, {n.rows, n.D}, -1.5f, 2.5f)), dy.push_back(random_tensor(rng, {n.rows, n.D}));
    w.push_back(random_tensor(rng, {n.D}, 0.5f, 1.5f)), b.push_back(random_tensor(rng, {n.D}, -0.5f, 0.5f));
  }
  int64_t width[kOuts] = {};
  for (const Norm& n : norms) width[n.out] = n.D;
  std::vector<Tensor> dw0, db0;
  for (int o = 0; o < kOuts; ++o)
    dw0.push_back(random_tensor(rng, {width[o]}, -5.0f, 5.0f)), db0.push_back(random_tensor(rng, {width[o]}, -5.0f, 5.0f));
  const auto run = [&](bool defer, size_t budget, bool check_pending) {
    cuda::NormGradScratch scratch;
    scratch.defer = defer, scratch.defer_budget_bytes = budget;
    std::vector<DeviceBuffer> dxs, dws, dbs, keep;
    for (int o = 0; o < kOuts; ++o) dws.push_back(up(dw0[size_t(o)])), dbs.push_back(up(db0[size_t(o)]));
    for (size_t i = 0; i < std::size(norms); ++i) {
      const Norm& n = norms[i];
      keep.push_back(up(x[i])), keep.push_back(up(dy[i])), keep.push_back(up(w[i])), keep.push_back(up(b[i]));
      dxs.push_back(poisoned(n.rows * n.D));
      const size_t k = keep.size();
      cuda::norm_backward_gpu(ctx.stream(), keep[k - 4].as<float>(), keep[k - 3].as<float>(), n.rows, n.D,
                              keep[k - 2].as<float>(), n.layer ? keep[k - 1].as<float>() : nullptr, 1e-5f,
                              dxs.back().as<float>(), false, dws[size_t(n.out)].as<float>(),
                              n.layer ? dbs[size_t(n.out)].as<float>() : nullptr, scratch);
    }
    if (check_pending) {  // the last norm's sum is still queued: its dw holds the initial values
      EXPECT_FALSE(scratch.queued.empty());
      const Norm& last = norms[std::size(norms) - 1];
      ctx.sync();
      EXPECT_TRUE(same_bits(down(dws[size_t(last.out)], {last.D}), dw0[size_t(last.out)])) << "a sum was not queued";
    }
    cuda::flush_norm_grad_sums(ctx.stream(), scratch);
    EXPECT_TRUE(scratch.queued.empty());
    ctx.sync();
    std::vector<Tensor> got;
    for (size_t i = 0; i < std::size(norms); ++i) got.push_back(down(dxs[i], {norms[i].rows, norms[i].D}));
    for (int o = 0; o < kOuts; ++o) got.push_back(down(dws[size_t(o)], {width[o]})), got.push_back(down(dbs[size_t(o)], {width[o]}));
    return got;
  };
  const std::vector<Tensor> at_once = run(false, 0, false);
  for (const size_t budget : {size_t(192) << 20, size_t(2 * 1029 / 8 * 768 * 4)}) {  // all queued; ~2 norms' partials
    SCOPED_TRACE(fmt::format("budget {} bytes", budget));
    const std::vector<Tensor> deferred = run(true, budget, true);
    ASSERT_EQ(deferred.size(), at_once.size());
    for (size_t i = 0; i < at_once.size(); ++i) {
      EXPECT_TRUE(same_bits(at_once[i], deferred[i])) << "output " << i;
      for (int64_t e = 0; e < at_once[i].numel(); ++e) ASSERT_TRUE(std::isfinite(at_once[i].data<float>()[e]));
    }
  }
}

// The residual step with the block's output given in bf16 (hidden16) and the norm backward with dy given in bf16
// (dy16) against the same values upcast to f32: the same bits, through every kernel form — register rows (D 256,
// 512, 768 forward), staged rows (D 768, 2048 backward), generic (D 1156 forward; register rows off) — for both norms
// and with dx accumulated or not.
TEST(TrainOpsGpu, NormBfloatInputsGiveTheUpcastBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::NormGradScratch scratch;
  std::mt19937 rng(12);
  struct Restore {
    ~Restore() { cuda::set_norm_register_rows(true); }
  } restore;
  // t rounded to bf16: its bits, and their values in f32.
  const auto rounded = [](const Tensor& t, std::vector<uint16_t>& bits) {
    Tensor f = t.clone();
    bits.resize(size_t(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) {
      bits[size_t(i)] = f32_to_bf16(t.data<float>()[i]);
      f.data<float>()[i] = bf16_to_f32(bits[size_t(i)]);
    }
    return f;
  };
  for (const bool reg : {true, false})
    for (const auto [rows, D] : {Shape2{301, 256}, Shape2{130, 512}, Shape2{1029, 768}, Shape2{45, 1156},
                                 Shape2{77, 2048}})
      for (bool layer : {false, true}) {
        SCOPED_TRACE(fmt::format("rows {} D {} {} {}", rows, D, layer ? "LayerNorm" : "RMSNorm",
                                 reg ? "register rows" : "generic"));
        cuda::set_norm_register_rows(reg);
        std::vector<uint16_t> hid_bits, g_bits;
        const Tensor prev = random_tensor(rng, {rows, D}, -1.5f, 2.5f);
        const Tensor hid = rounded(random_tensor(rng, {rows, D}), hid_bits);
        const Tensor g = rounded(random_tensor(rng, {rows, D}), g_bits);
        const Tensor dx0 = random_tensor(rng, {rows, D});
        const Tensor w = random_tensor(rng, {D}, 0.5f, 1.5f), b = random_tensor(rng, {D}, -0.5f, 0.5f);
        const Tensor dw0 = random_tensor(rng, {D}, -5.0f, 5.0f), db0 = random_tensor(rng, {D}, -5.0f, 5.0f);
        DeviceBuffer dp = up(prev), dh = up(hid), dg = up(g), dev_w = up(w), dev_b = up(b);
        DeviceBuffer dh16(hid_bits.size() * 2), dg16(g_bits.size() * 2);
        dh16.upload(hid_bits.data(), dh16.bytes());
        dg16.upload(g_bits.data(), dg16.bytes());
        const float* bias = layer ? dev_b.as<float>() : nullptr;
        std::vector<Tensor> got[2];
        for (int in16 = 0; in16 < 2; ++in16) {
          DeviceBuffer res = poisoned(rows * D), y = poisoned(rows * D);
          cuda::residual_norm_forward_gpu(ctx.stream(), dp.as<float>(), in16 ? nullptr : dh.as<float>(), rows, D,
                                          dev_w.as<float>(), bias, 1e-5f, res.as<float>(), y.as<float>(), nullptr,
                                          in16 ? dh16.as<uint16_t>() : nullptr);
          got[in16].push_back(down(res, {rows, D}));
          got[in16].push_back(down(y, {rows, D}));
          for (bool accumulate : {false, true}) {
            DeviceBuffer dx = up(dx0), dw = up(dw0), db = up(db0);
            cuda::norm_backward_gpu(ctx.stream(), res.as<float>(), in16 ? nullptr : dg.as<float>(), rows, D,
                                    dev_w.as<float>(), bias, 1e-5f, dx.as<float>(), accumulate, dw.as<float>(),
                                    layer ? db.as<float>() : nullptr, scratch, nullptr,
                                    in16 ? dg16.as<uint16_t>() : nullptr);
            got[in16].push_back(down(dx, {rows, D}));
            got[in16].push_back(down(dw, {D}));
            got[in16].push_back(down(db, {D}));
          }
        }
        ctx.sync();
        ASSERT_EQ(got[0].size(), got[1].size());
        for (size_t i = 0; i < got[0].size(); ++i) {
          EXPECT_TRUE(same_bits(got[0][i], got[1][i])) << "output " << i;
          for (int64_t e = 0; e < got[1][i].numel(); ++e)
            ASSERT_TRUE(std::isfinite(got[1][i].data<float>()[e])) << "output " << i;
        }
      }
}

// The training step's residual RMSNorm with bf16 rows only (hidden16 or no block output, y16 alone: its own kernel at
// D 512, 768, 1024) against the general register-rows kernel given the same values upcast to f32 and asked for y too:
// the residual's and y16's bits must agree.
TEST(TrainOpsGpu, ResidualRmsNormBfloatRowsGiveTheGeneralBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(13);
  for (const auto [rows, D] : {Shape2{301, 512}, Shape2{1029, 768}, Shape2{77, 1024}})
    for (const bool with_hidden : {true, false}) {
      SCOPED_TRACE(fmt::format("rows {} D {} {}", rows, D, with_hidden ? "with the block's output" : "first layer"));
      const Tensor prev = random_tensor(rng, {rows, D}, -1.5f, 2.5f), w = random_tensor(rng, {D}, 0.5f, 1.5f);
      Tensor hid = random_tensor(rng, {rows, D});
      std::vector<uint16_t> hid_bits(size_t(rows * D));
      for (int64_t i = 0; i < hid.numel(); ++i) {
        hid_bits[size_t(i)] = f32_to_bf16(hid.data<float>()[i]);
        hid.data<float>()[i] = bf16_to_f32(hid_bits[size_t(i)]);
      }
      DeviceBuffer dp = up(prev), dh = up(hid), dev_w = up(w), dh16(hid_bits.size() * 2);
      dh16.upload(hid_bits.data(), dh16.bytes());
      std::vector<std::vector<uint16_t>> y16s(2);
      std::vector<Tensor> res(2);
      for (int fast = 0; fast < 2; ++fast) {
        DeviceBuffer r = poisoned(rows * D), y = poisoned(rows * D), y16(size_t(rows * D) * 2);
        cuda::residual_norm_forward_gpu(ctx.stream(), dp.as<float>(), with_hidden && !fast ? dh.as<float>() : nullptr,
                                        rows, D, dev_w.as<float>(), nullptr, 1e-5f, r.as<float>(),
                                        fast ? nullptr : y.as<float>(), y16.as<uint16_t>(),
                                        with_hidden && fast ? dh16.as<uint16_t>() : nullptr);
        ctx.sync();
        res[size_t(fast)] = down(r, {rows, D});
        y16s[size_t(fast)].resize(size_t(rows * D));
        y16.download(y16s[size_t(fast)].data(), size_t(rows * D) * 2);
      }
      EXPECT_TRUE(same_bits(res[0], res[1])) << "the residual";
      EXPECT_TRUE(y16s[0] == y16s[1]) << "the normalised rows in bf16";
      for (int64_t e = 0; e < res[1].numel(); ++e) ASSERT_TRUE(std::isfinite(res[1].data<float>()[e]));
    }
}

// The GatedMLP activation's all-bf16 kernels (pairs of columns, d_ff even; the forward four pairs at a time where
// d_ff % 8 == 0) against the per-element ones on the same bf16 inputs: the forward's o16 against the f32 output
// rounded afterwards, the backward's [da, dg] against the f32-do kernel's bf16 output fed the same do values.
TEST(TrainOpsGpu, GatedSiluBf16PairsGiveTheElementKernelsBits) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(41);
  const int64_t rows = 37;
  for (const int64_t F : {70, 72, 200}) {  // (F % 8 == 0: the forward's 16-byte kernel)
    SCOPED_TRACE(fmt::format("d_ff {}", F));
    const Tensor h = random_tensor(rng, {rows, 2 * F}, -4.0f, 4.0f), d_o = random_tensor(rng, {rows, F});
    DeviceBuffer h32 = up(h), do32 = up(d_o), h16(size_t(rows * 2 * F) * 2), do16(size_t(rows * F) * 2);
    cuda::f32_to_bf16_2d(ctx.stream(), h32.as<float>(), rows, 2 * F, 2 * F, h16.as<uint16_t>());
    cuda::f32_to_bf16_2d(ctx.stream(), do32.as<float>(), rows, F, F, do16.as<uint16_t>());
    // Forward.
    DeviceBuffer o16a(size_t(rows * F) * 2), o32 = poisoned(rows * F), o16b(size_t(rows * F) * 2);
    cuda::gated_silu_forward_gpu(ctx.stream(), nullptr, rows, F, nullptr, o16a.as<uint16_t>(), h16.as<uint16_t>());
    cuda::gated_silu_forward_gpu(ctx.stream(), nullptr, rows, F, o32.as<float>(), nullptr, h16.as<uint16_t>());
    cuda::f32_to_bf16_2d(ctx.stream(), o32.as<float>(), rows, F, F, o16b.as<uint16_t>());
    ctx.sync();
    const Tensor fa = down_bf16(o16a, {rows, F}), fb = down_bf16(o16b, {rows, F});
    EXPECT_TRUE(same_bits(fa, fb)) << "forward";
    for (int64_t i = 0; i < fa.numel(); ++i) ASSERT_TRUE(std::isfinite(fa.data<float>()[i]));
    // Backward: the element kernel reads do as f32 from the first half of each dh row.
    const Tensor do_rounded = down_bf16(do16, {rows, F});
    Tensor dh_in = Tensor::zeros(DType::F32, {rows, 2 * F});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < F; ++j) dh_in.data<float>()[r * 2 * F + j] = do_rounded.data<float>()[r * F + j];
    DeviceBuffer dh = up(dh_in), dh16a(size_t(rows * 2 * F) * 2), dh16b(size_t(rows * 2 * F) * 2);
    cuda::gated_silu_backward_bf16_gpu(ctx.stream(), do16.as<uint16_t>(), h16.as<uint16_t>(), rows, F,
                                       dh16a.as<uint16_t>());
    cuda::gated_silu_backward_gpu(ctx.stream(), nullptr, rows, F, dh.as<float>(), dh16b.as<uint16_t>(),
                                  h16.as<uint16_t>());
    ctx.sync();
    const Tensor ba = down_bf16(dh16a, {rows, 2 * F}), bb = down_bf16(dh16b, {rows, 2 * F});
    EXPECT_TRUE(same_bits(ba, bb)) << "backward";
    for (int64_t i = 0; i < ba.numel(); ++i) ASSERT_TRUE(std::isfinite(ba.data<float>()[i]));
  }
}

TEST(TrainOpsGpu, AddInplaceAndCopy) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(3);
  const int64_t n = 100003;
  const Tensor a = random_tensor(rng, {n}), b = random_tensor(rng, {n});
  DeviceBuffer da = up(a), db = up(b), dc = poisoned(n);
  cuda::add_inplace_gpu(ctx.stream(), da.as<float>(), db.as<float>(), n);
  cuda::copy_gpu(ctx.stream(), dc.as<float>(), da.as<float>(), n);
  Tensor ref = a.clone();
  for (int64_t i = 0; i < n; ++i) ref.data<float>()[i] += b.data<float>()[i];
  EXPECT_TRUE(same_bits(down(dc, {n}), ref));
}

// ------------------------------------------------------------------------------------------------------ GatedMLP

class TrainOpsGpuPrecision : public ::testing::TestWithParam<Precision> {};

TEST_P(TrainOpsGpuPrecision, GatedMlpMatchesCpu) {
  MAMBA3_REQUIRE_GPU();
  const Precision p = GetParam();
  const double tol = tol_for(p);
  cuda::Context ctx;
  cuda::TrainGemm gemm(p);
  std::mt19937 rng(4);
  const int64_t F = 70;
  for (const auto [rows, D] : {Shape2{1, 48}, Shape2{3, 130}, Shape2{67, 48}, Shape2{300, 130}}) {
    SCOPED_TRACE(fmt::format("rows {} D {} d_ff {}", rows, D, F));
    const Tensor fc1 = random_tensor(rng, {2 * F, D}, -0.3f, 0.3f), fc2 = random_tensor(rng, {D, F}, -0.3f, 0.3f);
    const Tensor x = random_tensor(rng, {rows, D}, -2.0f, 2.0f), dy = random_tensor(rng, {rows, D});
    const Tensor dfc1_0 = random_tensor(rng, {2 * F, D}), dfc2_0 = random_tensor(rng, {D, F});
    Tensor h = Tensor::empty(DType::F32, {rows, 2 * F}), o = Tensor::empty(DType::F32, {rows, F}),
           y = Tensor::empty(DType::F32, {rows, D}), dx = Tensor::empty(DType::F32, {rows, D});
    Tensor dfc1 = dfc1_0.clone(), dfc2 = dfc2_0.clone();
    gated_mlp_train_forward(fc1.data<float>(), fc2.data<float>(), D, F, x.data<float>(), rows, h.data<float>(),
                            o.data<float>(), y.data<float>());
    gated_mlp_train_backward(fc1.data<float>(), fc2.data<float>(), D, F, x.data<float>(), rows, h.data<float>(),
                             o.data<float>(), dy.data<float>(), dx.data<float>(), dfc1.data<float>(),
                             dfc2.data<float>());
    DeviceBuffer g_fc1 = up(fc1), g_fc2 = up(fc2), g_x = up(x), g_dy = up(dy), g_dfc1 = up(dfc1_0),
                 g_dfc2 = up(dfc2_0);
    DeviceBuffer g_h = poisoned(rows * 2 * F), g_o = poisoned(rows * F), g_y = poisoned(rows * D),
                 g_dx = poisoned(rows * D), g_scratch = poisoned(rows * 3 * F);
    cuda::gated_mlp_forward_gpu(ctx, gemm, g_fc1.as<float>(), g_fc2.as<float>(), D, F, g_x.as<float>(), rows,
                                g_h.as<float>(), g_o.as<float>(), g_y.as<float>());
    cuda::gated_mlp_backward_gpu(ctx, gemm, g_fc1.as<float>(), g_fc2.as<float>(), D, F, g_x.as<float>(), rows,
                                 g_h.as<float>(), g_o.as<float>(), g_dy.as<float>(), g_dx.as<float>(),
                                 g_dfc1.as<float>(), g_dfc2.as<float>(), g_scratch.as<float>());
    // The bf16 mode keeps h as bf16 values in h's buffer (fc1's product rounded once, as autocast's bf16 output).
    EXPECT_LE(rel_l2(p == Precision::BF16 ? down_bf16(g_h, {rows, 2 * F}) : down(g_h, {rows, 2 * F}), h), tol) << "h";
    // The bf16 mode keeps o as bf16 values in o's buffer (the only form its products read).
    EXPECT_LE(rel_l2(p == Precision::BF16 ? down_bf16(g_o, {rows, F}) : down(g_o, {rows, F}), o), tol) << "o";
    EXPECT_LE(rel_l2(down(g_y, {rows, D}), y), tol) << "y";
    EXPECT_LE(rel_l2(down(g_dx, {rows, D}), dx), tol) << "dx";
    EXPECT_LE(rel_l2(minus(down(g_dfc1, {2 * F, D}), dfc1_0), minus(dfc1, dfc1_0)), tol) << "dfc1";
    EXPECT_LE(rel_l2(minus(down(g_dfc2, {D, F}), dfc2_0), minus(dfc2, dfc2_0)), tol) << "dfc2";
  }
}

// ------------------------------------------------------------------------------------------ lm_head + cross-entropy

struct LmCase {
  int64_t N, D, Vp, block;  // block 0 = automatic
  double ignored;           // fraction of rows without a target
};

TEST_P(TrainOpsGpuPrecision, LmHeadCrossEntropyMatchesCpu) {
  MAMBA3_REQUIRE_GPU();
  const Precision p = GetParam();
  const double tol = tol_for(p);
  cuda::Context ctx;
  cuda::TrainGemm gemm(p);
  std::mt19937 rng(5);
  const LmCase cases[] = {{1, 48, 259, 0, 0.0},      {3, 130, 259, 0, 0.34},  {67, 48, 3001, 0, 0.2},
                          {300, 130, 259, 64, 0.25}, {300, 48, 2053, 0, 0.1}, {67, 130, 3001, 16, 0.5}};
  for (const LmCase& c : cases) {
    SCOPED_TRACE(fmt::format("N {} D {} Vp {} block {}", c.N, c.D, c.Vp, c.block));
    const Tensor hidden = random_tensor(rng, {c.N, c.D}), W = random_tensor(rng, {c.Vp, c.D}, -0.5f, 0.5f);
    const Tensor dW0 = random_tensor(rng, {c.Vp, c.D}, -0.01f, 0.01f);
    std::vector<int32_t> targets(static_cast<size_t>(c.N));
    std::uniform_int_distribution<int32_t> tok(0, int32_t(c.Vp - 1));
    std::bernoulli_distribution skip(c.ignored);
    for (auto& t : targets) t = skip(rng) ? -1 : tok(rng);
    // The CPU reference takes only rows with a target: gather them, run, scatter dhidden back (zero elsewhere).
    std::vector<int64_t> kept_rows, kept_targets;
    for (int64_t r = 0; r < c.N; ++r)
      if (targets[size_t(r)] >= 0) {
        kept_rows.push_back(r);
        kept_targets.push_back(targets[size_t(r)]);
      }
    const int64_t n = int64_t(kept_rows.size());
    ASSERT_GT(n, 0);
    const double scale = 1.0 / double(n);
    Tensor h_kept = Tensor::empty(DType::F32, {n, c.D}), dh_kept = Tensor::empty(DType::F32, {n, c.D});
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(h_kept.data<float>() + i * c.D, hidden.data<float>() + kept_rows[size_t(i)] * c.D,
                  size_t(c.D) * sizeof(float));
    Tensor dW_ref = dW0.clone(), dh_ref = Tensor::zeros(DType::F32, {c.N, c.D});
    const double loss_ref = lm_head_cross_entropy(h_kept.data<float>(), n, c.D, W.data<float>(), c.Vp,
                                                  kept_targets.data(), scale, dh_kept.data<float>(),
                                                  dW_ref.data<float>());
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(dh_ref.data<float>() + kept_rows[size_t(i)] * c.D, dh_kept.data<float>() + i * c.D,
                  size_t(c.D) * sizeof(float));

    DeviceBuffer g_h = up(hidden), g_W = up(W), g_t = DeviceBuffer::from(targets);
    MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
    cuda::LmHeadScratch scratch;
    scratch.max_block_rows = c.block;
    double losses[2];
    Tensor dh[2], dW[2];
    for (int k = 0; k < 2; ++k) {  // twice: loss and gradients must repeat bit for bit
      DeviceBuffer g_dh = poisoned(c.N * c.D), g_dW = up(dW0);
      losses[k] = cuda::lm_head_cross_entropy_gpu(ctx, gemm, g_h.as<float>(), c.N, c.D, g_W.as<float>(), c.Vp,
                                                  g_t.as<int32_t>(), scale, g_dh.as<float>(), g_dW.as<float>(),
                                                  scratch);
      dh[k] = down(g_dh, {c.N, c.D});
      dW[k] = down(g_dW, {c.Vp, c.D});
    }
    EXPECT_NEAR(losses[0], loss_ref, tol * std::abs(loss_ref)) << "loss";
    EXPECT_LE(rel_l2(dh[0], dh_ref), tol) << "dhidden";
    EXPECT_LE(rel_l2(minus(dW[0], dW0), minus(dW_ref, dW0)), tol) << "dW";
    for (int64_t r = 0; r < c.N; ++r) {
      if (targets[size_t(r)] >= 0) continue;
      for (int64_t j = 0; j < c.D; ++j) {
        ASSERT_EQ(dh[0].data<float>()[r * c.D + j], 0.0f) << "ignored row " << r;
      }
    }
    EXPECT_EQ(losses[0], losses[1]);
    EXPECT_TRUE(same_bits(dh[0], dh[1])) << "dhidden not repeatable";
    EXPECT_TRUE(same_bits(dW[0], dW[1])) << "dW not repeatable";
    // Loss only: the same logits, the same sum.
    const double loss_only = cuda::lm_head_cross_entropy_gpu(ctx, gemm, g_h.as<float>(), c.N, c.D, g_W.as<float>(),
                                                             c.Vp, g_t.as<int32_t>(), scale, nullptr, nullptr,
                                                             scratch);
    EXPECT_EQ(loss_only, losses[0]);
  }
}

TEST(TrainOpsGpu, LmHeadAllTargetsIgnored) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::TrainGemm gemm(Precision::F32);
  std::mt19937 rng(6);
  const int64_t N = 5, D = 48, Vp = 259;
  const Tensor W0 = random_tensor(rng, {Vp, D});
  DeviceBuffer g_h = up(random_tensor(rng, {N, D})), g_W = up(random_tensor(rng, {Vp, D})), g_dW = up(W0);
  DeviceBuffer g_t = DeviceBuffer::from(std::vector<int32_t>(size_t(N), -1)), g_dh = poisoned(N * D);
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  cuda::LmHeadScratch scratch;
  EXPECT_EQ(cuda::lm_head_cross_entropy_gpu(ctx, gemm, g_h.as<float>(), N, D, g_W.as<float>(), Vp,
                                            g_t.as<int32_t>(), 1.0, g_dh.as<float>(), g_dW.as<float>(), scratch),
            0.0);
  EXPECT_TRUE(same_bits(down(g_dh, {N, D}), Tensor::zeros(DType::F32, {N, D})));
  EXPECT_TRUE(same_bits(down(g_dW, {Vp, D}), W0));
}

// ------------------------------------------------------------------------------- bf16 logits (the bf16 mode)

std::vector<uint16_t> bf16_bits(const Tensor& t) {
  std::vector<uint16_t> bits(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) bits[size_t(i)] = f32_to_bf16(t.data<float>()[i]);
  return bits;
}
template <typename T>
DeviceBuffer up_vec(const std::vector<T>& v) {
  DeviceBuffer b = DeviceBuffer::from(v);
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  return b;
}

// Cross-entropy of bf16 logits (n, Vp) in float64: row losses (0 without a target, NaN for a target ≥ Vp) and the
// gradient scale·(softmax − onehot) rounded to bf16, as floats.
void softmax_cross_entropy_f64(const std::vector<uint16_t>& logits, int64_t n, int64_t Vp,
                               const std::vector<int32_t>& targets, double scale, std::vector<double>& loss,
                               std::vector<float>& grad) {
  loss.assign(size_t(n), 0.0);
  grad.assign(size_t(n * Vp), 0.0f);
  std::vector<double> v(static_cast<size_t>(Vp));
  for (int64_t r = 0; r < n; ++r) {
    const int32_t t = targets[size_t(r)];
    if (t < 0) continue;
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < Vp; ++j) {
      v[size_t(j)] = bf16_to_f32(logits[size_t(r * Vp + j)]);
      mx = std::max(mx, v[size_t(j)]);
    }
    for (int64_t j = 0; j < Vp; ++j) sum += std::exp(v[size_t(j)] - mx);
    const double lse = mx + std::log(sum);
    loss[size_t(r)] = t < Vp ? lse - v[size_t(t)] : std::nan("");
    for (int64_t j = 0; j < Vp; ++j) {
      const double g = scale * (std::exp(v[size_t(j)] - lse) - (j == t ? 1.0 : 0.0));
      grad[size_t(r * Vp + j)] = bf16_to_f32(f32_to_bf16(float(g)));
    }
  }
}

// ‖got − ref‖ / ‖ref‖ over entries [begin, end) of a row, leaving out `skip` (NaN anywhere gives NaN).
double row_rel_err(const std::vector<uint16_t>& got, const std::vector<float>& ref, int64_t begin, int64_t end,
                   int64_t skip = -1) {
  double num = 0, den = 0;
  for (int64_t i = begin; i < end; ++i) {
    if (i == skip) continue;
    const double g = bf16_to_f32(got[size_t(i)]), r = ref[size_t(i)];
    num += (g - r) * (g - r);
    den += r * r;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

// The bf16 softmax (each row read once into shared memory, two rows a block; Vp 70001 takes the three-pass loop)
// against float64 on the same bf16 logits: rows far above and below 0, a confident row (p_target ≈ 1 − 1e-6: the
// float64 target entry), targets at both ends of the row (Vp − 1 alone in the last pair when Vp is odd), rows
// without a target and one past Vp. Vp 50257 (odd) puts its rows at every even offset mod 16 (the bulk copy's edges
// through the threads); 300 rows of ≈ 50k are more than the blocks that fit at once (one per SM), so blocks take
// several rows, alternating their two buffers, rows without a target among them. The loss alone leaves the logits as
// they were with the same loss bits; a second run repeats bit for bit; and the rows from the second on, run from
// where they lie (every other row 2-byte aligned when Vp is odd), give the same bits as in the full run.
TEST(TrainOpsGpu, SoftmaxCrossEntropyBf16MatchesFloat64) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(11);
  const double scale = 1.0 / 16;
  const std::vector<std::pair<int64_t, std::vector<int64_t>>> cases = {
      {50280, {1, 5, 33, 300}}, {50257, {5, 33, 300}}, {1000, {1, 5, 33}}, {7, {1, 5, 33}}, {70001, {1, 5, 33}}};
  for (const auto& [Vp, row_counts] : cases)
    for (const int64_t n : row_counts) {
      SCOPED_TRACE(fmt::format("Vp {} rows {}", Vp, n));
      std::uniform_int_distribution<int32_t> tok(0, int32_t(Vp - 1));
      std::vector<int32_t> targets(static_cast<size_t>(n));
      for (auto& t : targets) t = tok(rng);
      if (n >= 5) {
        targets[0] = int32_t(Vp - 1), targets[1] = -1, targets[3] = int32_t(Vp), targets[4] = 0;
        for (int64_t r = 5; r < n; ++r)
          if (r % 7 == 5) targets[size_t(r)] = -1;
      }
      Tensor l = random_tensor(rng, {n, Vp}, -8.0f, 8.0f);
      for (int64_t r = 0; r < n; ++r) {
        const float offset = r % 3 == 1 ? 40.0f : (r % 3 == 2 ? -30.0f : 0.0f);
        for (int64_t j = 0; j < Vp; ++j) l.data<float>()[r * Vp + j] += offset;
        // Confident: 1 − p_target ≈ 186·(Vp − 1)·e^(−20 − ln Vp) ≈ 4e-7 (186 = mean of e^U(−8, 8)).
        if (r == 2) l.data<float>()[r * Vp + targets[2]] = offset + 20.0f + float(std::log(double(Vp)));
      }
      const std::vector<uint16_t> logits = bf16_bits(l);
      std::vector<double> loss_ref;
      std::vector<float> grad_ref;
      softmax_cross_entropy_f64(logits, n, Vp, targets, scale, loss_ref, grad_ref);

      const DeviceBuffer g_t = up_vec(targets);
      std::vector<double> loss[2];
      std::vector<uint16_t> grad[2];
      for (int k = 0; k < 2; ++k) {  // twice: the same bits
        DeviceBuffer g_l = up_vec(logits), g_loss = poisoned(2 * n);
        cuda::softmax_cross_entropy_rows_bf16_gpu(ctx.stream(), g_l.as<uint16_t>(), n, Vp, g_t.as<int32_t>(), scale,
                                                  true, g_loss.as<double>());
        loss[k] = down_vec<double>(g_loss, size_t(n));
        grad[k] = down_vec<uint16_t>(g_l, size_t(n * Vp));
      }
      for (int64_t r = 0; r < n; ++r) {
        SCOPED_TRACE(fmt::format("row {} target {}", r, targets[size_t(r)]));
        const int32_t t = targets[size_t(r)];
        const double got = loss[0][size_t(r)], want = loss_ref[size_t(r)];
        if (t < 0) {
          EXPECT_EQ(got, 0.0);
          for (int64_t j = 0; j < Vp; ++j) ASSERT_EQ(grad[0][size_t(r * Vp + j)], 0) << "gradient entry " << j;
        } else if (t >= Vp) {
          EXPECT_TRUE(std::isnan(got)) << got;
        } else {
          EXPECT_LE(std::abs(got - want), 1e-6 * std::max(std::abs(want), 1.0)) << got << " vs " << want;
          EXPECT_LE(row_rel_err(grad[0], grad_ref, r * Vp, (r + 1) * Vp), 4e-3) << "gradient";
          // Without the target's entry, which dominates the row's norm unless the row is confident.
          EXPECT_LE(row_rel_err(grad[0], grad_ref, r * Vp, (r + 1) * Vp, r * Vp + t), 4e-3) << "softmax part";
        }
      }
      EXPECT_EQ(0, std::memcmp(loss[0].data(), loss[1].data(), size_t(n) * 8)) << "loss not repeatable";
      EXPECT_TRUE(grad[0] == grad[1]) << "gradient not repeatable";

      // The loss alone: the logits stay, the losses are the same bits.
      DeviceBuffer g_l = up_vec(logits), g_loss = poisoned(2 * n);
      cuda::softmax_cross_entropy_rows_bf16_gpu(ctx.stream(), g_l.as<uint16_t>(), n, Vp, g_t.as<int32_t>(), scale,
                                                false, g_loss.as<double>());
      EXPECT_EQ(0, std::memcmp(down_vec<double>(g_loss, size_t(n)).data(), loss[0].data(), size_t(n) * 8))
          << "loss without the gradient";
      EXPECT_TRUE(down_vec<uint16_t>(g_l, size_t(n * Vp)) == logits) << "logits touched without the gradient";

      // Rows 1…n−1 from where they lie in the buffer: the same bits as in the full run.
      if (n > 1) {
        DeviceBuffer g_l1 = up_vec(logits), g_loss1 = poisoned(2 * n);
        cuda::softmax_cross_entropy_rows_bf16_gpu(ctx.stream(), g_l1.as<uint16_t>() + Vp, n - 1, Vp,
                                                  g_t.as<int32_t>() + 1, scale, true, g_loss1.as<double>());
        const std::vector<double> loss1 = down_vec<double>(g_loss1, size_t(n - 1));
        const std::vector<uint16_t> grad1 = down_vec<uint16_t>(g_l1, size_t(n * Vp));
        EXPECT_EQ(0, std::memcmp(loss1.data(), loss[0].data() + 1, size_t(n - 1) * 8)) << "loss by position";
        EXPECT_TRUE(std::equal(grad1.begin() + Vp, grad1.end(), grad[0].begin() + Vp)) << "gradient by position";
        EXPECT_TRUE(std::equal(grad1.begin(), grad1.begin() + Vp, logits.begin())) << "row 0 touched";
      }
    }
}

// TrainGemm::run_bf16_out is run_bf16 with its result rounded to bf16: within one bf16 step of the f32 result
// (half a step of rounding, and cuBLAS may accumulate in another order for the other output type).
TEST(TrainOpsGpu, TrainGemmBf16OutputIsTheRoundedProduct) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::TrainGemm gemm(Precision::BF16);
  std::mt19937 rng(12);
  struct Case {
    int64_t m, n, k;
    bool ta, tb;
  };
  // (the A·Bᵀ cases with N and K multiples of 8 also run on the fused products' kernel under
  // MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1: ctest's test_train_ops_gpu_fused_plain; 300 × 520 × 776: several row bands, a
  // partial column tile and k-block)
  for (const Case& c : {Case{33, 1000, 64, false, true}, Case{5, 7, 130, false, true}, Case{1, 259, 48, false, false},
                        Case{67, 130, 48, true, false}, Case{300, 520, 776, false, true}}) {
    SCOPED_TRACE(fmt::format("m {} n {} k {} ta {} tb {}", c.m, c.n, c.k, c.ta, c.tb));
    const int64_t lda = c.ta ? c.m : c.k, ldb = c.tb ? c.k : c.n;
    const std::vector<uint16_t> a = bf16_bits(random_tensor(rng, {c.m * c.k})),
                                b = bf16_bits(random_tensor(rng, {c.k * c.n}));
    DeviceBuffer g_a = up_vec(a), g_b = up_vec(b), g_c32 = poisoned(c.m * c.n), g_c16 = poisoned(c.m * c.n);
    gemm.run_bf16(ctx, c.ta, c.tb, c.m, c.n, c.k, 1.0f, g_a.as<uint16_t>(), lda, g_b.as<uint16_t>(), ldb, 0.0f,
                  g_c32.as<float>(), c.n);
    gemm.run_bf16_out(ctx, c.ta, c.tb, c.m, c.n, c.k, 1.0f, g_a.as<uint16_t>(), lda, g_b.as<uint16_t>(), ldb,
                      g_c16.as<uint16_t>(), c.n);
    const std::vector<float> c32 = down_vec<float>(g_c32, size_t(c.m * c.n));
    const std::vector<uint16_t> c16 = down_vec<uint16_t>(g_c16, size_t(c.m * c.n));
    for (size_t i = 0; i < c32.size(); ++i) {
      // One bf16 step (2⁻⁷ relative): the rounding's half step, plus cuBLAS's bf16-output algorithm summing in
      // another order than the f32-output one (the H200 run saw 0.35 of a step).
      ASSERT_LE(std::abs(double(bf16_to_f32(c16[i])) - c32[i]), std::ldexp(std::abs(double(c32[i])), -7) + 1e-5)
          << "entry " << i << ": " << bf16_to_f32(c16[i]) << " vs " << c32[i];
    }
  }
}

// The whole lm_head in the bf16 mode (bf16 logits, their gradient in place) against the f32 mode on the same
// inputs, and blocks of rows against one: the same loss bits (each row's loss depends on its logits alone). h and W
// hold multiples of 2⁻⁶ and 2⁻⁸ (exact in bf16, and every sum of their products exact in f32), so the logits are
// the same bits whatever product algorithm cuBLAS picks for a block's row count, and the two modes' logits differ
// only by the bf16 rounding of the result: the loss within 2e-3, the gradients (bf16 operands) within 2e-2.
TEST(TrainOpsGpu, LmHeadBf16LogitsFollowTheF32Mode) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::TrainGemm gemm32(Precision::F32), gemm16(Precision::BF16);
  std::mt19937 rng(13);
  const LmCase cases[] = {{33, 64, 50280, 7, 0.2}, {40, 48, 1000, 16, 0.25}, {33, 130, 7, 7, 0.2},
                          {21, 48, 70001, 5, 0.1}};
  for (const LmCase& c : cases) {
    SCOPED_TRACE(fmt::format("N {} D {} Vp {} block {}", c.N, c.D, c.Vp, c.block));
    Tensor hidden = random_tensor(rng, {c.N, c.D}), W = random_tensor(rng, {c.Vp, c.D}, -0.25f, 0.25f);
    for (float& x : std::span(hidden.data<float>(), size_t(hidden.numel()))) x = std::round(x * 64.0f) / 64.0f;
    for (float& x : std::span(W.data<float>(), size_t(W.numel()))) x = std::round(x * 256.0f) / 256.0f;
    const Tensor dW0 = random_tensor(rng, {c.Vp, c.D}, -0.01f, 0.01f);
    std::vector<int32_t> targets(size_t(c.N));
    std::uniform_int_distribution<int32_t> tok(0, int32_t(c.Vp - 1));
    std::bernoulli_distribution skip(c.ignored);
    for (auto& t : targets) t = skip(rng) ? -1 : tok(rng);
    targets[0] = tok(rng);
    int64_t kept = 0;
    for (int32_t t : targets) kept += t >= 0;
    const double scale = 1.0 / double(kept);
    DeviceBuffer g_h = up(hidden), g_W = up(W), g_t = up_vec(targets);
    auto run = [&](cuda::TrainGemm& gemm, int64_t block, Tensor& dh, Tensor& dW) {
      cuda::LmHeadScratch scratch;
      scratch.max_block_rows = block;
      DeviceBuffer g_dh = poisoned(c.N * c.D), g_dW = up(dW0);
      const double loss = cuda::lm_head_cross_entropy_gpu(ctx, gemm, g_h.as<float>(), c.N, c.D, g_W.as<float>(),
                                                          c.Vp, g_t.as<int32_t>(), scale, g_dh.as<float>(),
                                                          g_dW.as<float>(), scratch);
      dh = down(g_dh, {c.N, c.D});
      dW = minus(down(g_dW, {c.Vp, c.D}), dW0);
      return loss;
    };
    Tensor dh32, dW32, dh1, dW1, dhk, dWk;
    const double loss32 = run(gemm32, 0, dh32, dW32);
    const double loss1 = run(gemm16, 0, dh1, dW1);  // automatic: one block at these sizes
    const double lossk = run(gemm16, c.block, dhk, dWk);
    EXPECT_LE(std::abs(loss1 - loss32), 2e-3 * std::abs(loss32)) << loss1 << " vs " << loss32;
    EXPECT_LE(rel_l2(dh1, dh32), 2e-2) << "dhidden";
    EXPECT_LE(rel_l2(dW1, dW32), 2e-2) << "dW";
    EXPECT_EQ(lossk, loss1) << "blocks of " << c.block << " rows";
    EXPECT_LE(rel_l2(dhk, dh32), 2e-2) << "dhidden, blocks";
    EXPECT_LE(rel_l2(dWk, dW32), 2e-2) << "dW, blocks";
    for (int64_t r = 0; r < c.N; ++r) {
      if (targets[size_t(r)] >= 0) continue;
      for (int64_t j = 0; j < c.D; ++j) {
        ASSERT_EQ(dh1.data<float>()[r * c.D + j], 0.0f) << "ignored row " << r;
        ASSERT_EQ(dhk.data<float>()[r * c.D + j], 0.0f) << "ignored row " << r << ", blocks";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Precisions, TrainOpsGpuPrecision, ::testing::Values(Precision::F32, Precision::BF16),
                         [](const ::testing::TestParamInfo<Precision>& info) {
                           return std::string(cuda::precision_name(info.param));
                         });

// ----------------------------------------------------------------------------------------------------- embedding

TEST(TrainOpsGpu, EmbeddingBackwardIsTheOrderedScatterAdd) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(7);
  const int64_t V = 50;
  cuda::EmbeddingGradPlan reused;
  // (D % 4 == 0: a warp per id over float4 columns, one pass or several; else a block per id.)
  for (const auto [rows, D] : {Shape2{1, 48}, Shape2{300, 130}, Shape2{3, 130}, Shape2{4099, 48}, Shape2{67, 48},
                               Shape2{301, 768}, Shape2{45, 132}}) {
    SCOPED_TRACE(fmt::format("rows {} D {}", rows, D));
    // Skewed ids: id 7 takes about a third of the rows, so long runs of one id are covered.
    std::vector<int32_t> ids(static_cast<size_t>(rows));
    std::uniform_int_distribution<int32_t> tok(0, int32_t(V - 1));
    for (auto& id : ids) id = rng() % 3 == 0 ? 7 : tok(rng);
    const Tensor dy = random_tensor(rng, {rows, D}), table0 = random_tensor(rng, {V, D});
    Tensor ref = table0.clone();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < D; ++j) ref.data<float>()[ids[size_t(r)] * D + j] += dy.data<float>()[r * D + j];
    const cuda::EmbeddingGradPlan plan = cuda::EmbeddingGradPlan::build(ids.data(), rows);
    DeviceBuffer g_dy = up(dy), g_table = up(table0), g_table2 = up(table0);
    cuda::embedding_backward_gpu(ctx.stream(), plan, g_dy.as<float>(), D, g_table.as<float>());
    EXPECT_TRUE(same_bits(down(g_table, {V, D}), ref)) << "rel_l2 " << rel_l2(down(g_table, {V, D}), ref);
    // The reused plan (grown and shrunk across the shapes), uploaded on the stream.
    reused.rebuild(ctx.stream(), ids.data(), rows);
    cuda::embedding_backward_gpu(ctx.stream(), reused, g_dy.as<float>(), D, g_table2.as<float>());
    EXPECT_TRUE(same_bits(down(g_table2, {V, D}), ref)) << "rebuilt plan";
  }
  const int32_t bad[] = {3, -1};
  EXPECT_THROW(cuda::EmbeddingGradPlan::build(bad, 2), Error);
}

// --------------------------------------------------------------------------------------------------------- AdamW

TEST(TrainOpsGpu, SumOfSquaresIsDeterministic) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::ReduceScratch scratch;
  std::mt19937 rng(8);
  for (int64_t n : {int64_t(1), int64_t(5), int64_t(100003), int64_t(3000017)}) {
    const Tensor g = random_tensor(rng, {n}, -3.0f, 3.0f);
    double ref = 0;
    for (int64_t i = 0; i < n; ++i) ref += double(g.data<float>()[i]) * g.data<float>()[i];
    DeviceBuffer dg = up(g);
    const double a = cuda::sum_of_squares_gpu(ctx.stream(), dg.as<float>(), n, scratch);
    const double b = cuda::sum_of_squares_gpu(ctx.stream(), dg.as<float>(), n, scratch);
    EXPECT_NEAR(a, ref, 1e-10 * ref) << "n " << n;
    EXPECT_EQ(a, b) << "n " << n;
  }
}

TEST(TrainOpsGpu, GradientAccumulationMatchesCpu) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(9);
  const int64_t n = 70001;
  TensorMap sum;
  DeviceBuffer g_sum = up(Tensor::zeros(DType::F32, {n}));
  for (int micro = 0; micro < 3; ++micro) {
    const TensorMap g{{"w", random_tensor(rng, {n})}};
    accumulate_grads(sum, g, 1.0 / 3.0);
    DeviceBuffer dg = up(g.at("w"));
    cuda::scaled_add_gpu(ctx.stream(), g_sum.as<float>(), dg.as<float>(), n, float(1.0 / 3.0));
  }
  EXPECT_LE(rel_l2(down(g_sum, {n}), sum.at("w")), 1e-6);
}

// Several steps of CPU clip_grad_norm + AdamW::step against the GPU pieces doing the same, decayed and non-decayed
// tensors, clipping active on some steps and not on others.
TEST(TrainOpsGpu, AdamWWithClippingMatchesCpuOverSteps) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  cuda::ReduceScratch scratch;
  std::mt19937 rng(10);
  const AdamWConfig config{0.9, 0.95, 1e-8, 0.1};
  const double max_norm = 4.0;
  TensorMap params{{"layers.0.mixer.in_proj.weight", random_tensor(rng, {67, 48})},
                   {"layers.0.norm.weight", random_tensor(rng, {130}, 0.5f, 1.5f)},
                   {"lm_head.weight", random_tensor(rng, {259, 48})}};
  const TensorMap params0 = [&] {
    TensorMap m;
    for (const auto& [name, t] : params) m[name] = t.clone();
    return m;
  }();
  AdamW cpu(config, params);
  struct GpuTensor {
    DeviceBuffer p, m, v;
    int64_t n;
  };
  std::map<std::string, GpuTensor> gpu;
  for (const auto& [name, t] : params) {
    const Tensor zeros = Tensor::zeros(DType::F32, t.shape());
    gpu[name] = GpuTensor{up(t), up(zeros), up(zeros), t.numel()};
  }
  int clipped = 0;
  for (int step = 0; step < 6; ++step) {
    SCOPED_TRACE(fmt::format("step {}", step));
    const float gscale = step % 2 == 0 ? 0.02f : 1.0f;  // odd steps exceed max_norm
    TensorMap grads;
    for (const auto& [name, t] : params) grads[name] = random_tensor(rng, t.shape(), -gscale, gscale);
    std::map<std::string, DeviceBuffer> g_dev;
    for (const auto& [name, g] : grads) g_dev[name] = up(g);
    const double lr = 1e-2 * (1.0 - 0.1 * step);
    const double norm_ref = clip_grad_norm(grads, max_norm);
    cpu.step(params, grads, lr);

    double sumsq = 0;
    for (const auto& [name, g] : g_dev)
      sumsq += cuda::sum_of_squares_gpu(ctx.stream(), g.as<float>(), gpu[name].n, scratch);
    const double norm = std::sqrt(sumsq);
    EXPECT_NEAR(norm, norm_ref, 1e-10 * norm_ref);
    if (norm > max_norm) {
      ++clipped;
      for (auto& [name, g] : g_dev)
        cuda::scale_gpu(ctx.stream(), g.as<float>(), gpu[name].n, float(max_norm / (norm + 1e-6)));
    }
    for (auto& [name, t] : gpu) {
      cuda::AdamWStepParams a;
      a.lr = lr;
      a.beta1 = config.beta1;
      a.beta2 = config.beta2;
      a.eps = config.eps;
      a.weight_decay = uses_weight_decay(name) ? config.weight_decay : 0.0;
      a.t = step + 1;
      cuda::adamw_update_gpu(ctx.stream(), t.p.as<float>(), g_dev[name].as<float>(), t.m.as<float>(),
                             t.v.as<float>(), t.n, a);
    }
  }
  EXPECT_GT(clipped, 0);
  std::map<std::string, Tensor> state;
  for (const auto& [name, t] : cpu.state_tensors()) state[name] = t;
  for (const auto& [name, t] : gpu) {
    SCOPED_TRACE(name);
    const Shape& shape = params.at(name).shape();
    EXPECT_LE(rel_l2(minus(down(t.p, shape), params0.at(name)), minus(params.at(name), params0.at(name))), 1e-5);
    EXPECT_LE(rel_l2(down(t.m, shape), state.at("exp_avg." + name)), 1e-5);
    EXPECT_LE(rel_l2(down(t.v, shape), state.at("exp_avg_sq." + name)), 1e-5);
  }
}

}  // namespace
}  // namespace mamba3::test
