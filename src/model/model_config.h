#pragma once
// The language model's configuration: the official config.json (MambaConfig, spec §9.1) with the Mamba-3 mixer
// options (ssm_cfg) and the attention options of hybrid layers (attn_cfg, spec §9.6).
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ops/mamba3_config.h"

namespace mamba3 {

struct AttentionConfig {
  int64_t num_heads = 0;
  int64_t num_heads_kv = 0;  // 0 → num_heads
  int64_t head_dim = 0;      // 0 → d_model / num_heads
  int64_t mlp_dim = 0;       // as given; the layer rounds it up to a multiple of 256
  bool qkv_proj_bias = true;
  bool out_proj_bias = true;
  double softmax_scale = 0;  // 0 → head_dim^−½
  bool causal = false;       // official default (spec §14 #10)
  bool causal_given = false;
  int64_t d_conv = 0;
  int64_t rotary_emb_dim = 0;
  double rotary_emb_base = 10000.0;
  bool rotary_emb_interleaved = false;

  int64_t kv_heads() const { return num_heads_kv ? num_heads_kv : num_heads; }
  int64_t mlp_width() const { return (mlp_dim + 255) / 256 * 256; }
  int64_t qkv_dim() const { return head_dim * (num_heads + 2 * kv_heads()); }
};

struct ModelConfig {
  int64_t d_model = 2560;
  int64_t d_intermediate = 0;
  int64_t n_layer = 64;
  int64_t vocab_size = 50277;
  Mamba3Config ssm;
  bool a_activation_given = false;  // whether ssm_cfg named A_activation (otherwise heavy-tail is assumed)
  std::vector<int64_t> attn_layer_idx;
  AttentionConfig attn;
  bool rms_norm = true;
  bool residual_in_fp32 = true;
  bool fused_add_norm = true;
  int64_t pad_vocab_size_multiple = 8;
  bool tie_embeddings = true;
  double norm_epsilon = 1e-5;  // not an official key; accepted as "norm_epsilon"

  int64_t vocab_padded() const {
    return (vocab_size + pad_vocab_size_multiple - 1) / pad_vocab_size_multiple * pad_vocab_size_multiple;
  }
  bool is_attention_layer(int64_t i) const;
  int64_t d_ff() const { return (d_intermediate + 127) / 128 * 128; }  // GatedMLP hidden size

  // Parses and validates; errors name `context` (the file) and the field.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& context);
  static ModelConfig load(const std::string& path);
  nlohmann::json to_json() const;
  void save(const std::string& path) const;  // atomic
};

}  // namespace mamba3
