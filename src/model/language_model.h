#pragma once
// MambaLMHeadModel with Mamba-3 mixers (spec §9): embedding → blocks [norm → mixer (Mamba-3 | attention) → add →
// norm2 → GatedMLP → add] → norm_f → lm_head. Residual stream in f32. CPU, f32 compute (weights of any float
// dtype are widened at load).
#include <memory>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "model/attention_layer.h"
#include "model/gated_mlp.h"
#include "model/mamba3_mixer.h"
#include "model/model_cache.h"
#include "model/model_config.h"

namespace mamba3 {

class LanguageModel {
 public:
  // Reads dir/config.json and the weights (model.safetensors, its sharded index, or pytorch_model.bin).
  static LanguageModel load(const std::string& dir);
  // Strict: every parameter must be present with its shape, and no tensor may be left unused.
  LanguageModel(const ModelConfig& config, const TensorMap& weights, const std::string& source);
  LanguageModel(LanguageModel&&) noexcept;
  ~LanguageModel();

  const ModelConfig& config() const { return config_; }
  size_t parameter_count() const;
  ModelCache new_cache(int64_t batch) const;
  // Bytes of constant decode state per sequence (Mamba-3 layers) and of KV cache per token (attention layers).
  size_t state_bytes_per_sequence() const;
  size_t kv_bytes_per_token() const;

  // Feeds `ids` (one sequence, ≥ 1 token) into row `row` of `cache`, continuing from its state. Returns the logits
  // of every position (L, V_pad) when all_logits, else of the last one (1, V_pad).
  Tensor prefill(std::span<const int64_t> ids, ModelCache& cache, int64_t row, bool all_logits = false) const;
  // One token for each row of the cache: ids (B) → logits (B, V_pad) (preallocated; reused scratch, so the
  // Mamba-3 layers allocate nothing).
  void step(std::span<const int64_t> ids, ModelCache& cache, Tensor& logits) const;

 private:
  struct Block {
    std::unique_ptr<Mamba3Mixer> mamba;
    std::unique_ptr<AttentionLayer> attention;
    std::unique_ptr<GatedMlp> mlp;
    Tensor norm_w, norm_b, norm2_w, norm2_b;
  };
  struct Scratch;
  void check_ids(std::span<const int64_t> ids) const;
  void norm(const float* x, int64_t rows, const Tensor& w, const Tensor& b, float* y) const;
  // Runs the blocks and the final norm over `rows` hidden rows of one sequence (prefill) or of a batch (step).
  void run_blocks(Scratch& s, int64_t rows, ModelCache& cache, int64_t row, bool decode) const;

  ModelConfig config_;
  Tensor embedding_, lm_head_, norm_f_w_, norm_f_b_;
  std::vector<Block> blocks_;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace mamba3
