#pragma once
// The hybrid attention mixer (spec §9.6) for GPU training, the math of train/attention_layer_grad.h on device
// buffers: in_proj (+bias) → [causal depthwise conv over the qkv columns] → q, k, v → rotary(q, k) → attention
// (GQA, causal or not) → concat MLP branch up ⊙ silu(gate) → out_proj (+bias); and the backward of all of it.
//
// Every matrix product goes through TrainGemm (so its precision mode applies); the conv, rotary, softmax and
// attention are f32 (kernels in attention_train_kernels.h: a streaming attention that saves only the
// log-sum-exp per (token, head), never an L×L matrix). Deterministic: every gradient sum runs in a fixed order
// (no float atomics), so two backward calls give bit-identical results. head_dim ≤ 256.
#include <cstdint>

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/train_gemm.h"
#include "model/model_config.h"

namespace mamba3::cuda {

// Device pointers (f32); null where the config has no such parameter (same meaning as AttentionParamViews).
// in_w16, out_w16 (optional, the bf16 mode only): the projection weights rounded to bf16 (the parameter store's
// mirror), read by their products instead of rounding in_w / out_w again (the same bits).
struct AttentionTrainWeights {
  const float *in_w, *in_b, *conv_w, *conv_b, *out_w, *out_b;
  const uint16_t *in_w16 = nullptr, *out_w16 = nullptr;
};
struct AttentionTrainGrads {
  float *in_w, *in_b, *conv_w, *conv_b, *out_w, *out_b;  // accumulated (+=); null skips that gradient
};

// One layer's worth of saved activations and backward scratch (both grow-only). All work is ordered on
// ctx.stream(); not thread-safe.
class AttentionTrainGpu {
 public:
  AttentionTrainGpu(const AttentionConfig& a, int64_t d_model);

  // x, out: (B·L, d_model) f32, B sequences of L tokens from position 0. Keeps its activations inside this object
  // (one layer's worth) for the following backward.
  void forward(const Context& ctx, TrainGemm& gemm, const AttentionTrainWeights& w, const float* x, int64_t B,
               int64_t L, float* out);
  // dx (B·L, d_model) overwritten; parameter gradients accumulated; uses the activations of the last forward
  // (which must have had the same B and L).
  void backward(const Context& ctx, TrainGemm& gemm, const AttentionTrainWeights& w, const AttentionTrainGrads& g,
                const float* x, int64_t B, int64_t L, const float* dout, float* dx);

  const AttentionConfig& config() const { return cfg_; }

 private:
  AttentionConfig cfg_;
  int64_t d_model_;
  int64_t H_, Hkv_, hd_, qkv_w_, mlp_, width_, ctx_w_;  // shapes (see attention_train_kernels.h Dims)
  int64_t saved_B_ = -1, saved_L_ = -1;                 // the shape of the saved activations

  // Saved by forward.
  DeviceBuffer proj_;            // (N, width) in_proj output (+bias), before the conv
  DeviceBuffer conv_out_;        // (N, qkv) conv output (d_conv > 0)
  DeviceBuffer q_, k_, v_;       // (N, H, hd), (N, Hkv, hd) ×2, q and k after rotary
  DeviceBuffer ctx_;             // (N, ctx_w) out_proj input: attention output ‖ MLP branch
  DeviceBuffer lse_;             // (N, H) log-sum-exp of the scaled scores
  DeviceBuffer cos_, sin_;       // (L, rotary/2) rotary table
  // Backward scratch.
  DeviceBuffer dctx_, dproj_, dq_, dk_, dv_, dqkv_, dvec_, partial_;
};

}  // namespace mamba3::cuda
