#pragma once
// The hybrid models' attention mixer (mamba_ssm.modules.mha.MHA, spec §9.6): in_proj → [MLP branch] → [causal
// depthwise conv] → q, k, v → rotary → attention against the KV cache → concat MLP branch → out_proj.
#include <set>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/model_config.h"

namespace mamba3 {

// One sequence's attention cache: keys (after rotary) and values, and the conv inputs when d_conv > 0.
struct AttentionRowCache {
  int64_t length = 0;
  std::vector<float> k, v;  // (length, Hkv, hd); capacity grows geometrically
  std::vector<float> conv;  // (d_conv, qkv_dim): the last d_conv pre-conv inputs, oldest first

  size_t nbytes() const { return (k.size() + v.size() + conv.size()) * sizeof(float); }
};

class AttentionLayer {
 public:
  AttentionLayer(const AttentionConfig& config, int64_t d_model, const TensorMap& weights, const std::string& prefix,
                 const std::string& source, std::set<std::string>* used);

  AttentionRowCache new_cache() const;
  // x: (L, d_model) of one sequence continuing `cache`; out: (L, d_model).
  void forward(const float* x, int64_t L, AttentionRowCache& cache, float* out) const;
  size_t parameter_count() const;
  int64_t kv_bytes_per_token() const { return 2 * config_.kv_heads() * config_.head_dim * int64_t(sizeof(float)); }

 private:
  AttentionConfig config_;
  int64_t d_model_;
  Tensor in_w_, in_b_, conv_w_, conv_b_, out_w_, out_b_;
};

}  // namespace mamba3
