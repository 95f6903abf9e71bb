// evaluate_perplexity (train/perplexity.h): its windows and its numbers, checked against the training loss
// (lm_loss_and_grad, an independent forward) on a small random-initialised model; its decode-step form, with and
// without a bf16 ssm state.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "model/init_weights.h"
#include "model/language_model.h"
#include "train/lm_gradients.h"
#include "train/perplexity.h"

namespace mamba3 {
namespace {

constexpr int64_t kVocab = 40;

ModelConfig small_config() {
  const nlohmann::json j = {{"d_model", 32},
                            {"d_intermediate", 48},
                            {"n_layer", 2},
                            {"vocab_size", kVocab},
                            {"pad_vocab_size_multiple", 16},  // V_pad 48: padded logits count, as in training
                            {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 16}, {"chunk_size", 8}}}};
  return ModelConfig::from_json(j, "perplexity test config");
}

std::vector<int64_t> random_ids(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, kVocab - 1);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = pick(rng);
  return ids;
}

struct Fixture {
  ModelConfig config = small_config();
  TensorMap params = init_weights(config, 7);
  LanguageModel model{config, params, "perplexity test"};
};

TEST(Perplexity, EqualsTheTrainingLossOverWholeWindows) {
  Fixture f;
  const int64_t window = 21, n_windows = 3;
  const std::vector<int64_t> ids = random_ids(window * n_windows, 1);
  const PerplexityResult r = evaluate_perplexity(f.model, ids, window);
  EXPECT_EQ(r.tokens, window * n_windows);
  EXPECT_EQ(r.windows, n_windows);
  EXPECT_EQ(r.predicted, (window - 1) * n_windows);
  // The trainer's loss of the same windows as one batch: mean over B·L targets, the same mean as ours.
  const double loss = lm_loss_and_grad(f.config, f.params, ids.data(), n_windows, window - 1, nullptr);
  EXPECT_NEAR(r.nll, loss, 1e-5 * loss);
  EXPECT_NEAR(r.perplexity(), std::exp(loss), 1e-4 * std::exp(loss));
  // Untrained weights predict about uniformly over the V_pad logits, never better than chance by much.
  EXPECT_GT(r.perplexity(), 0.5 * double(kVocab));
}

TEST(Perplexity, ScoresAShortLastWindowAndEachWindowFromAFreshState) {
  Fixture f;
  const int64_t window = 16;
  std::vector<int64_t> ids = random_ids(2 * window + 5, 2);
  const PerplexityResult r = evaluate_perplexity(f.model, ids, window);
  EXPECT_EQ(r.windows, 3);
  EXPECT_EQ(r.predicted, 2 * (window - 1) + 4);
  // By hand: the loss of each window alone, weighted by its targets.
  double total = 0;
  for (int64_t begin : {int64_t(0), window}) total += double(window - 1) *
      lm_loss_and_grad(f.config, f.params, ids.data() + begin, 1, window - 1, nullptr);
  total += 4 * lm_loss_and_grad(f.config, f.params, ids.data() + 2 * window, 1, 4, nullptr);
  EXPECT_NEAR(r.nll, total / double(r.predicted), 1e-5 * r.nll);
  // A single leftover id has nothing to predict: it is not a window.
  ids.push_back(3);
  ids.resize(size_t(3 * window + 1));
  const PerplexityResult r2 = evaluate_perplexity(f.model, ids, window);
  EXPECT_EQ(r2.windows, 3);
  EXPECT_EQ(r2.predicted, 3 * (window - 1));
}

// Decode steps score the same windows as prefill (one token per step, each window from a fresh state).
TEST(Perplexity, DecodeStepsScoreAsPrefillDoes) {
  Fixture f;
  const int64_t window = 16;
  const std::vector<int64_t> ids = random_ids(2 * window + 5, 4);
  const PerplexityResult a = evaluate_perplexity(f.model, ids, window);
  const PerplexityResult b = evaluate_perplexity_decode(f.model, ids, window);
  EXPECT_EQ(b.windows, a.windows);
  EXPECT_EQ(b.predicted, a.predicted);
  EXPECT_NEAR(b.nll, a.nll, 1e-5 * a.nll);
}

// A bf16 ssm state (rounded after every step) changes the scores a little: not at all would mean no rounding took
// place, a lot would mean the state was damaged.
TEST(Perplexity, Bf16StateChangesTheScoresSlightly) {
  Fixture f;
  const int64_t window = 33;
  const std::vector<int64_t> ids = random_ids(3 * window, 5);
  const PerplexityResult f32 = evaluate_perplexity_decode(f.model, ids, window);
  const PerplexityResult b16 = evaluate_perplexity_decode(f.model, ids, window, /*bf16_state=*/true);
  EXPECT_EQ(b16.predicted, f32.predicted);
  EXPECT_NE(b16.nll, f32.nll);
  EXPECT_NEAR(b16.nll, f32.nll, 1e-2 * f32.nll);
}

TEST(Perplexity, RejectsBadInput) {
  Fixture f;
  const std::vector<int64_t> ids = random_ids(10, 3);
  EXPECT_THROW(evaluate_perplexity(f.model, ids, 1), Error);
  EXPECT_THROW(evaluate_perplexity(f.model, std::span<const int64_t>(ids.data(), 1), 8), Error);
  std::vector<int64_t> bad = ids;
  bad[5] = 1000;
  EXPECT_THROW(evaluate_perplexity(f.model, bad, 8), Error);
  EXPECT_THROW(evaluate_perplexity_decode(f.model, ids, 1), Error);
  EXPECT_THROW(evaluate_perplexity_decode(f.model, bad, 8, true), Error);
}

}  // namespace
}  // namespace mamba3
