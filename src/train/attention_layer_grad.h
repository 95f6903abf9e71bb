#pragma once
// The hybrid attention mixer (spec §9.6, model/attention_layer.h) for training over B sequences of L tokens from
// position 0: forward keeping its activations, and backward for every parameter and the input.
// in_proj (+bias) → [causal depthwise conv over the qkv columns] → q, k, v → rotary(q, k) → attention (GQA,
// causal or not) → concat MLP branch up ⊙ silu(gate) → out_proj (+bias).
#include <cstdint>
#include <vector>

#include "model/model_config.h"

namespace mamba3 {

// Null where the configuration has no such parameter.
struct AttentionParamViews {
  const float *in_w = nullptr, *in_b = nullptr, *conv_w = nullptr, *conv_b = nullptr, *out_w = nullptr,
              *out_b = nullptr;
};
struct AttentionGradViews {
  float *in_w = nullptr, *in_b = nullptr, *conv_w = nullptr, *conv_b = nullptr, *out_w = nullptr, *out_b = nullptr;
};

struct AttentionActivations {
  std::vector<float> proj;  // (B·L, qkv + mlp) in_proj output (before the conv)
  std::vector<float> qkv;   // (B·L, qkv) after the conv (empty without conv)
  std::vector<float> q;     // (B·L, H, hd) after rotary
  std::vector<float> k, v;  // (B·L, Hkv, hd), k after rotary
  std::vector<float> att;   // (B·L, H, hd) attention output
  std::vector<float> ctx;   // (B·L, H·hd + mlp/2) out_proj input
};

// x, out: (B·L, d_model).
void attention_train_forward(const AttentionConfig& a, int64_t d_model, const AttentionParamViews& p, const float* x,
                             int64_t B, int64_t L, AttentionActivations& act, float* out);
// dx (B·L, d_model) is overwritten; the parameter gradients are added to.
void attention_train_backward(const AttentionConfig& a, int64_t d_model, const AttentionParamViews& p, const float* x,
                              int64_t B, int64_t L, const AttentionActivations& act, const float* dout, float* dx,
                              const AttentionGradViews& g);

}  // namespace mamba3
