#pragma once
// Kernel launchers of the GPU attention mixer's training pass (attention_train_gpu.h), C++17 so the .cu files can
// include it. All tensors are f32 device memory, row-major; rows are the B·L tokens, sequence b's token t is row
// b·L + t at position t. Every launcher runs on `s` and writes each of its outputs completely.
#include <cstdint>

#include <cuda_runtime.h>

namespace mamba3::cuda::attn_train {

// The mixer's shapes (spec §9.6): width = qkv + mlp in_proj columns, ctx_w = H·hd + mlp/2 out_proj inputs.
struct Dims {
  int64_t B, L, H, Hkv, hd, qkv, width, ctx_w, mlp_half, d_conv, rot_half;
  bool interleaved, causal;
  float scale;
};

// The largest head_dim of the attention kernels (8 channels per lane of a warp).
constexpr int64_t kMaxHeadDim = 256;
// Rows per partial sum of the deterministic column reductions.
constexpr int64_t kSumChunk = 128;
inline int64_t sum_chunks(int64_t rows) { return (rows + kSumChunk - 1) / kSumChunk; }

// ---- element-wise parts (attention_train_elementwise.cu) ----

// y[r, c] += bias[c] for r < rows, c < cols (row stride ld).
void add_bias_rows(cudaStream_t s, float* y, int64_t rows, int64_t cols, int64_t ld, const float* bias);

// dst[c] += Σ_r src[r, c], in float64 over fixed row chunks then over chunks in order (deterministic).
// partial: sum_chunks(rows)·cols doubles of scratch.
void column_sum_add(cudaStream_t s, const float* src, int64_t rows, int64_t cols, int64_t ld, double* partial,
                    float* dst);

// cos/sin (L, rot_half) of position·base^(−2i/rot_dim), the angle in double as ops/attention.cpp, rounded to f32.
void rope_table(cudaStream_t s, int64_t L, int64_t rot_dim, double base, float* cos_t, float* sin_t);

// qkv_out (B·L, qkv) = causal depthwise conv of proj's first qkv columns (stride width) per sequence.
// conv_w (qkv, d_conv), conv_b (qkv) or null.
void conv_forward(cudaStream_t s, const Dims& d, const float* proj, const float* conv_w, const float* conv_b,
                  float* qkv_out);

// Splits the qkv columns of src (row stride src_ld) into q (B·L, H, hd), k, v (B·L, Hkv, hd), rotary on q and k.
void split_rotary(cudaStream_t s, const Dims& d, const float* src, int64_t src_ld, const float* cos_t,
                  const float* sin_t, float* q, float* k, float* v);

// The transpose of split_rotary: dst[:, 0:qkv] (row stride dst_ld) = [unrotate(dq), unrotate(dk), dv].
void unrotate_pack(cudaStream_t s, const Dims& d, const float* dq, const float* dk, const float* dv,
                   const float* cos_t, const float* sin_t, float* dst, int64_t dst_ld);

// ctx[:, H·hd + j] = up_j·silu(gate_j), up and gate the two halves of proj's columns after qkv.
void mlp_forward(cudaStream_t s, const Dims& d, const float* proj, float* ctx);
// dproj[:, qkv:] = [dup, dgate] from dctx[:, H·hd:] (no-op without the MLP branch).
void mlp_backward(cudaStream_t s, const Dims& d, const float* proj, const float* dctx, float* dproj);

// Backward of conv_forward: dproj[:, 0:qkv] (stride width) is overwritten with the input gradient; dconv_w and
// dconv_b (may be null) are added to. dqkv (B·L, qkv). partial: sum_chunks(B·L)·qkv·(d_conv + 1) doubles.
void conv_backward(cudaStream_t s, const Dims& d, const float* dqkv, const float* proj, const float* conv_w,
                   float* dproj, double* partial, float* dconv_w, float* dconv_b);

// ---- attention core (attention_train_attention.cu) ----

// o[r, h·hd : (h+1)·hd] (row stride o_ld) = softmax(scale·q·kᵀ, masked)·v per (sequence, head); lse (B·L, H) the
// log-sum-exp of the scaled scores (the backward recomputes the probabilities from it).
void attention_forward(cudaStream_t s, const Dims& d, const float* q, const float* k, const float* v, float* o,
                       int64_t o_ld, float* lse);

// dq (B·L, H, hd), dk, dv (B·L, Hkv, hd) overwritten, from the saved q, k, v, o (stride o_ld), lse and the output
// gradient dout (stride dout_ld). dvec: B·L·H floats of scratch (the rows' dout·o).
void attention_backward(cudaStream_t s, const Dims& d, const float* q, const float* k, const float* v,
                        const float* o, int64_t o_ld, const float* lse, const float* dout, int64_t dout_ld,
                        float* dvec, float* dq, float* dk, float* dv);

}  // namespace mamba3::cuda::attn_train
