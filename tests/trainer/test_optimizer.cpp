// AdamW against a hand-computed step, the weight-decay predicate, clipping, accumulation and the schedules.
#include <gtest/gtest.h>

#include <cmath>

#include "train/optimizer.h"

namespace mamba3 {
namespace {

TEST(AdamW, FirstTwoStepsMatchHandComputation) {
  TensorMap params{{"layer.weight", Tensor::from_floats({1.0f, -2.0f}, {2})},
                   {"layer.bias", Tensor::from_floats({0.5f}, {1})}};
  AdamWConfig c{0.9, 0.999, 1e-8, 0.1};
  AdamW opt(c, params);
  TensorMap grads{{"layer.weight", Tensor::from_floats({0.5f, -1.0f}, {2})},
                  {"layer.bias", Tensor::from_floats({2.0f}, {1})}};
  const double lr = 0.01;
  opt.step(params, grads, lr);
  // Step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g|+ε) = ±lr; decay multiplies weights by (1 − lr·wd).
  EXPECT_NEAR(params["layer.weight"].data<float>()[0], 1.0 * (1 - 0.001) - 0.01 * 0.5 / (0.5 + 1e-8), 1e-7);
  EXPECT_NEAR(params["layer.weight"].data<float>()[1], -2.0 * (1 - 0.001) + 0.01, 1e-7);
  EXPECT_NEAR(params["layer.bias"].data<float>()[0], 0.5 - 0.01, 1e-7);  // bias: no decay
  // Step 2 with g = 1 for the bias: m = 0.9·2·0.1... computed in full.
  grads["layer.bias"].data<float>()[0] = 1.0f;
  opt.step(params, grads, lr);
  const double m = 0.9 * 0.2 + 0.1 * 1.0, v = 0.999 * 0.001 * 4 + 0.001 * 1.0;
  const double mhat = m / (1 - 0.81), vhat = v / (1 - 0.999 * 0.999);
  EXPECT_NEAR(params["layer.bias"].data<float>()[0], 0.49 - lr * mhat / (std::sqrt(vhat) + 1e-8), 1e-6);
  EXPECT_EQ(opt.steps(), 2);
}

TEST(AdamW, RejectsMissingGradientAndNonF32) {
  TensorMap params{{"w", Tensor::from_floats({1.0f}, {1})}};
  AdamW opt(AdamWConfig{}, params);
  TensorMap none;
  EXPECT_THROW(opt.step(params, none, 0.1), Error);
  TensorMap bf{{"w", Tensor::from_floats({1.0f}, {1}).to(DType::BF16)}};
  EXPECT_THROW(AdamW(AdamWConfig{}, bf), Error);
}

TEST(AdamW, StateRoundTrip) {
  TensorMap params{{"w", Tensor::from_floats({1.0f, 2.0f}, {2})}};
  AdamW a(AdamWConfig{}, params);
  TensorMap g{{"w", Tensor::from_floats({0.3f, -0.7f}, {2})}};
  a.step(params, g, 0.1);
  TensorMap saved;
  for (auto& [n, t] : a.state_tensors()) saved[n] = t.clone();
  AdamW b(AdamWConfig{}, params);
  b.load_state(saved, a.steps(), "test");
  TensorMap pa{{"w", params["w"].clone()}}, pb{{"w", params["w"].clone()}};
  a.step(pa, g, 0.1);
  b.step(pb, g, 0.1);
  EXPECT_EQ(pa["w"].data<float>()[0], pb["w"].data<float>()[0]);
  EXPECT_EQ(pa["w"].data<float>()[1], pb["w"].data<float>()[1]);
  saved.erase("exp_avg_sq.w");
  EXPECT_THROW(b.load_state(saved, 1, "test"), Error);
}

TEST(WeightDecay, PredicateByName) {
  for (const char* yes : {"backbone.embedding.weight", "lm_head.weight", "backbone.layers.0.mixer.in_proj.weight",
                          "backbone.layers.0.mixer.out_proj.weight", "backbone.layers.1.mlp.fc1.weight",
                          "backbone.layers.1.mlp.fc2.weight", "backbone.layers.2.mixer.conv1d.weight"})
    EXPECT_TRUE(uses_weight_decay(yes)) << yes;
  for (const char* no :
       {"backbone.layers.0.mixer.dt_bias", "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.B_bias",
        "backbone.layers.0.mixer.C_bias", "backbone.layers.0.mixer.mimo_x", "backbone.layers.0.mixer.mimo_z",
        "backbone.layers.0.mixer.mimo_o", "backbone.layers.0.norm.weight", "backbone.layers.0.norm.bias",
        "backbone.layers.0.norm2.weight", "backbone.norm_f.weight", "backbone.layers.0.mixer.B_norm.weight",
        "backbone.layers.0.mixer.C_norm.weight", "backbone.layers.0.mixer.norm.weight",
        "backbone.layers.1.mixer.in_proj.bias", "backbone.layers.1.mixer.out_proj.bias",
        "backbone.layers.1.mixer.conv1d.bias"})
    EXPECT_FALSE(uses_weight_decay(no)) << no;
}

TEST(Clipping, ScalesToMaxNormAndReportsTheNorm) {
  TensorMap g{{"a", Tensor::from_floats({3.0f}, {1})}, {"b", Tensor::from_floats({4.0f, 0.0f}, {2})}};
  EXPECT_DOUBLE_EQ(global_grad_norm(g), 5.0);
  EXPECT_DOUBLE_EQ(clip_grad_norm(g, 10.0), 5.0);  // under the limit: untouched
  EXPECT_EQ(g["a"].data<float>()[0], 3.0f);
  EXPECT_DOUBLE_EQ(clip_grad_norm(g, 1.0), 5.0);
  EXPECT_NEAR(global_grad_norm(g), 1.0, 1e-6);
  EXPECT_NEAR(g["a"].data<float>()[0], 0.6, 1e-6);
  TensorMap h{{"a", Tensor::from_floats({30.0f}, {1})}};
  EXPECT_DOUBLE_EQ(clip_grad_norm(h, 0), 30.0);  // 0 = off
  EXPECT_EQ(h["a"].data<float>()[0], 30.0f);
  TensorMap bad{{"a", Tensor::from_floats({NAN}, {1})}};
  EXPECT_THROW(clip_grad_norm(bad, 1.0), Error);
}

TEST(Accumulation, WeightedSum) {
  TensorMap sum;
  accumulate_grads(sum, {{"a", Tensor::from_floats({1.0f, 2.0f}, {2})}}, 0.5);
  accumulate_grads(sum, {{"a", Tensor::from_floats({3.0f, 4.0f}, {2})}}, 0.5);
  EXPECT_FLOAT_EQ(sum["a"].data<float>()[0], 2.0f);
  EXPECT_FLOAT_EQ(sum["a"].data<float>()[1], 3.0f);
  EXPECT_THROW(accumulate_grads(sum, {{"a", Tensor::from_floats({1.0f}, {1})}}, 1.0), Error);
}

TEST(Schedule, CosineKeyValues) {
  LrSchedule s{LrSchedule::Kind::Cosine, 1.0, 0.1, 10, 110, 0.2};
  EXPECT_DOUBLE_EQ(s.at(0), 0.1);   // (0+1)/10
  EXPECT_DOUBLE_EQ(s.at(4), 0.5);
  EXPECT_DOUBLE_EQ(s.at(9), 1.0);   // warmup ends at the peak
  EXPECT_DOUBLE_EQ(s.at(10), 1.0);  // cosine starts at the peak
  EXPECT_NEAR(s.at(60), 0.55, 1e-12);  // halfway: (peak + min) / 2
  EXPECT_NEAR(s.at(109), 0.1 + 0.45 * (1 + std::cos(M_PI * 99 / 100)), 1e-12);
  EXPECT_DOUBLE_EQ(s.at(500), s.at(109));  // past the end: the final value
  for (int64_t i = 10; i < 109; ++i) EXPECT_GE(s.at(i), s.at(i + 1));
}

TEST(Schedule, WarmupStableDecayKeyValues) {
  LrSchedule s{LrSchedule::Kind::WarmupStableDecay, 2.0, 0.0, 5, 100, 0.2};
  EXPECT_DOUBLE_EQ(s.at(0), 0.4);
  EXPECT_DOUBLE_EQ(s.at(4), 2.0);
  EXPECT_DOUBLE_EQ(s.at(5), 2.0);
  EXPECT_DOUBLE_EQ(s.at(79), 2.0);  // stable until the last 20 steps
  EXPECT_DOUBLE_EQ(s.at(80), 2.0 - 2.0 / 20);
  EXPECT_DOUBLE_EQ(s.at(89), 1.0);
  EXPECT_DOUBLE_EQ(s.at(99), 0.0);  // reaches min at the last step
  EXPECT_EQ(LrSchedule::parse_kind("wsd"), LrSchedule::Kind::WarmupStableDecay);
  EXPECT_THROW(LrSchedule::parse_kind("linear"), Error);
}

}  // namespace
}  // namespace mamba3
