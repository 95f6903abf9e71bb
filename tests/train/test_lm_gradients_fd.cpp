// Finite-difference checks of lm_loss_and_grad on whole tiny models (SISO + MLP + LayerNorm, MIMO, hybrids with
// attention: GQA, rotary in both pairings, causal and not, conv, MLP branch; tied and untied heads). For every
// parameter tensor, the analytic directional derivative along (a) a random ±1 direction over sampled entries and
// (b) single entries, random and of largest gradient, is compared with a Richardson-extrapolated central difference of the f32 loss.
// A guard test shows that a gradient perturbed by a few percent in one entry is caught.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "lm_test_models.h"
#include "train/lm_gradients.h"

namespace mamba3::test {
namespace {

constexpr int64_t kB = 2, kL = 11;  // L spans several chunks of 4 and a ragged last chunk
constexpr double kRelTol = 2e-2, kAbsTol = 1e-4;

struct Direction {
  std::string tensor;
  std::vector<std::pair<int64_t, float>> entries;  // (index, coefficient)
};

struct Check {
  double worst_ratio = 0;  // max |fd − analytic| / (rtol·max(|fd|, |an|) + atol); > 1 fails
  double worst_rel = 0;    // max |fd − analytic| / max(|fd|, |an|) over directions whose size exceeds 10·atol
  std::string where;
};

double loss_at(const ModelConfig& c, TensorMap& w, const std::vector<int64_t>& tokens, const Direction& d, double h) {
  Tensor& t = w.at(d.tensor);
  std::vector<float> saved;
  for (auto [i, v] : d.entries) {
    saved.push_back(t.data<float>()[i]);
    t.data<float>()[i] += float(h * v);
  }
  const double loss = lm_loss_and_grad(c, w, tokens.data(), kB, kL, nullptr);
  for (size_t k = 0; k < d.entries.size(); ++k) t.data<float>()[d.entries[k].first] = saved[k];
  return loss;
}

// The directions checked for each tensor: two of random signs over up to 12 entries, two single random entries,
// and the largest-gradient entry (last).
std::vector<Direction> directions(const TensorMap& w, const TensorMap& g, std::mt19937& rng) {
  std::vector<Direction> out;
  for (const auto& [name, t] : w) {
    const int64_t n = t.numel(), k = std::min<int64_t>(n, 12);
    std::vector<int64_t> idx(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) idx[size_t(i)] = i;
    for (int rep = 0; rep < 2; ++rep) {
      Direction a{name, {}};
      std::shuffle(idx.begin(), idx.end(), rng);
      for (int64_t j = 0; j < k; ++j) a.entries.push_back({idx[size_t(j)], (rng() & 1) ? 1.0f : -1.0f});
      out.push_back(a);
      out.push_back({name, {{idx[0], 1.0f}}});  // one random entry alone
    }
    const float* gd = g.at(name).data<float>();
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (std::fabs(gd[i]) > std::fabs(gd[best])) best = i;
    out.push_back({name, {{best, 1.0f}}});
  }
  return out;
}

Check check_gradients(const ModelConfig& c, TensorMap w, const std::vector<int64_t>& tokens, const TensorMap& g,
                      const std::vector<Direction>& dirs) {
  Check r;
  for (const Direction& d : dirs) {
    // Step relative to the size of the entries moved (embeddings are ~0.02, norms ~1).
    double mag = 0;
    for (auto [i, v] : d.entries) mag = std::max(mag, double(std::fabs(w.at(d.tensor).data<float>()[i])));
    const double h = 1e-2 * std::max(0.2, mag);
    auto cd = [&](double s) { return (loss_at(c, w, tokens, d, s) - loss_at(c, w, tokens, d, -s)) / (2 * s); };
    const double fd = (4 * cd(h / 2) - cd(h)) / 3;
    double an = 0;
    for (auto [i, v] : d.entries) an += double(v) * g.at(d.tensor).data<float>()[i];
    const double err = std::fabs(fd - an), size = std::max(std::fabs(fd), std::fabs(an));
    const double ratio = err / (kRelTol * size + kAbsTol);
    if (ratio > r.worst_ratio) {
      r.worst_ratio = ratio;
      r.where = d.tensor + " (" + std::to_string(d.entries.size()) + " entries): fd " + std::to_string(fd) +
                " analytic " + std::to_string(an);
    }
    if (size > 10 * kAbsTol) r.worst_rel = std::max(r.worst_rel, err / size);
  }
  return r;
}

class LmGradientsFd : public ::testing::TestWithParam<size_t> {};

TEST_P(LmGradientsFd, EveryParameterTensorMatchesFiniteDifferences) {
  const LmCase cs = lm_cases()[GetParam()];
  SCOPED_TRACE(cs.name);
  const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
  TensorMap w = lm_test_weights(c, 3 + GetParam());
  const auto tokens = lm_test_tokens(c, kB, kL, 17);
  TensorMap g;
  const double loss = lm_loss_and_grad(c, w, tokens.data(), kB, kL, &g);
  ASSERT_TRUE(std::isfinite(loss));
  ASSERT_EQ(g.size(), w.size());
  for (const auto& [name, t] : w) {
    ASSERT_TRUE(g.count(name)) << name;
    EXPECT_EQ(g.at(name).shape(), t.shape()) << name;
  }
  std::mt19937 rng(99);
  const Check r = check_gradients(c, w, tokens, g, directions(w, g, rng));
  std::printf("%s: %zu tensors, loss %.5f, worst relative error %.2e, worst error/tolerance %.3f at %s\n",
              cs.name.c_str(), w.size(), loss, r.worst_rel, r.worst_ratio, r.where.c_str());
  EXPECT_LE(r.worst_ratio, 1.0) << r.where;
}

INSTANTIATE_TEST_SUITE_P(Models, LmGradientsFd, ::testing::Range<size_t>(0, lm_cases().size()));

TEST(LmGradientsFd, AllParametersAtOnce) {
  for (const LmCase& cs : lm_cases()) {
    SCOPED_TRACE(cs.name);
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    TensorMap w = lm_test_weights(c, 5);
    const auto tokens = lm_test_tokens(c, kB, kL, 4);
    TensorMap g;
    lm_loss_and_grad(c, w, tokens.data(), kB, kL, &g);
    // One random direction over every entry of every tensor, scaled to the tensor's size.
    std::mt19937 rng(8);
    std::normal_distribution<float> n01;
    std::vector<std::pair<std::string, std::vector<float>>> dir;
    double an = 0;
    for (const auto& [name, t] : w) {
      double ss = 0;
      for (int64_t i = 0; i < t.numel(); ++i) ss += double(t.data<float>()[i]) * t.data<float>()[i];
      const float s = float(std::max(0.05, std::sqrt(ss / double(t.numel()))));
      std::vector<float> v(size_t(t.numel()));
      for (int64_t i = 0; i < t.numel(); ++i) {
        v[size_t(i)] = s * n01(rng);
        an += double(v[size_t(i)]) * g.at(name).data<float>()[i];
      }
      dir.push_back({name, std::move(v)});
    }
    auto loss_at_step = [&](double h) {
      TensorMap moved;
      for (const auto& [name, v] : dir) {
        Tensor t = w.at(name).clone();
        for (size_t i = 0; i < v.size(); ++i) t.data<float>()[i] += float(h * v[i]);
        moved[name] = t;
      }
      return lm_loss_and_grad(c, moved, tokens.data(), kB, kL, nullptr);
    };
    const double h = 1e-3;
    auto cd = [&](double s) { return (loss_at_step(s) - loss_at_step(-s)) / (2 * s); };
    const double fd = (4 * cd(h / 2) - cd(h)) / 3;
    std::printf("%s: all-parameter direction: fd %.6e analytic %.6e (rel %.2e)\n", cs.name.c_str(), fd, an,
                std::fabs(fd - an) / std::fabs(an));
    EXPECT_NEAR(fd, an, 1e-2 * std::fabs(an)) << cs.name;
  }
}

// The check must be able to fail: a gradient off by 5% in its largest entry of one tensor (or with one sign flipped)
// is reported.
TEST(LmGradientsFd, GuardCatchesAPerturbedGradient) {
  const LmCase cs = lm_cases()[2];
  const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
  TensorMap w = lm_test_weights(c, 3);
  const auto tokens = lm_test_tokens(c, kB, kL, 17);
  TensorMap g;
  lm_loss_and_grad(c, w, tokens.data(), kB, kL, &g);
  std::mt19937 rng(1);
  const auto dirs = directions(w, g, rng);
  for (const char* name : {"backbone.layers.0.mixer.dt_bias", "backbone.layers.1.mixer.in_proj.weight",
                           "backbone.layers.1.norm2.weight"}) {
    SCOPED_TRACE(name);
    std::vector<Direction> mine;
    for (const Direction& d : dirs)
      if (d.tensor == name) mine.push_back(d);
    ASSERT_EQ(mine.size(), 5u);
    EXPECT_LE(check_gradients(c, w, tokens, g, mine).worst_ratio, 1.0) << "unperturbed gradient must pass";
    TensorMap bad = g;
    bad[name] = g.at(name).clone();
    bad[name].data<float>()[mine.back().entries[0].first] *= 1.05f;
    EXPECT_GT(check_gradients(c, w, tokens, bad, mine).worst_ratio, 1.0) << "5% error in the largest entry missed";
  }
}

}  // namespace
}  // namespace mamba3::test
