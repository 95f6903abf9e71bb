// AttentionTrainGpu (GPU training of the hybrid attention mixer) against the CPU attention_train_forward /
// attention_train_backward: random weights, awkward shapes (batch 3 with L 17, 1, 65, 300 through one layer object,
// so its buffers grow and are reused; GQA 6×2, MQA, MHA; head_dim 16, 64, 72, 256; conv 0/3/4, MLP branch, biases,
// rotary both pairings or none, custom softmax scale, causal and bidirectional). The output, dx and every
// parameter gradient within relative L2 1e-5 (F32) or 2e-2 (BF16) of the CPU; outputs poisoned with NaN first.
// Also: two backward calls give bit-identical gradients (determinism), and a second call adds to the gradients.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/attention_train_gpu.h"
#include "cuda/train/train_gemm.h"
#include "gpu_test_util.h"
#include "train/attention_layer_grad.h"

namespace mamba3::cuda {
namespace {

struct Case {
  const char* name;
  int64_t d_model, heads, kv_heads, head_dim, rotary, d_conv, mlp_dim;
  bool interleaved, causal, biases;
  double scale;  // 0: head_dim^-½
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (B, L) in order, one layer object
};

const std::vector<std::pair<int64_t, int64_t>> kShapes = {{3, 17}, {3, 1}, {2, 65}, {3, 300}};

const Case kCases[] = {
    {"gqa6x2_hd16_rot8_conv4_mlp100_causal", 48, 6, 2, 16, 8, 4, 100, false, true, true, 0, kShapes},
    {"gqa6x2_hd64_rot32i_causal", 96, 6, 2, 64, 32, 0, 0, true, true, true, 0, kShapes},
    {"mha4_hd64_rot16_conv4_mlp300_nobias_bidir", 64, 4, 4, 64, 16, 4, 300, false, false, false, 0, kShapes},
    {"mqa3x1_hd72_norot_conv3_scale_causal", 40, 3, 1, 72, 0, 3, 0, false, true, true, 0.3, kShapes},
    {"gqa6x2_hd16_rot16i_mlp100_bidir", 32, 6, 2, 16, 16, 0, 100, true, false, true, 0, kShapes},
    {"mha2_hd256_rot32i_conv4_causal", 64, 2, 2, 256, 32, 4, 0, true, true, true, 0, {{3, 1}, {2, 40}}},
};

AttentionConfig config_of(const Case& c) {
  AttentionConfig a;
  a.num_heads = c.heads;
  a.num_heads_kv = c.kv_heads;
  a.head_dim = c.head_dim;
  a.mlp_dim = c.mlp_dim;
  a.qkv_proj_bias = c.biases;
  a.out_proj_bias = c.biases;
  a.softmax_scale = c.scale;
  a.causal = c.causal;
  a.causal_given = true;
  a.d_conv = c.d_conv;
  a.rotary_emb_dim = c.rotary;
  a.rotary_emb_interleaved = c.interleaved;
  return a;
}

std::vector<float> uniform(std::mt19937& rng, int64_t n, float r) {
  std::uniform_real_distribution<float> u(-r, r);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}

double rel_l2(const std::vector<float>& out, const std::vector<float>& ref) {
  EXPECT_EQ(out.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size() && i < ref.size(); ++i) {
    const double d = double(out[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));  // NaN anywhere stays NaN (and fails)
}

// The six parameters on the host (empty where the config has none) and on the device.
struct Params {
  std::vector<float> h[6];
  DeviceBuffer dev[6];
};
enum { kInW, kInB, kConvW, kConvB, kOutW, kOutB };
const char* const kParamNames[6] = {"in_proj.weight", "in_proj.bias", "conv1d.weight",
                                    "conv1d.bias",    "out_proj.weight", "out_proj.bias"};

const float* ptr_or_null(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }
float* ptr_or_null(std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }
float* dev_or_null(const DeviceBuffer& b) { return b.empty() ? nullptr : b.as<float>(); }

struct Harness {
  Case c;
  AttentionConfig cfg;
  int64_t D, qkv, width, ctx_w;
  Params w, g;  // weights; gradients (g.h only gives the sizes)
  Context ctx;
  TrainGemm gemm;
  AttentionTrainGpu gpu;
  double tol;

  Harness(const Case& cs, Precision p, std::mt19937& rng)
      : c(cs),
        cfg(config_of(cs)),
        D(cs.d_model),
        qkv(cfg.qkv_dim()),
        width(qkv + (cfg.mlp_dim ? cfg.mlp_width() : 0)),
        ctx_w(cfg.num_heads * cfg.head_dim + (width - qkv) / 2),
        gemm(p),
        gpu(cfg, cs.d_model),
        tol(p == Precision::F32 ? 1e-5 : 2e-2) {
    const float in_r = 2.0f / std::sqrt(float(D)), out_r = 1.0f / std::sqrt(float(ctx_w));
    w.h[kInW] = uniform(rng, width * D, in_r);
    if (cfg.qkv_proj_bias) w.h[kInB] = uniform(rng, width, 0.5f);
    if (cfg.d_conv > 0) {
      w.h[kConvW] = uniform(rng, qkv * cfg.d_conv, 0.6f);
      w.h[kConvB] = uniform(rng, qkv, 0.3f);
    }
    w.h[kOutW] = uniform(rng, D * ctx_w, out_r);
    if (cfg.out_proj_bias) w.h[kOutB] = uniform(rng, D, 0.5f);
    for (int i = 0; i < 6; ++i) {
      if (w.h[i].empty()) continue;
      w.dev[i] = DeviceBuffer::from(w.h[i]);
      g.dev[i] = DeviceBuffer(w.h[i].size() * sizeof(float));
    }
  }

  AttentionTrainWeights weights() const {
    return {dev_or_null(w.dev[kInW]),  dev_or_null(w.dev[kInB]),  dev_or_null(w.dev[kConvW]),
            dev_or_null(w.dev[kConvB]), dev_or_null(w.dev[kOutW]), dev_or_null(w.dev[kOutB])};
  }
  AttentionTrainGrads grads() const {
    return {dev_or_null(g.dev[kInW]),  dev_or_null(g.dev[kInB]),  dev_or_null(g.dev[kConvW]),
            dev_or_null(g.dev[kConvB]), dev_or_null(g.dev[kOutW]), dev_or_null(g.dev[kOutB])};
  }
  void zero_grads() {
    for (DeviceBuffer& b : g.dev)
      if (!b.empty()) MAMBA3_CUDA_CHECK(cudaMemset(b.raw(), 0, b.bytes()));
  }

  // Forward then backward on the GPU (gradients zeroed first); out and dx come back, gradients stay in g.dev.
  void run_gpu(const DeviceBuffer& x, const DeviceBuffer& dout, int64_t B, int64_t L, std::vector<float>& out,
               std::vector<float>& dx) {
    const int64_t N = B * L;
    DeviceBuffer out_d(size_t(N * D) * sizeof(float)), dx_d(size_t(N * D) * sizeof(float));
    test::poison(out_d.raw(), out_d.bytes());
    test::poison(dx_d.raw(), dx_d.bytes());
    zero_grads();
    gpu.forward(ctx, gemm, weights(), x.as<float>(), B, L, out_d.as<float>());
    gpu.backward(ctx, gemm, weights(), grads(), x.as<float>(), B, L, dout.as<float>(), dx_d.as<float>());
    ctx.sync();
    out = out_d.to_vector<float>();
    dx = dx_d.to_vector<float>();
  }

  std::vector<float> grad(int i) const { return g.dev[i].to_vector<float>(); }

  // One (B, L) shape: GPU against CPU for the output, dx and each gradient.
  void check_shape(std::mt19937& rng, int64_t B, int64_t L) {
    const int64_t N = B * L;
    const std::vector<float> x = uniform(rng, N * D, 1.0f), dout = uniform(rng, N * D, 1.0f);
    // CPU reference.
    AttentionParamViews pv;
    pv.in_w = ptr_or_null(w.h[kInW]), pv.in_b = ptr_or_null(w.h[kInB]), pv.conv_w = ptr_or_null(w.h[kConvW]);
    pv.conv_b = ptr_or_null(w.h[kConvB]), pv.out_w = ptr_or_null(w.h[kOutW]), pv.out_b = ptr_or_null(w.h[kOutB]);
    std::vector<float> ref_g[6];
    for (int i = 0; i < 6; ++i) ref_g[i].assign(w.h[i].size(), 0.0f);
    AttentionGradViews gv;
    gv.in_w = ptr_or_null(ref_g[kInW]), gv.in_b = ptr_or_null(ref_g[kInB]), gv.conv_w = ptr_or_null(ref_g[kConvW]);
    gv.conv_b = ptr_or_null(ref_g[kConvB]), gv.out_w = ptr_or_null(ref_g[kOutW]), gv.out_b = ptr_or_null(ref_g[kOutB]);
    AttentionActivations act;
    std::vector<float> ref_out(size_t(N * D)), ref_dx(size_t(N * D));
    attention_train_forward(cfg, D, pv, x.data(), B, L, act, ref_out.data());
    attention_train_backward(cfg, D, pv, x.data(), B, L, act, dout.data(), ref_dx.data(), gv);

    const DeviceBuffer x_d = DeviceBuffer::from(x), dout_d = DeviceBuffer::from(dout);
    std::vector<float> out, dx;
    run_gpu(x_d, dout_d, B, L, out, dx);
    const std::string where = std::string(c.name) + " B " + std::to_string(B) + " L " + std::to_string(L);
    const double e_out = rel_l2(out, ref_out), e_dx = rel_l2(dx, ref_dx);
    EXPECT_LT(e_out, tol) << where << ": output";
    EXPECT_LT(e_dx, tol) << where << ": dx";
    std::printf("  %-48s B %lld L %3lld: out %.2e dx %.2e", c.name, (long long)B, (long long)L, e_out, e_dx);
    for (int i = 0; i < 6; ++i) {
      if (w.h[i].empty()) continue;
      const double e = rel_l2(grad(i), ref_g[i]);
      EXPECT_LT(e, tol) << where << ": gradient of " << kParamNames[i];
      std::printf(" %s %.2e", kParamNames[i], e);
    }
    std::printf("\n");
  }
};

void run_cases(Precision p) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    std::mt19937 rng(1234);
    Harness h(c, p, rng);
    for (const auto& [B, L] : c.shapes) h.check_shape(rng, B, L);
  }
}

TEST(AttentionTrainGpu, MatchesCpuF32) {
  MAMBA3_REQUIRE_GPU();
  run_cases(Precision::F32);
}

TEST(AttentionTrainGpu, MatchesCpuBf16) {
  MAMBA3_REQUIRE_GPU();
  run_cases(Precision::BF16);
}

// Two forward/backward passes give bit-identical outputs, dx and gradients; a second backward without zeroing
// doubles the gradients (they are accumulated, not overwritten).
void check_determinism(Precision p) {
  const Case& c = kCases[0];  // GQA, conv, MLP branch, biases, rotary: every kernel runs
  std::mt19937 rng(99);
  Harness h(c, p, rng);
  const int64_t B = 3, L = 300, N = B * L;
  const DeviceBuffer x = DeviceBuffer::from(uniform(rng, N * h.D, 1.0f));
  const DeviceBuffer dout = DeviceBuffer::from(uniform(rng, N * h.D, 1.0f));
  std::vector<float> out1, dx1, out2, dx2;
  h.run_gpu(x, dout, B, L, out1, dx1);
  std::vector<float> g1[6];
  for (int i = 0; i < 6; ++i)
    if (!h.w.h[i].empty()) g1[i] = h.grad(i);
  h.run_gpu(x, dout, B, L, out2, dx2);
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(out1, out2)) << "output";
  EXPECT_TRUE(same(dx1, dx2)) << "dx";
  for (int i = 0; i < 6; ++i) {
    if (!h.w.h[i].empty()) {
      EXPECT_TRUE(same(g1[i], h.grad(i))) << "gradient of " << kParamNames[i];
    }
  }

