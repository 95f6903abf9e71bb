// init_weights with parallel streams (the benchmarks' init): the same tensors, shapes and constants as the sequential
// reference, random tensors with the same distributions (mean, spread, bounds), deterministic for a seed and
// independent of the thread count; the sequential reference itself is unchanged (two calls agree bit for bit).
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "model/init_weights.h"
#include "model/model_config.h"

namespace mamba3 {
namespace {

ModelConfig config() {
  // Enough values per tensor for several 2^20 blocks in the embedding (3000 × 768 ≈ 2.2M), odd sizes elsewhere.
  nlohmann::json j = {{"d_model", 768}, {"n_layer", 2}, {"vocab_size", 3001}, {"d_intermediate", 520},
                      {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 32}}}};
  return ModelConfig::from_json(j, "config.json");
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

struct Stats {
  double mean = 0, sd = 0, max_abs = 0;
};
Stats stats(const Tensor& t) {
  Stats s;
  const float* d = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) s.mean += d[i], s.max_abs = std::max(s.max_abs, std::fabs(double(d[i])));
  s.mean /= double(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) s.sd += (d[i] - s.mean) * (d[i] - s.mean);
  s.sd = std::sqrt(s.sd / double(t.numel()));
  return s;
}

TEST(InitStreams, ParallelMatchesTheReferenceDistributions) {
  const ModelConfig c = config();
  const TensorMap seq = init_weights(c, 5), par = init_weights(c, 5, InitStreams::Parallel);
  ASSERT_EQ(seq.size(), par.size());
  int random_tensors = 0;
  for (const auto& [name, s] : seq) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(par.count(name));
    const Tensor& p = par.at(name);
    ASSERT_EQ(s.shape(), p.shape());
    const Stats a = stats(s), b = stats(p);
    if (a.sd == 0) {  // a constant (norms, biases, D, mimo vectors): identical
      EXPECT_TRUE(same_bits(s, p));
      continue;
    }
    if (name.find("dt_bias") != std::string::npos) continue;  // a few values per layer: covered by test_init_dt_range
    ++random_tensors;
    EXPECT_FALSE(same_bits(s, p)) << "parallel streams should draw other values";
    const double n = double(s.numel());
    EXPECT_LE(std::fabs(b.mean), 5 * a.sd / std::sqrt(n)) << "mean";
    EXPECT_NEAR(b.sd, a.sd, 0.05 * a.sd) << "spread";
    if (name.find("embedding") == std::string::npos) {  // uniform: the same bound
      EXPECT_LE(b.max_abs, a.max_abs * (1 + 1e-3) + 1e-6);
      EXPECT_GE(b.max_abs, a.max_abs * 0.95);
    }
  }
  EXPECT_GE(random_tensors, 5);
}

TEST(InitStreams, DeterministicAndThreadCountIndependent) {
  const ModelConfig c = config();
  EXPECT_TRUE(same_bits(init_weights(c, 9).at("backbone.embedding.weight"),
                        init_weights(c, 9).at("backbone.embedding.weight")));
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const TensorMap one = init_weights(c, 9, InitStreams::Parallel);
  omp_set_num_threads(std::max(2, threads));
  const TensorMap many = init_weights(c, 9, InitStreams::Parallel);
  omp_set_num_threads(threads);
  for (const auto& [name, t] : one) EXPECT_TRUE(same_bits(t, many.at(name))) << name;
  EXPECT_FALSE(same_bits(one.at("backbone.embedding.weight"),
                         init_weights(c, 10, InitStreams::Parallel).at("backbone.embedding.weight")))
      << "another seed, other values";
}

}  // namespace
}  // namespace mamba3
