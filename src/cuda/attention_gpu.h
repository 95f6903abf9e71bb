#pragma once
// The hybrid models' attention mixer on the GPU (spec §9.6), the same computation as model/attention_layer.h:
// in_proj (+ bias) → [MLP branch up ⊙ silu(gate)] → [causal depthwise conv over the qkv columns, the cache keeping
// the last d_conv pre-conv inputs (the correct continuation, spec §14 #18)] → q, k, v → rotary on q and k at
// positions length + t → grouped-query attention (bottom-right causal, or bidirectional when the config says so)
// → concat MLP branch → out_proj (+ bias).
//
// Precision: the products run in the Precision's dtype (f32, or bf16 inputs with f32 accumulation); the conv,
// rotary, KV cache, scores and softmax are f32. The attention context enters out_proj in the activation dtype.
//
// Decode (step) reads each row's position from the device (`lengths`), so it can be captured in a CUDA graph and
// replayed; its scratch belongs to the cache (allocated by new_cache), prefill's to the layer (grown on demand):
// a captured decode step stays valid whatever is prefilled later. One layer runs on one stream at a time.
//
// Kernels: plain f32 CUDA cores, one block per (token, head) for the attention (no tensor cores, no sharing of
// K/V loads between the query heads of a group); measured on an H200, bf16, d_model 2560, 32 heads (8 kv),
// head_dim 128: decode step 0.12 ms (batch 1, 512 cached) to 2.6 ms (batch 64, 4096 cached); prefill 0.85 ms
// (L 512) and 11 ms (L 2048), quadratic in L.
//
// This header stays C++17 (the .cu includes it): the kernel launchers in `detail` take plain structs.
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>

#include <cuda_runtime.h>

#include "core/tensor.h"
#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/gpu_matrix.h"
#include "model/model_config.h"

namespace mamba3::cuda {

// Scratch of one attention call, grown on demand (never shrunk).
struct AttentionScratch {
  DeviceBuffer proj;  // (tokens, qkv + mlp) f32: in_proj output
  DeviceBuffer qkv;   // (tokens, qkv) f32: conv output (d_conv > 0)
  DeviceBuffer q;     // (tokens, H, hd) f32 after rotary
  DeviceBuffer ctx;   // (tokens, H·hd + mlp/2) activation dtype: out_proj input
};

// One attention layer's cache for a batch of rows. It also owns the decode step's scratch (one token per row,
// sized by new_cache): a captured decode graph keeps pointing at it while prefills of other caches grow the
// layer's own prefill scratch.
struct GpuAttentionCache {
  DeviceBuffer k, v;     // (batch, capacity, Hkv, head_dim) f32, k after rotary
  DeviceBuffer conv;     // (batch, d_conv, qkv_dim) f32: the last d_conv pre-conv inputs, oldest first (d_conv > 0)
  DeviceBuffer lengths;  // (batch) int32 on the device: tokens held per row
  AttentionScratch step_scratch;
  int64_t batch = 0, capacity = 0;
};

class GpuAttentionLayer {
 public:
  // Same parameter names and shape checks as the CPU AttentionLayer (`prefix` + "in_proj.weight", …).
  GpuAttentionLayer(const AttentionConfig& config, int64_t d_model, const TensorMap& weights, const std::string& prefix,
                    const std::string& source, std::set<std::string>* used, Precision precision);

  // Zeroed: every row empty (lengths 0), conv state 0. Synchronises the device (not for the decode loop).
  GpuAttentionCache new_cache(int64_t batch, int64_t capacity) const;

  // x (L, d_model) activations (the precision's dtype) of ONE sequence appended to row `row` of `cache`, whose
  // current length `start` the caller passes (it must equal lengths[row]); out (L, d_model) f32.
  // Sets lengths[row] = start + L on the device. Throws if start + L > capacity.
  void prefill(const Context& ctx, const void* x, int64_t L, GpuAttentionCache& cache, int64_t row, int64_t start,
               float* out) const;

  // x (B, d_model), one token per row (B == cache.batch), row b at position lengths[b] read on the device (no
  // host reads or syncs). Appends k, v and the conv input, then increments lengths[b]. out (B, d_model) f32.
  // The caller guarantees lengths[b] < capacity; a row already full writes nothing to its cache and its output
  // is meaningless (but no memory outside the cache is touched).
  void step(const Context& ctx, const void* x, int64_t B, GpuAttentionCache& cache, float* out) const;

  // Copies row `src` of `from` (k, v over the whole capacity, conv state, length) into row `dst` of `to`, on
  // ctx.stream(). Both caches must come from this layer's shapes and have the same capacity.
  static void copy_row(const Context& ctx, const GpuAttentionCache& from, int64_t src, GpuAttentionCache& to,
                       int64_t dst);

  size_t parameter_bytes() const;
  const AttentionConfig& config() const { return config_; }
  Precision precision() const { return precision_; }

 private:
  void run(const Context& ctx, const void* x, int64_t rows, int64_t tokens, GpuAttentionCache& cache, int64_t row0,
           int64_t start, bool from_lengths, AttentionScratch& scratch, float* out) const;
  void reserve(AttentionScratch& s, int64_t tokens) const;

  AttentionConfig config_;
  int64_t d_model_;
  Precision precision_;
  GpuMatrix in_proj_, out_proj_;
  DeviceBuffer conv_w_, conv_b_;  // (qkv, d_conv), (qkv) f32 when d_conv > 0

  mutable AttentionScratch prefill_scratch_;
};

namespace detail {

// The largest head_dim the attention kernel handles (8 channels per lane of a warp).
constexpr int64_t kMaxAttentionHeadDim = 256;

// Tokens are `rows` × `tokens` (row-major): token r·tokens + t belongs to cache row row0 + r and sits at position
// base_r + t, base_r = lengths[row0 + r] when from_lengths, else `start`.
struct AttentionTokens {
  int64_t rows, tokens, row0, start;
  const int32_t* lengths;  // (batch) device
  bool from_lengths;
};

struct AttentionKernelArgs {
  AttentionTokens tok;
  int64_t heads, kv_heads, head_dim, capacity;
  int64_t qkv, width, ctx_width, mlp_half;  // qkv_dim, in_proj width, out_proj input width, mlp/2
  int64_t d_conv, rotary_dim;
  double rotary_base;
  bool rotary_interleaved, causal, bf16;
  float scale;
  const float* proj;       // (n, width)
  float* qkv_conv;         // (n, qkv) conv output, or null without conv
  const float* conv_w;     // (qkv, d_conv)
  const float* conv_b;     // (qkv)
  float* conv_state;       // (batch, d_conv, qkv)
  float* q;                // (n, H, hd)
  float* k_cache;          // (batch, capacity, Hkv, hd)
  float* v_cache;          // (batch, capacity, Hkv, hd)
  void* ctx;               // (n, ctx_width) activation dtype
};

// Everything between in_proj and out_proj: conv (+ state update), split, rotary, append, attention, MLP branch.
void attention_middle(cudaStream_t stream, const AttentionKernelArgs& a);
// lengths[row] = value (prefill).
void attention_set_length(cudaStream_t stream, int32_t* lengths, int64_t row, int64_t value);
// lengths[b] += 1 for b < n (step).
void attention_bump_lengths(cudaStream_t stream, int32_t* lengths, int64_t n);

}  // namespace detail
}  // namespace mamba3::cuda
