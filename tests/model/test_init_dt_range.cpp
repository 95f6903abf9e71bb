// The official init-only ssm_cfg keys dt_min, dt_max, dt_init_floor (spec §1.1, §1.3): init_weights draws
// Δ₀ = softplus(dt_bias) log-uniformly in [dt_min, dt_max], floored at dt_init_floor; the keys are read, checked
// (errors name them) and written back to config.json only when they differ from the official defaults.
#include <gtest/gtest.h>

#include <cmath>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/init_weights.h"
#include "model/model_config.h"

namespace mamba3 {
namespace {

ModelConfig config(const nlohmann::json& ssm_extra) {
  nlohmann::json j = {{"d_model", 64}, {"n_layer", 2}, {"vocab_size", 16},
                      {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 4}}}};  // 32 heads
  j["ssm_cfg"].update(ssm_extra);
  return ModelConfig::from_json(j, "config.json");
}

// softplus(dt_bias) of every head of every layer.
std::vector<double> initial_dt(const ModelConfig& c, uint64_t seed) {
  const TensorMap w = init_weights(c, seed);
  std::vector<double> out;
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const Tensor& b = w.at("backbone.layers." + std::to_string(i) + ".mixer.dt_bias");
    for (int64_t h = 0; h < b.numel(); ++h) out.push_back(std::log1p(std::exp(double(b.data<float>()[h]))));
  }
  return out;
}

void expect_range(const std::vector<double>& dt, double lo, double hi) {
  double mn = 1e300, mx = 0;
  for (double d : dt) mn = std::min(mn, d), mx = std::max(mx, d);
  EXPECT_GE(mn, lo * (1 - 1e-5));
  EXPECT_LE(mx, hi * (1 + 1e-5));
  // Log-uniform over 64 heads: the extremes come close to the ends.
  EXPECT_LT(std::log(mn / lo), 0.25 * std::log(hi / lo));
  EXPECT_LT(std::log(hi / mx), 0.25 * std::log(hi / lo));
}

TEST(InitDtRange, DefaultsAreTheOfficialOnes) {
  const ModelConfig c = config(nlohmann::json::object());
  EXPECT_EQ(c.ssm.dt_min, 0.001);
  EXPECT_EQ(c.ssm.dt_max, 0.1);
  EXPECT_EQ(c.ssm.dt_init_floor, 1e-4);
  expect_range(initial_dt(c, 1), 0.001, 0.1);
  const nlohmann::json out = c.to_json();
  EXPECT_FALSE(out["ssm_cfg"].contains("dt_min"));
  EXPECT_FALSE(out["ssm_cfg"].contains("dt_max"));
  EXPECT_FALSE(out["ssm_cfg"].contains("dt_init_floor"));
}

TEST(InitDtRange, ConfiguredRangeIsUsedAndWritten) {
  const ModelConfig c = config({{"dt_min", 0.1}, {"dt_max", 1.0}});
  expect_range(initial_dt(c, 2), 0.1, 1.0);
  const nlohmann::json out = c.to_json();
  EXPECT_EQ(out["ssm_cfg"]["dt_min"], 0.1);
  EXPECT_EQ(out["ssm_cfg"]["dt_max"], 1.0);
  EXPECT_EQ(ModelConfig::from_json(out, "written").to_json(), out);
  // The floor binds: every Δ₀ drawn below it is raised to it.
  const ModelConfig f = config({{"dt_min", 1e-3}, {"dt_max", 1e-2}, {"dt_init_floor", 5e-3}});
  int at_floor = 0;
  for (double d : initial_dt(f, 3)) {
    EXPECT_GE(d, 5e-3 * (1 - 1e-5));
    at_floor += std::abs(d - 5e-3) < 1e-7;
  }
  EXPECT_GT(at_floor, 10);
}

TEST(InitDtRange, BadValuesNameTheField) {
  for (const auto& [extra, field] : std::vector<std::pair<nlohmann::json, std::string>>{
           {{{"dt_min", 0.0}}, "dt_min"}, {{{"dt_min", 0.5}, {"dt_max", 0.1}}, "dt_max"},
           {{{"dt_max", "big"}}, "dt_max"}, {{{"dt_init_floor", -1.0}}, "dt_init_floor"}}) {
    try {
      config(extra);
      ADD_FAILURE() << extra.dump() << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace mamba3
