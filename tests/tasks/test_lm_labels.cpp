// lm_loss_and_grad_labels (the supervised-task loss: labels given per position, negative = no loss there):
//   - with every position labelled it is lm_loss_and_grad (the same loss, the same gradients up to summation order);
//   - with some positions unlabelled, the loss equals the cross-entropy of the inference path's logits
//     (LanguageModel::prefill) averaged over the labelled positions only;
//   - its gradient agrees with Richardson-extrapolated central differences of the loss;
//   - inputs after the last labelled position do not matter (causality through the mask);
//   - bad input is rejected.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "model/language_model.h"
#include "support/test_support.h"
#include "train/lm_gradients.h"
#include "train/lm_test_models.h"

namespace mamba3::test {
namespace {

constexpr int64_t kB = 3, kL = 13;

struct Batch {
  std::vector<int64_t> inputs, labels;
};

Batch random_batch(const ModelConfig& c, uint32_t seed, double keep) {
  std::mt19937 rng(seed);
  Batch b;
  for (int64_t i = 0; i < kB * kL; ++i) {
    b.inputs.push_back(int64_t(rng() % uint32_t(c.vocab_size)));
    const bool labelled = double(rng() % 1000) / 1000.0 < keep;
    b.labels.push_back(labelled ? int64_t(rng() % uint32_t(c.vocab_size)) : -1);
  }
  b.labels[5] = 3;  // at least one label
  return b;
}

double masked_prefill_cross_entropy(const LanguageModel& m, const Batch& b) {
  const int64_t V = m.config().vocab_padded();
  double total = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < kB; ++r) {
    ModelCache cache = m.new_cache(1);
    Tensor logits = m.prefill(std::span<const int64_t>(b.inputs.data() + r * kL, size_t(kL)), cache, 0, true);
    for (int64_t t = 0; t < kL; ++t) {
      const int64_t y = b.labels[size_t(r * kL + t)];
      if (y < 0) continue;
      const float* l = logits.data<float>() + t * V;
      double mx = -INFINITY, sum = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(l[v]));
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(l[v]) - mx);
      total += mx + std::log(sum) - double(l[y]);
      ++count;
    }
  }
  return total / double(count);
}

std::vector<ModelConfig> configs() {
  std::vector<ModelConfig> out;
  for (const LmCase& cs : lm_cases()) out.push_back(ModelConfig::from_json(cs.config, cs.name));
  out.resize(2);  // SISO + MLP + LayerNorm, MIMO with groups and output norm
  nlohmann::json j = lm_cases()[0].config;
  j["ssm_cfg"]["no_rotary"] = true;
  j["ssm_cfg"]["euler"] = true;
  out.push_back(ModelConfig::from_json(j, "ablation switches"));
  return out;
}

TEST(LmLabels, AllLabelledEqualsLanguageModelLoss) {
  for (const ModelConfig& c : configs()) {
    const TensorMap w = lm_test_weights(c, 3);
    const auto tokens = lm_test_tokens(c, kB, kL, 9);
    Batch b;
    for (int64_t r = 0; r < kB; ++r)
      for (int64_t t = 0; t < kL; ++t) {
        b.inputs.push_back(tokens[size_t(r * (kL + 1) + t)]);
        b.labels.push_back(tokens[size_t(r * (kL + 1) + t + 1)]);
      }
    TensorMap g1, g2;
    const double l1 = lm_loss_and_grad(c, w, tokens.data(), kB, kL, &g1);
    const double l2 = lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, &g2);
    EXPECT_EQ(l1, l2);
    // Not bit-identical: the B/C norm weight gradients sum per-thread partials in a scheduling-dependent order.
    for (const auto& [name, t] : g1) EXPECT_LE(rel_l2(g2.at(name), t), 1e-6) << name;
  }
}

