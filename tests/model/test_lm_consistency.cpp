// Language models of every supported shape, built from a config with fresh weights (official init): the logits of
// a prefill equal those of step-by-step decoding and of a split prefill, for LayerNorm and RMSNorm, tied and untied
// heads, MIMO, grouped B/C, and attention layers with GQA, rotary (both pairings), short conv and MLP branch.
// The golden tests pin the numbers; these pin the paths the golden cases do not reach.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "infer/generator.h"
#include "model/init_weights.h"
#include "model/language_model.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

using json = nlohmann::json;

struct Case {
  const char* name;
  json config;
};

std::vector<Case> cases() {
  json base = {{"d_model", 48}, {"n_layer", 3}, {"vocab_size", 97}, {"d_intermediate", 0},
               {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 16}, {"chunk_size", 4}}}};
  std::vector<Case> out;
  auto with = [&](const char* name, json patch) {
    json c = base;
    c.merge_patch(patch);
    out.push_back({name, c});
  };
  with("SISO RMSNorm tied", json::object());
  with("LayerNorm, untied head, MLP", {{"rms_norm", false}, {"tie_embeddings", false}, {"d_intermediate", 70}});
  with("MIMO R=3, groups 3, outnorm", {{"ssm_cfg", {{"is_mimo", true}, {"mimo_rank", 3}, {"ngroups", 3},
                                                    {"is_outproj_norm", true}}}});
  with("softplus A, rope 1.0", {{"ssm_cfg", {{"A_activation", "softplus"}, {"rope_fraction", 1.0}}}});
  with("attention GQA + rotary + conv + MLP branch",
       {{"attn_layer_idx", {1}},
        {"attn_cfg", {{"num_heads", 6}, {"num_heads_kv", 2}, {"head_dim", 8}, {"rotary_emb_dim", 4}, {"causal", true},
                      {"d_conv", 3}, {"mlp_dim", 40}}}});
  with("attention interleaved rotary, no biases, two attention layers",
       {{"attn_layer_idx", {0, 2}},
        {"attn_cfg", {{"num_heads", 4}, {"rotary_emb_dim", 12}, {"rotary_emb_interleaved", true}, {"causal", true},
                      {"qkv_proj_bias", false}, {"out_proj_bias", false}}}});
  return out;
}

class LmConsistency : public ::testing::TestWithParam<size_t> {};

TEST_P(LmConsistency, PrefillEqualsStepsAndSplitPrefill) {
  const Case cs = cases()[GetParam()];
  SCOPED_TRACE(cs.name);
  ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
  LanguageModel m(c, init_weights(c, 11 + GetParam()), cs.name);
  std::mt19937 rng(5);
  std::vector<int64_t> ids(23);
  for (auto& id : ids) id = int64_t(rng() % uint32_t(c.vocab_size));
  const int64_t V = c.vocab_padded(), L = int64_t(ids.size());

  ModelCache full = m.new_cache(1);
  Tensor all = m.prefill(ids, full, 0, true);  // (L, V)

  ModelCache stepping = m.new_cache(1);
  Tensor first = m.prefill(std::span(ids).first(1), stepping, 0, true);
  EXPECT_LE(rel_l2(first, all.slice(0, 1)), 1e-5);
  Tensor logits = Tensor::empty(DType::F32, {1, V});
  for (int64_t t = 1; t < L; ++t) {
    m.step(std::span(ids).subspan(size_t(t), 1), stepping, logits);
    EXPECT_LE(rel_l2(logits, all.slice(t, t + 1)), 1e-5) << "step at position " << t;
  }
  ModelCache split = m.new_cache(1);
  m.prefill(std::span(ids).first(9), split, 0);
  Tensor rest = m.prefill(std::span(ids).subspan(9), split, 0, true);
  EXPECT_LE(rel_l2(rest, all.slice(9, L)), 1e-5) << "prefill continued from a cache";
  EXPECT_EQ(split.position(0), L);
}

TEST_P(LmConsistency, BatchedGenerationEqualsEachPromptAlone) {
  const Case cs = cases()[GetParam()];
  ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
  LanguageModel m(c, init_weights(c, 3), cs.name);
  const std::vector<std::vector<int64_t>> prompts = {{1, 2, 3, 4, 5, 6, 7}, {50}, {9, 8, 7, 6}};
  GenerateOptions opt;
  opt.max_new_tokens = 8;
  opt.sampling.seed = 77;
  std::vector<std::vector<int64_t>> streamed(prompts.size());
  auto together = generate(m, prompts, opt, [&](int64_t row, int64_t id) {
    streamed[size_t(row)].push_back(id);
    return true;
  });
  EXPECT_EQ(streamed, together) << "the callback sees every token in order";
  for (size_t r = 0; r < prompts.size(); ++r) {
    GenerateOptions alone = opt;
    alone.sampling.seed = opt.sampling.seed + r;  // row r samples with seed + r
    auto single = generate(m, {prompts[r]}, alone);
    EXPECT_EQ(single[0], together[r]) << cs.name << ": row " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, LmConsistency, ::testing::Range<size_t>(0, 6));

TEST(LmAttention, NonCausalPrefillSeesTheWholePrompt) {
  for (bool causal : {true, false}) {
    json j = {{"d_model", 32}, {"n_layer", 2}, {"vocab_size", 50}, {"attn_layer_idx", {0}},
              {"attn_cfg", {{"num_heads", 2}, {"causal", causal}}},
              {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 16}}}};
    ModelConfig c = ModelConfig::from_json(j, "attention");
    LanguageModel m(c, init_weights(c, 1), "attention");
    ModelCache a = m.new_cache(1), b = m.new_cache(1);
    Tensor la = m.prefill(std::vector<int64_t>{1, 2, 3}, a, 0, true);
    Tensor lb = m.prefill(std::vector<int64_t>{1, 2, 4}, b, 0, true);
    const double first_change = rel_l2(la.slice(0, 1), lb.slice(0, 1));
    if (causal) {
      EXPECT_EQ(first_change, 0.0) << "a causal model's first position cannot see the last token";
    } else {
      EXPECT_GT(first_change, 0.0) << "a non-causal prefill attends to later tokens (official default)";
    }
  }
}

}  // namespace
}  // namespace mamba3::test
