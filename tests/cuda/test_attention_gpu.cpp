// GpuAttentionLayer against the CPU AttentionLayer: random layers of awkward shapes (GQA/MQA/MHA, head_dim 16, 24,
// 72, 256, rotary both pairings or none, conv 0/4, MLP branch, causal and bidirectional prefill, no biases, a
// custom softmax scale) in f32 (relative L2 < 1e-5) and bf16 (< 2e-2). Rows of one cache are prefilled with
// different lengths (one in two chunks), then decoded together; the cache contents, a CUDA-graph replay of step
// and copy_row are checked too. Outputs and the unused cache slots are poisoned with NaN beforehand.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "cuda/attention_gpu.h"
#include "model/attention_layer.h"
#include "support/test_support.h"

namespace mamba3::cuda {
namespace {

struct Case {
  const char* name;
  int64_t d_model, heads, kv_heads, head_dim, rotary, d_conv, mlp_dim;
  bool interleaved, causal, biases;
  double scale;  // 0: head_dim^-½
};

const Case kCases[] = {
    {"gqa6x2_hd16_rot8_causal", 48, 6, 2, 16, 8, 0, 0, false, true, true, 0},
    {"mha3_hd24_rot8i_conv4_mlp100_bidir", 40, 3, 3, 24, 8, 4, 100, true, false, true, 0},
    {"gqa6x2_hd24_rot8i_conv4_causal", 40, 6, 2, 24, 8, 4, 0, true, true, true, 0},
    {"mha3_hd16_norot_conv4_mlp100_nobias_scale", 32, 3, 3, 16, 0, 4, 100, false, true, false, 0.3},
    {"gqa6x2_hd16_rot8_conv4_bidir", 48, 6, 2, 16, 8, 4, 0, false, false, true, 0},
    {"mqa4x1_hd72_rot16_mlp100_bidir", 64, 4, 1, 72, 16, 0, 100, false, false, true, 0},
    {"mqa2x1_hd256_rot32i_conv4_causal", 64, 2, 1, 256, 32, 4, 0, true, true, true, 0},
};

const std::string kPrefix = "backbone.layers.1.mixer.";

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

TensorMap random_weights(const AttentionConfig& a, int64_t d_model, std::mt19937& rng) {
  const int64_t qkv = a.qkv_dim(), mlp = a.mlp_dim ? a.mlp_width() : 0;
  const int64_t ctx_w = a.num_heads * a.head_dim + mlp / 2;
  const float in_r = 2.0f / std::sqrt(float(d_model)), out_r = 1.0f / std::sqrt(float(ctx_w));
  TensorMap w;
  w[kPrefix + "in_proj.weight"] = test::random_tensor(rng, {qkv + mlp, d_model}, -in_r, in_r);
  if (a.qkv_proj_bias) w[kPrefix + "in_proj.bias"] = test::random_tensor(rng, {qkv + mlp}, -0.5f, 0.5f);
  if (a.d_conv > 0) {
    w[kPrefix + "conv1d.weight"] = test::random_tensor(rng, {qkv, 1, a.d_conv}, -0.6f, 0.6f);
    w[kPrefix + "conv1d.bias"] = test::random_tensor(rng, {qkv}, -0.3f, 0.3f);
  }
  w[kPrefix + "out_proj.weight"] = test::random_tensor(rng, {d_model, ctx_w}, -out_r, out_r);
  if (a.out_proj_bias) w[kPrefix + "out_proj.bias"] = test::random_tensor(rng, {d_model}, -0.5f, 0.5f);
  return w;
}

double rel_l2(const std::vector<float>& out, const std::vector<float>& ref) {
  EXPECT_EQ(out.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size() && i < ref.size(); ++i) {
    const double d = double(out[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

// Random activations, rounded to bf16 when the GPU takes bf16 (so both sides see the same values).
std::vector<float> random_x(std::mt19937& rng, int64_t n, Precision p) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = p == Precision::BF16 ? bf16_to_f32(f32_to_bf16(u(rng))) : u(rng);
  return x;
}

// x as device activations of precision p.
DeviceBuffer upload_activations(const std::vector<float>& x, Precision p) {
  if (p == Precision::F32) return DeviceBuffer::from(x);
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = f32_to_bf16(x[i]);
  return DeviceBuffer::from(h);
}

void poison(DeviceBuffer& b) {  // all-ones bytes: a NaN in every float
  MAMBA3_CUDA_CHECK(cudaMemset(b.raw(), 0xFF, b.bytes()));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
}

struct Harness {
  Case c;
  Precision p;
  AttentionConfig cfg;
  TensorMap weights;
  AttentionLayer cpu;
  GpuAttentionLayer gpu;
  Context ctx;
  double tol;
  double worst = 0;  // the largest output error seen, for the log

  Harness(const Case& cs, Precision prec, std::mt19937& rng)
      : c(cs),
        p(prec),
        cfg(config_of(cs)),
        weights(random_weights(cfg, cs.d_model, rng)),
        cpu(cfg, cs.d_model, weights, kPrefix, "test", nullptr),
        gpu(cfg, cs.d_model, weights, kPrefix, "test", nullptr, prec),
        tol(prec == Precision::F32 ? 1e-5 : 2e-2) {}

  GpuAttentionCache poisoned_cache(int64_t batch, int64_t capacity) {
    GpuAttentionCache cache = gpu.new_cache(batch, capacity);
    poison(cache.k);  // slots past each row's length must never be read
    poison(cache.v);
    return cache;
  }

  // Prefill chunk x (L rows) into `row` on both sides; returns the relative error of the outputs.
  double prefill(std::mt19937& rng, int64_t L, GpuAttentionCache& cache, int64_t row, AttentionRowCache& ref_cache) {
    const int64_t D = c.d_model;
    const std::vector<float> x = random_x(rng, L * D, p);
    DeviceBuffer xd = upload_activations(x, p);
    DeviceBuffer out(size_t(L * D) * sizeof(float));
    poison(out);
    gpu.prefill(ctx, xd.raw(), L, cache, row, ref_cache.length, out.as<float>());
    ctx.sync();
    std::vector<float> ref(static_cast<size_t>(L * D));
    cpu.forward(x.data(), L, ref_cache, ref.data());
    return note(rel_l2(out.to_vector<float>(), ref));
  }

  // One decode step of every row of `cache` (refs[b] its CPU twin); `graph`: capture it and replay.
  double step(std::mt19937& rng, GpuAttentionCache& cache, std::vector<AttentionRowCache*> refs, bool graph = false) {
    const int64_t D = c.d_model, B = cache.batch;
    const std::vector<float> x = random_x(rng, B * D, p);
    DeviceBuffer xd = upload_activations(x, p);
    DeviceBuffer out(size_t(B * D) * sizeof(float));
    poison(out);
    if (graph) {
      cudaGraph_t g = nullptr;
      cudaGraphExec_t exec = nullptr;
      MAMBA3_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
      gpu.step(ctx, xd.raw(), B, cache, out.as<float>());
      MAMBA3_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &g));
      MAMBA3_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
      MAMBA3_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
      ctx.sync();
      MAMBA3_CUDA_CHECK(cudaGraphExecDestroy(exec));
      MAMBA3_CUDA_CHECK(cudaGraphDestroy(g));
    } else {
      gpu.step(ctx, xd.raw(), B, cache, out.as<float>());
      ctx.sync();
    }
    std::vector<float> ref(static_cast<size_t>(B * D));
    for (int64_t b = 0; b < B; ++b) cpu.forward(x.data() + b * D, 1, *refs[size_t(b)], ref.data() + b * D);
    return note(rel_l2(out.to_vector<float>(), ref));
  }

  double note(double err) {
    worst = std::isnan(err) || err > worst ? err : worst;
    return err;
  }

  // The device cache of `row` against its CPU twin: lengths, k and v of the held tokens, conv state.
  void expect_cache(const GpuAttentionCache& cache, int64_t row, const AttentionRowCache& ref) {
    const std::vector<int32_t> lengths = cache.lengths.to_vector<int32_t>();
    ASSERT_EQ(lengths[size_t(row)], ref.length) << "row " << row;
    const int64_t per_token = cfg.kv_heads() * cfg.head_dim, n = ref.length * per_token;
    const std::vector<float> k = cache.k.to_vector<float>(), v = cache.v.to_vector<float>();
    const size_t at = size_t(row * cache.capacity * per_token);
    EXPECT_LT(rel_l2(std::vector<float>(k.begin() + at, k.begin() + at + n), {ref.k.begin(), ref.k.begin() + n}),
              tol)
        << "k of row " << row;
    EXPECT_LT(rel_l2(std::vector<float>(v.begin() + at, v.begin() + at + n), {ref.v.begin(), ref.v.begin() + n}),
              tol)
        << "v of row " << row;
    if (cfg.d_conv > 0) {
      const std::vector<float> conv = cache.conv.to_vector<float>();
      const size_t per_row = ref.conv.size();
      EXPECT_LT(rel_l2(std::vector<float>(conv.begin() + row * per_row, conv.begin() + (row + 1) * per_row),
                       ref.conv),
                tol)
          << "conv state of row " << row;
    }
  }
};

class GpuAttention : public ::testing::TestWithParam<std::tuple<Case, Precision>> {};

TEST_P(GpuAttention, PrefillDecodeGraphAndCopyRowMatchTheCpuLayer) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const auto [c, p] = GetParam();
  std::mt19937 rng(1234);
  Harness h(c, p, rng);
  const int64_t capacity = 80, B = 3;
  GpuAttentionCache cache = h.poisoned_cache(B, capacity);
  std::vector<AttentionRowCache> refs(B, h.cpu.new_cache());

  // Rows of different lengths: 1, 7 (as 3 + 4: the continuation of conv state, rotary positions and masks), 65.
  EXPECT_LT(h.prefill(rng, 1, cache, 0, refs[0]), h.tol) << "prefill row 0, L 1";
  EXPECT_LT(h.prefill(rng, 3, cache, 1, refs[1]), h.tol) << "prefill row 1, L 3";
  EXPECT_LT(h.prefill(rng, 4, cache, 1, refs[1]), h.tol) << "prefill row 1, L 4 after 3";
  EXPECT_LT(h.prefill(rng, 65, cache, 2, refs[2]), h.tol) << "prefill row 2, L 65";
  for (int64_t b = 0; b < B; ++b) h.expect_cache(cache, b, refs[size_t(b)]);

  std::vector<AttentionRowCache*> all = {&refs[0], &refs[1], &refs[2]};
  for (int s = 0; s < 5; ++s) EXPECT_LT(h.step(rng, cache, all), h.tol) << "decode step " << s;
  for (int s = 0; s < 2; ++s) EXPECT_LT(h.step(rng, cache, all, true), h.tol) << "graph-replayed step " << s;
  for (int64_t b = 0; b < B; ++b) h.expect_cache(cache, b, refs[size_t(b)]);

  // copy_row: rows 2 and 0 into a cache of batch 2, which then decodes on its own.
  GpuAttentionCache other = h.poisoned_cache(2, capacity);
  GpuAttentionLayer::copy_row(h.ctx, cache, 2, other, 0);
  GpuAttentionLayer::copy_row(h.ctx, cache, 0, other, 1);
  h.ctx.sync();
  AttentionRowCache ref0 = refs[2], ref1 = refs[0];
  h.expect_cache(other, 0, ref0);
  h.expect_cache(other, 1, ref1);
  for (int s = 0; s < 2; ++s) EXPECT_LT(h.step(rng, other, {&ref0, &ref1}), h.tol) << "step after copy_row " << s;
  h.expect_cache(other, 0, ref0);
  h.expect_cache(other, 1, ref1);
  std::printf("[ info ] %s %s: largest output error %.3g (tolerance %.0e)\n", c.name, precision_name(p), h.worst,
              h.tol);
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuAttention,
                         ::testing::Combine(::testing::ValuesIn(kCases),
                                            ::testing::Values(Precision::F32, Precision::BF16)),
                         [](const ::testing::TestParamInfo<std::tuple<Case, Precision>>& info) {
                           return std::string(std::get<0>(info.param).name) + "_" +
                                  precision_name(std::get<1>(info.param));
                         });

// A long context: one row prefilled with 1500 tokens (chunks of 1000 and 500), then decoded; keys far more
// numerous than the attention block's warps.
TEST(GpuAttentionLong, LongPrefillThenDecode) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  for (const bool causal : {true, false}) {
    Case c{"long", 64, 4, 2, 32, 16, 4, 0, false, causal, true, 0};
    std::mt19937 rng(7);
    Harness h(c, Precision::F32, rng);
    GpuAttentionCache cache = h.poisoned_cache(1, 1510);
    std::vector<AttentionRowCache> refs(1, h.cpu.new_cache());
    EXPECT_LT(h.prefill(rng, 1000, cache, 0, refs[0]), h.tol) << "causal " << causal;
    EXPECT_LT(h.prefill(rng, 500, cache, 0, refs[0]), h.tol) << "causal " << causal;
    for (int s = 0; s < 3; ++s) EXPECT_LT(h.step(rng, cache, {&refs[0]}), h.tol) << "causal " << causal;
    h.expect_cache(cache, 0, refs[0]);
    std::printf("[ info ] long, causal %d: largest output error %.3g\n", int(causal), h.worst);
  }
}

TEST(GpuAttentionChecks, RejectsOverflowAndBadShapes) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(3);
  Harness h(kCases[0], Precision::F32, rng);
  GpuAttentionCache cache = h.gpu.new_cache(2, 8);
  DeviceBuffer x(size_t(9 * h.c.d_model) * sizeof(float)), out(size_t(9 * h.c.d_model) * sizeof(float));
  EXPECT_THROW(h.gpu.prefill(h.ctx, x.raw(), 9, cache, 0, 0, out.as<float>()), Error);
  EXPECT_THROW(h.gpu.prefill(h.ctx, x.raw(), 4, cache, 0, 5, out.as<float>()), Error);
  EXPECT_THROW(h.gpu.prefill(h.ctx, x.raw(), 1, cache, 2, 0, out.as<float>()), Error);
  EXPECT_THROW(h.gpu.step(h.ctx, x.raw(), 3, cache, out.as<float>()), Error);
  TensorMap bad = h.weights;
  bad[kPrefix + "in_proj.weight"] = test::random_tensor(rng, {5, h.c.d_model});
  EXPECT_THROW(GpuAttentionLayer(h.cfg, h.c.d_model, bad, kPrefix, "test", nullptr, Precision::F32), Error);
  std::set<std::string> used;
  GpuAttentionLayer layer(h.cfg, h.c.d_model, h.weights, kPrefix, "test", &used, Precision::BF16);
  EXPECT_EQ(used.size(), h.weights.size());
  EXPECT_GT(layer.parameter_bytes(), size_t(0));
}

}  // namespace
}  // namespace mamba3::cuda