TEST(LmLabels, LossIsCrossEntropyOverLabelledPositions) {
  for (const ModelConfig& c : configs()) {
    const TensorMap w = lm_test_weights(c, 4);
    const LanguageModel m(c, w, "labels");
    for (double keep : {0.1, 0.5}) {
      const Batch b = random_batch(c, 17, keep);
      const double ref = masked_prefill_cross_entropy(m, b);
      TensorMap g;
      const double loss = lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, &g);
      EXPECT_NEAR(loss, ref, 2e-6 * ref) << "keep " << keep;
      EXPECT_EQ(loss, lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, nullptr));
    }
  }
}

TEST(LmLabels, GradientMatchesFiniteDifferences) {
  for (const ModelConfig& c : configs()) {
    TensorMap w = lm_test_weights(c, 5);
    const Batch b = random_batch(c, 23, 0.3);
    TensorMap g;
    lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, &g);
    std::mt19937 rng(8);
    double worst = 0;
    for (const auto& [name, grad] : g) {
      Tensor& t = w.at(name);
      std::vector<std::pair<int64_t, float>> dir;
      for (int k = 0; k < 12; ++k) dir.push_back({int64_t(rng() % uint32_t(t.numel())), (rng() & 1) ? 1.0f : -1.0f});
      double an = 0;
      for (auto [i, s] : dir) an += s * grad.data<float>()[i];
      auto loss_at = [&](double h) {
        std::vector<float> keep;
        for (auto [i, s] : dir) keep.push_back(t.data<float>()[i]), t.data<float>()[i] += float(h * s);
        const double l = lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, nullptr);
        for (size_t k = dir.size(); k-- > 0;) t.data<float>()[dir[k].first] = keep[k];
        return l;
      };
      const double h = 2e-3;
      const double d1 = (loss_at(h) - loss_at(-h)) / (2 * h), d2 = (loss_at(h / 2) - loss_at(-h / 2)) / h;
      const double fd = (4 * d2 - d1) / 3;  // Richardson: cancels the h² term
      const double err = std::abs(fd - an) / (2e-2 * std::max(std::abs(fd), std::abs(an)) + 1e-4);
      EXPECT_LE(err, 1.0) << c.ssm.describe() << " " << name << ": fd " << fd << " analytic " << an;
      worst = std::max(worst, err);
    }
    std::printf("  %-70s worst fd ratio %.3f\n", c.ssm.describe().c_str(), worst);
  }
}

TEST(LmLabels, InputsAfterTheLastLabelDoNotMatter) {
  const ModelConfig c = configs()[0];
  const TensorMap w = lm_test_weights(c, 6);
  Batch b = random_batch(c, 31, 0.0);
  std::fill(b.labels.begin(), b.labels.end(), -1);
  b.labels[4] = 1, b.labels[kL + 7] = 2;  // rows 0 and 1 labelled at 4 and 7
  TensorMap g1, g2;
  const double l1 = lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, &g1);
  for (int64_t t = 5; t < kL; ++t) b.inputs[size_t(t)] = (b.inputs[size_t(t)] + 1) % c.vocab_size;
  for (int64_t t = 8; t < kL; ++t) b.inputs[size_t(kL + t)] = 0;
  for (int64_t t = 0; t < kL; ++t) b.inputs[size_t(2 * kL + t)] = 1;  // row 2 has no label at all
  const double l2 = lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, &g2);
  EXPECT_NEAR(l1, l2, 1e-6 * std::abs(l1));
  for (const auto& [name, t] : g1) EXPECT_LE(rel_l2(g2.at(name), t), 1e-5) << name;
}

TEST(LmLabels, BadInput) {
  const ModelConfig c = configs()[0];
  const TensorMap w = lm_test_weights(c, 7);
  Batch b = random_batch(c, 1, 0.5);
  std::vector<int64_t> none(b.labels.size(), -1);
  EXPECT_THROW(lm_loss_and_grad_labels(c, w, b.inputs.data(), none.data(), kB, kL, nullptr), Error);
  b.labels[2] = c.vocab_size;
  EXPECT_THROW(lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, nullptr), Error);
  b.labels[2] = 1;
  b.inputs[3] = -1;
  EXPECT_THROW(lm_loss_and_grad_labels(c, w, b.inputs.data(), b.labels.data(), kB, kL, nullptr), Error);
}

}  // namespace
}  // namespace mamba3::test
