// Host side of the GPU attention mixer's training pass: buffer sizing, the matrix products through TrainGemm and
// the order of the kernels (attention_train_kernels.h). Mirrors train/attention_layer_grad.cpp step by step.
#include "cuda/train/attention_train_gpu.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "cuda/train/attention_train_kernels.h"

namespace mamba3::cuda {

namespace {

// Grows b to hold n values of T; returns it typed.
template <typename T>
T* grow(DeviceBuffer& b, int64_t n) {
  b.reserve(size_t(std::max<int64_t>(n, 1)) * sizeof(T));
  return b.as<T>();
}

attn_train::Dims dims_of(const AttentionConfig& a, int64_t B, int64_t L) {
  const int64_t mlp = a.mlp_dim ? a.mlp_width() : 0;
  const float scale = a.softmax_scale != 0 ? float(a.softmax_scale) : float(1.0 / std::sqrt(double(a.head_dim)));
  return {B,           L,          a.num_heads, a.kv_heads(), a.head_dim, a.qkv_dim(), a.qkv_dim() + mlp,
          a.num_heads * a.head_dim + mlp / 2, mlp / 2, a.d_conv, a.rotary_emb_dim / 2, a.rotary_emb_interleaved,
          a.causal, scale};
}

}  // namespace

AttentionTrainGpu::AttentionTrainGpu(const AttentionConfig& a, int64_t d_model)
    : cfg_(a),
      d_model_(d_model),
      H_(a.num_heads),
      Hkv_(a.kv_heads()),
      hd_(a.head_dim),
      qkv_w_(a.qkv_dim()),
      mlp_(a.mlp_dim ? a.mlp_width() : 0),
      width_(qkv_w_ + mlp_),
      ctx_w_(H_ * hd_ + mlp_ / 2) {
  MAMBA3_CHECK(d_model > 0 && H_ > 0 && Hkv_ > 0 && H_ % Hkv_ == 0,
               "attention training: d_model {}, heads {}, kv heads {} (kv heads must divide heads)", d_model, H_, Hkv_);
  MAMBA3_CHECK(hd_ >= 1 && hd_ <= attn_train::kMaxHeadDim, "attention training: head_dim {} outside [1, {}]", hd_,
               attn_train::kMaxHeadDim);
  MAMBA3_CHECK(a.d_conv >= 0 && a.rotary_emb_dim >= 0 && a.rotary_emb_dim <= hd_,
               "attention training: d_conv {} / rotary_emb_dim {} (head_dim {}) unsupported", a.d_conv,
               a.rotary_emb_dim, hd_);
}

void AttentionTrainGpu::forward(const Context& ctx, TrainGemm& gemm, const AttentionTrainWeights& w, const float* x,
                                int64_t B, int64_t L, float* out) {
  MAMBA3_CHECK(B >= 0 && L >= 0, "attention training forward: B {} L {}", B, L);
  MAMBA3_CHECK(w.in_w && w.out_w && (cfg_.d_conv == 0 || w.conv_w),
               "attention training forward: missing in_proj, out_proj or conv1d weight");
  saved_B_ = B, saved_L_ = L;
  const int64_t N = B * L, K = cfg_.d_conv, half = cfg_.rotary_emb_dim / 2;
  if (N == 0) return;
  const cudaStream_t s = ctx.stream();
  const attn_train::Dims d = dims_of(cfg_, B, L);

  float* proj = grow<float>(proj_, N * width_);  // (N, qkv + mlp)
  gemm.run_mixed(ctx, false, true, N, width_, d_model_, 1.0f, x, nullptr, d_model_, w.in_w, w.in_w16, d_model_, 0.0f,
                 proj, width_);
  if (w.in_b) attn_train::add_bias_rows(s, proj, N, width_, width_, w.in_b);

  const float* qkv = proj;
  int64_t qkv_ld = width_;
  if (K > 0) {
    float* conv = grow<float>(conv_out_, N * qkv_w_);  // (N, qkv)
    attn_train::conv_forward(s, d, proj, w.conv_w, w.conv_b, conv);
    qkv = conv, qkv_ld = qkv_w_;
  }
  float* cos_t = grow<float>(cos_, L * half);  // (L, rotary/2)
  float* sin_t = grow<float>(sin_, L * half);
  attn_train::rope_table(s, L, cfg_.rotary_emb_dim, cfg_.rotary_emb_base, cos_t, sin_t);

  float* q = grow<float>(q_, N * H_ * hd_);  // (N, H, hd)
  float* k = grow<float>(k_, N * Hkv_ * hd_);  // (N, Hkv, hd)
  float* v = grow<float>(v_, N * Hkv_ * hd_);  // (N, Hkv, hd)
  attn_train::split_rotary(s, d, qkv, qkv_ld, cos_t, sin_t, q, k, v);

  float* c = grow<float>(ctx_, N * ctx_w_);  // (N, H·hd + mlp/2)
  float* lse = grow<float>(lse_, N * H_);    // (N, H)
  attn_train::attention_forward(s, d, q, k, v, c, ctx_w_, lse);
  attn_train::mlp_forward(s, d, proj, c);

  gemm.run_mixed(ctx, false, true, N, d_model_, ctx_w_, 1.0f, c, nullptr, ctx_w_, w.out_w, w.out_w16, ctx_w_, 0.0f,
                 out, d_model_);
  if (w.out_b) attn_train::add_bias_rows(s, out, N, d_model_, d_model_, w.out_b);
}

void AttentionTrainGpu::backward(const Context& ctx, TrainGemm& gemm, const AttentionTrainWeights& w,
                                 const AttentionTrainGrads& g, const float* x, int64_t B, int64_t L,
                                 const float* dout, float* dx) {
  MAMBA3_CHECK(B == saved_B_ && L == saved_L_,
               "attention training backward: B {} L {} but the saved forward had B {} L {}", B, L, saved_B_,
               saved_L_);
  const int64_t N = B * L, K = cfg_.d_conv;
  if (N == 0) return;
  const cudaStream_t s = ctx.stream();
  const attn_train::Dims d = dims_of(cfg_, B, L);
  const float* proj = proj_.as<float>();
  const float* c = ctx_.as<float>();
  const int64_t chunks = attn_train::sum_chunks(N);
  double* partial = grow<double>(partial_, chunks * std::max({d_model_, width_, qkv_w_ * (K + 1)}));

  // out_proj: dW += doutᵀ·ctx, db += Σ dout, dctx = dout·W.
  std::optional<TrainGemm::HeldA> held(std::in_place, gemm, ctx, dout, N, d_model_, d_model_);  // rounded once
  if (g.out_w) gemm.run(ctx, true, false, d_model_, ctx_w_, N, 1.0f, dout, d_model_, c, ctx_w_, 1.0f, g.out_w, ctx_w_);
  if (g.out_b) attn_train::column_sum_add(s, dout, N, d_model_, d_model_, partial, g.out_b);
  float* dctx = grow<float>(dctx_, N * ctx_w_);  // (N, ctx_w)
  gemm.run_mixed(ctx, false, false, N, ctx_w_, d_model_, 1.0f, dout, nullptr, d_model_, w.out_w, w.out_w16, ctx_w_,
                 0.0f, dctx, ctx_w_);

  // MLP branch into dproj's last columns; attention into dq, dk, dv.
  float* dproj = grow<float>(dproj_, N * width_);  // (N, qkv + mlp)
  attn_train::mlp_backward(s, d, proj, dctx, dproj);
  float* dq = grow<float>(dq_, N * H_ * hd_);    // (N, H, hd)
  float* dk = grow<float>(dk_, N * Hkv_ * hd_);  // (N, Hkv, hd)
  float* dv = grow<float>(dv_, N * Hkv_ * hd_);  // (N, Hkv, hd)
  float* dvec = grow<float>(dvec_, N * H_);      // (N, H)
  attn_train::attention_backward(s, d, q_.as<float>(), k_.as<float>(), v_.as<float>(), c, ctx_w_, lse_.as<float>(),
                                 dctx, ctx_w_, dvec, dq, dk, dv);

  // Undo the rotary and the split: straight into dproj's qkv columns, or through the conv's backward.
  if (K > 0) {
    float* dqkv = grow<float>(dqkv_, N * qkv_w_);  // (N, qkv) gradient of the conv output
    attn_train::unrotate_pack(s, d, dq, dk, dv, cos_.as<float>(), sin_.as<float>(), dqkv, qkv_w_);
    attn_train::conv_backward(s, d, dqkv, proj, w.conv_w, dproj, partial, g.conv_w, g.conv_b);
  } else {
    attn_train::unrotate_pack(s, d, dq, dk, dv, cos_.as<float>(), sin_.as<float>(), dproj, width_);
  }

  // in_proj: dW += dprojᵀ·x, db += Σ dproj, dx = dproj·W.
  held.reset();
  held.emplace(gemm, ctx, dproj, N, width_, width_);
  if (g.in_w) gemm.run(ctx, true, false, width_, d_model_, N, 1.0f, dproj, width_, x, d_model_, 1.0f, g.in_w, d_model_);
  if (g.in_b) attn_train::column_sum_add(s, dproj, N, width_, width_, partial, g.in_b);
  gemm.run_mixed(ctx, false, false, N, d_model_, width_, 1.0f, dproj, nullptr, width_, w.in_w, w.in_w16, d_model_,
                 0.0f, dx, d_model_);
}

}  // namespace mamba3::cuda
