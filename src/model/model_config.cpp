#include "model/model_config.h"

#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_field.h"

namespace mamba3 {

using json = nlohmann::json;

bool ModelConfig::is_attention_layer(int64_t i) const {
  for (int64_t a : attn_layer_idx)
    if (a == i) return true;
  return false;
}

namespace {

void reject_unknown(const json& j, const std::set<std::string>& known, const std::string& ctx) {
  for (auto it = j.begin(); it != j.end(); ++it)
    MAMBA3_CHECK(known.count(it.key()), "{}: unknown field '{}'", ctx, it.key());
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& context) {
  MAMBA3_CHECK(j.is_object(), "{}: config is not a JSON object", context);
  reject_unknown(j,
                 {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                  "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings",
                  "norm_epsilon"},
                 context);
  ModelConfig c;
  read_json_field(j, "d_model", c.d_model, context);
  read_json_field(j, "d_intermediate", c.d_intermediate, context);
  read_json_field(j, "n_layer", c.n_layer, context);
  read_json_field(j, "vocab_size", c.vocab_size, context);
  read_json_field(j, "rms_norm", c.rms_norm, context);
  read_json_field(j, "residual_in_fp32", c.residual_in_fp32, context);
  read_json_field(j, "fused_add_norm", c.fused_add_norm, context);
  read_json_field(j, "pad_vocab_size_multiple", c.pad_vocab_size_multiple, context);
  read_json_field(j, "tie_embeddings", c.tie_embeddings, context);
  read_json_field(j, "norm_epsilon", c.norm_epsilon, context);
  MAMBA3_CHECK(c.d_model > 0, "{}: field 'd_model' must be positive", context);
  MAMBA3_CHECK(c.n_layer > 0, "{}: field 'n_layer' must be positive", context);
  MAMBA3_CHECK(c.vocab_size > 0, "{}: field 'vocab_size' must be positive", context);
  MAMBA3_CHECK(c.d_intermediate >= 0, "{}: field 'd_intermediate' must be non-negative", context);
  MAMBA3_CHECK(c.pad_vocab_size_multiple > 0, "{}: field 'pad_vocab_size_multiple' must be positive", context);
  MAMBA3_CHECK(c.norm_epsilon > 0, "{}: field 'norm_epsilon' must be positive", context);

  const json ssm = j.value("ssm_cfg", json::object());
  MAMBA3_CHECK(ssm.is_object(), "{}: field 'ssm_cfg' must be an object", context);
  const std::string layer = ssm.contains("layer") && ssm["layer"].is_string() ? ssm["layer"].get<std::string>() : "Mamba1";
  MAMBA3_CHECK(layer == "Mamba3", "{}: field 'ssm_cfg.layer' is \"{}\"{}; only \"Mamba3\" models are supported", context,
               layer, ssm.contains("layer") ? "" : " (the official default when absent)");
  json mixer = ssm;
  mixer["d_model"] = c.d_model;
  c.ssm = Mamba3Config::from_json(mixer, context + ": ssm_cfg");
  c.a_activation_given = ssm.contains("A_activation");
  c.ssm.validate(context + ": ssm_cfg");

  if (j.contains("attn_layer_idx") && !j["attn_layer_idx"].is_null()) {
    MAMBA3_CHECK(j["attn_layer_idx"].is_array(), "{}: field 'attn_layer_idx' must be a list", context);
    for (const auto& v : j["attn_layer_idx"]) {
      MAMBA3_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < c.n_layer,
                   "{}: field 'attn_layer_idx' holds {}, not a layer index in [0, {})", context, v.dump(), c.n_layer);
      c.attn_layer_idx.push_back(v.get<int64_t>());
    }
  }
  const json attn = j.value("attn_cfg", json::object());
  MAMBA3_CHECK(attn.is_object(), "{}: field 'attn_cfg' must be an object", context);
  const std::string actx = context + ": attn_cfg";
  reject_unknown(attn,
                 {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias",
                  "softmax_scale", "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved"},
                 actx);
  AttentionConfig& a = c.attn;
  read_json_field(attn, "num_heads", a.num_heads, actx);
  read_json_field(attn, "num_heads_kv", a.num_heads_kv, actx);
  read_json_field(attn, "head_dim", a.head_dim, actx);
  read_json_field(attn, "mlp_dim", a.mlp_dim, actx);
  read_json_field(attn, "qkv_proj_bias", a.qkv_proj_bias, actx);
  read_json_field(attn, "out_proj_bias", a.out_proj_bias, actx);
  read_json_field(attn, "softmax_scale", a.softmax_scale, actx);
  read_json_field(attn, "causal", a.causal, actx);
  a.causal_given = attn.contains("causal");
  read_json_field(attn, "d_conv", a.d_conv, actx);
  read_json_field(attn, "rotary_emb_dim", a.rotary_emb_dim, actx);
  read_json_field(attn, "rotary_emb_base", a.rotary_emb_base, actx);
  read_json_field(attn, "rotary_emb_interleaved", a.rotary_emb_interleaved, actx);
  if (!c.attn_layer_idx.empty()) {
    MAMBA3_CHECK(a.num_heads > 0, "{}: field 'num_heads' is required and must be positive", actx);
    if (a.head_dim == 0) {
      MAMBA3_CHECK(c.d_model % a.num_heads == 0, "{}: d_model {} is not divisible by num_heads {}", actx, c.d_model,
                   a.num_heads);
      a.head_dim = c.d_model / a.num_heads;
    }
    MAMBA3_CHECK(a.head_dim > 0, "{}: field 'head_dim' must be positive", actx);
    MAMBA3_CHECK(a.kv_heads() > 0 && a.num_heads % a.kv_heads() == 0,
                 "{}: num_heads_kv {} must divide num_heads {}", actx, a.kv_heads(), a.num_heads);
    MAMBA3_CHECK(a.mlp_dim >= 0 && a.d_conv >= 0, "{}: mlp_dim and d_conv must be non-negative", actx);
    MAMBA3_CHECK(a.rotary_emb_dim >= 0 && a.rotary_emb_dim % 2 == 0 && a.rotary_emb_dim <= a.head_dim,
                 "{}: rotary_emb_dim {} must be even and at most head_dim {}", actx, a.rotary_emb_dim, a.head_dim);
  }
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream in(path);
  MAMBA3_CHECK(in.good(), "{}: cannot open the model config", path);
  std::stringstream text;
  text << in.rdbuf();
  json j;
  try {
    j = json::parse(text.str());
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", path, e.what());
  }
  return from_json(j, path);
}

json ModelConfig::to_json() const {
  json ssm_cfg = {{"layer", "Mamba3"},
                  {"d_state", ssm.d_state},
                  {"expand", ssm.expand},
                  {"headdim", ssm.headdim},
                  {"ngroups", ssm.ngroups},
                  {"rope_fraction", ssm.rope_fraction},
                  {"A_floor", ssm.A_floor},
                  {"is_outproj_norm", ssm.is_outproj_norm},
                  {"is_mimo", ssm.is_mimo},
                  {"mimo_rank", ssm.mimo_rank},
                  {"chunk_size", ssm.chunk_size},
                  {"A_activation", ssm.a_activation == AActivation::HeavyTail ? "heavy_tail" : "softplus"}};
  // The ablation switches (spec §15) only when on, so default configs stay exactly what mamba_ssm writes and reads.
  if (ssm.no_rotary) ssm_cfg["no_rotary"] = true;
  if (ssm.euler) ssm_cfg["euler"] = true;
  // Official init-only keys: written when they differ from the official defaults (mamba_ssm accepts them).
  const Mamba3Config defaults;
  if (ssm.dt_min != defaults.dt_min) ssm_cfg["dt_min"] = ssm.dt_min;
  if (ssm.dt_max != defaults.dt_max) ssm_cfg["dt_max"] = ssm.dt_max;
  if (ssm.dt_init_floor != defaults.dt_init_floor) ssm_cfg["dt_init_floor"] = ssm.dt_init_floor;
  json attn_cfg = json::object();
  if (!attn_layer_idx.empty()) {
    attn_cfg = {{"num_heads", attn.num_heads},
                {"num_heads_kv", attn.kv_heads()},
                {"head_dim", attn.head_dim},
                {"mlp_dim", attn.mlp_dim},
                {"qkv_proj_bias", attn.qkv_proj_bias},
                {"out_proj_bias", attn.out_proj_bias},
                {"causal", attn.causal},
                {"d_conv", attn.d_conv},
                {"rotary_emb_dim", attn.rotary_emb_dim},
                {"rotary_emb_base", attn.rotary_emb_base},
                {"rotary_emb_interleaved", attn.rotary_emb_interleaved}};
    if (attn.softmax_scale != 0) attn_cfg["softmax_scale"] = attn.softmax_scale;
  }
  return {{"d_model", d_model},
          {"d_intermediate", d_intermediate},
          {"n_layer", n_layer},
          {"vocab_size", vocab_size},
          {"ssm_cfg", ssm_cfg},
          {"attn_layer_idx", attn_layer_idx},
          {"attn_cfg", attn_cfg},
          {"rms_norm", rms_norm},
          {"residual_in_fp32", residual_in_fp32},
          {"fused_add_norm", fused_add_norm},
          {"pad_vocab_size_multiple", pad_vocab_size_multiple},
          {"tie_embeddings", tie_embeddings}};
}

void ModelConfig::save(const std::string& path) const {
  AtomicFile out(path);
  out.write(to_json().dump(4) + "\n");
  out.commit();
}

}  // namespace mamba3
