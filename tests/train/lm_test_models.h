#pragma once
// Tiny language models covering every layer kind the training gradient handles, shared by the lm_* tests.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "model/init_weights.h"
#include "model/model_config.h"

namespace mamba3::test {

struct LmCase {
  std::string name;
  nlohmann::json config;
};

inline std::vector<LmCase> lm_cases() {
  using json = nlohmann::json;
  const json base = {{"d_model", 32},  {"n_layer", 2},         {"vocab_size", 45}, {"d_intermediate", 0},
                     {"rms_norm", true}, {"tie_embeddings", true},
                     {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 16}, {"chunk_size", 4}}}};
  std::vector<LmCase> out;
  auto with = [&](std::string name, json patch) {
    json c = base;
    c.merge_patch(patch);
    out.push_back({std::move(name), c});
  };
  with("SISO, LayerNorm, MLP, untied", {{"rms_norm", false}, {"tie_embeddings", false}, {"d_intermediate", 40}});
  with("MIMO R=2, groups 2, outproj norm, tied",
       {{"ssm_cfg", {{"is_mimo", true}, {"mimo_rank", 2}, {"ngroups", 2}, {"is_outproj_norm", true}}}});
  with("hybrid: causal GQA attention, rotary, MLP branch, tied, MLP",
       {{"attn_layer_idx", {1}},
        {"d_intermediate", 24},
        {"attn_cfg", {{"num_heads", 4}, {"num_heads_kv", 2}, {"head_dim", 8}, {"rotary_emb_dim", 4}, {"causal", true},
                      {"mlp_dim", 20}}}});
  with("hybrid: non-causal attention, interleaved rotary, conv, no biases, LayerNorm, untied",
       {{"attn_layer_idx", {0}},
        {"rms_norm", false},
        {"tie_embeddings", false},
        {"attn_cfg", {{"num_heads", 2}, {"rotary_emb_dim", 8}, {"rotary_emb_interleaved", true}, {"causal", false},
                      {"d_conv", 3}, {"qkv_proj_bias", false}, {"out_proj_bias", false}}}});
  return out;
}

// Official init, then every tensor nudged by ±10% of its own scale (and biases off zero) so that no parameter sits
// at a symmetric point where a wrong gradient could vanish by accident.
inline TensorMap lm_test_weights(const ModelConfig& c, uint64_t seed) {
  TensorMap w = init_weights(c, seed);
  std::mt19937 rng(uint32_t(seed * 7 + 1));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto& [name, t] : w) {
    float* p = t.data<float>();
    double ss = 0;
    for (int64_t i = 0; i < t.numel(); ++i) ss += double(p[i]) * p[i];
    const float rms = float(std::sqrt(ss / double(std::max<int64_t>(1, t.numel()))));
    const float scale = rms > 0 ? 0.1f * rms : 0.05f;
    for (int64_t i = 0; i < t.numel(); ++i) p[i] += scale * u(rng);
  }
  return w;
}

inline std::vector<int64_t> lm_test_tokens(const ModelConfig& c, int64_t B, int64_t L, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> t(size_t(B * (L + 1)));
  for (auto& id : t) id = int64_t(rng() % uint32_t(c.vocab_size));
  return t;
}

}  // namespace mamba3::test
