// `mamba3 info PATH`: a model directory's configuration, size and state cost, or a safetensors file's tensors.
#include <cstdio>
#include <filesystem>

#include "commands.h"
#include "io/safetensors.h"
#include "model/language_model.h"

namespace mamba3::cli {

namespace {

void file_info(const std::string& path) {
  auto file = SafetensorsFile::open(path);
  size_t total = 0;
  for (const auto& name : file.names()) {
    const Tensor& t = file.get(name);
    std::printf("%-48s %-5s %s\n", name.c_str(), std::string(dtype_name(t.dtype())).c_str(),
                shape_str(t.shape()).c_str());
    total += size_t(t.numel());
  }
  std::printf("%zu tensors, %zu values\n", file.names().size(), total);
}

void model_info(const std::string& dir) {
  LanguageModel m = LanguageModel::load(dir);
  const ModelConfig& c = m.config();
  std::printf("model:       %s\n", dir.c_str());
  std::printf("layers:      %ld (%zu attention at [", long(c.n_layer), c.attn_layer_idx.size());
  for (size_t i = 0; i < c.attn_layer_idx.size(); ++i) std::printf("%s%ld", i ? ", " : "", long(c.attn_layer_idx[i]));
  std::printf("]), d_model %ld, MLP %s\n", long(c.d_model),
              c.d_intermediate ? std::to_string(c.d_ff()).c_str() : "none");
  std::printf("mixer:       %s\n", c.ssm.describe().c_str());
  std::printf("A:           %s%s\n", c.ssm.a_activation == AActivation::HeavyTail ? "heavy_tail" : "softplus",
              c.a_activation_given ? "" : " (assumed: ssm_cfg has no A_activation; checkpoints released before "
                                          "2026-06-02 need \"softplus\")");
  if (!c.attn_layer_idx.empty())
    std::printf("attention:   %ld heads, %ld kv heads, head_dim %ld, rotary %ld, causal %s%s\n",
                long(c.attn.num_heads), long(c.attn.kv_heads()), long(c.attn.head_dim), long(c.attn.rotary_emb_dim),
                c.attn.causal ? "true" : "false", c.attn.causal_given ? "" : " (official default; not in attn_cfg)");
  std::printf("vocabulary:  %ld (padded to %ld), %s embeddings, %s\n", long(c.vocab_size), long(c.vocab_padded()),
              c.tie_embeddings ? "tied" : "untied", c.rms_norm ? "RMSNorm" : "LayerNorm");
  std::printf("parameters:  %zu (%.1f MB as f32)\n", m.parameter_count(), double(m.parameter_count()) * 4 / 1e6);
  std::printf("decode state per sequence: %zu bytes (constant in length)\n", m.state_bytes_per_sequence());
  std::printf("KV cache per token:        %zu bytes (attention layers)\n", m.kv_bytes_per_token());
}

}  // namespace

void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Describe a model directory or a safetensors file");
  static std::string path;
  cmd->add_option("path", path, "a model directory or a .safetensors file")->required();
  cmd->callback([] {
    if (std::filesystem::is_directory(path)) {
      model_info(path);
    } else {
      file_info(path);
    }
  });
}

}  // namespace mamba3::cli