  // Accumulation: one more backward on top of the second pass's gradients.
  DeviceBuffer dx_d(size_t(N * h.D) * sizeof(float));
  h.gpu.backward(h.ctx, h.gemm, h.weights(), h.grads(), x.as<float>(), B, L, dout.as<float>(), dx_d.as<float>());
  h.ctx.sync();
  for (int i = 0; i < 6; ++i) {
    if (h.w.h[i].empty()) continue;
    std::vector<float> twice = g1[i];
    for (float& v : twice) v *= 2.0f;
    EXPECT_LT(rel_l2(h.grad(i), twice), 1e-6) << "accumulated gradient of " << kParamNames[i];
  }
}

TEST(AttentionTrainGpu, DeterministicAndAccumulatingF32) {
  MAMBA3_REQUIRE_GPU();
  check_determinism(Precision::F32);
}

TEST(AttentionTrainGpu, DeterministicAndAccumulatingBf16) {
  MAMBA3_REQUIRE_GPU();
  check_determinism(Precision::BF16);
}

// A backward whose shape differs from the saved forward's is refused.
TEST(AttentionTrainGpu, BackwardShapeMustMatchForward) {
  MAMBA3_REQUIRE_GPU();
  std::mt19937 rng(5);
  Harness h(kCases[1], Precision::F32, rng);
  const int64_t B = 2, L = 5, N = B * L;
  const DeviceBuffer x = DeviceBuffer::from(uniform(rng, N * h.D, 1.0f));
  DeviceBuffer out(size_t(N * h.D) * sizeof(float)), dx(size_t(N * h.D) * sizeof(float));
  h.zero_grads();
  h.gpu.forward(h.ctx, h.gemm, h.weights(), x.as<float>(), B, L, out.as<float>());
  EXPECT_THROW(h.gpu.backward(h.ctx, h.gemm, h.weights(), h.grads(), x.as<float>(), B, L - 1, out.as<float>(),
                              dx.as<float>()),
               Error);
}

}  // namespace
}  // namespace mamba3::cuda
