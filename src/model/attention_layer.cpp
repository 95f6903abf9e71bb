#include "model/attention_layer.h"

#include <algorithm>
#include <cmath>

#include "ops/attention.h"
#include "ops/linear.h"
#include "ops/mamba3_common.h"

namespace mamba3 {

namespace {
Tensor load(const TensorMap& w, const std::string& name, const Shape& shape, const std::string& source,
            std::set<std::string>* used) {
  auto it = w.find(name);
  MAMBA3_CHECK(it != w.end(), "{}: missing parameter '{}'", source, name);
  MAMBA3_CHECK(it->second.shape() == shape, "{}: tensor '{}': expected shape {}, got {}", source, name,
               shape_str(shape), shape_str(it->second.shape()));
  MAMBA3_CHECK(dtype_is_float(it->second.dtype()), "{}: tensor '{}' is not a float tensor", source, name);
  if (used) used->insert(name);
  return it->second.to(DType::F32);
}
}  // namespace

AttentionLayer::AttentionLayer(const AttentionConfig& config, int64_t d_model, const TensorMap& weights,
                               const std::string& prefix, const std::string& source, std::set<std::string>* used)
    : config_(config), d_model_(d_model) {
  const int64_t qkv = config.qkv_dim(), mlp = config.mlp_dim ? config.mlp_width() : 0;
  const int64_t ctx = config.num_heads * config.head_dim + mlp / 2;
  in_w_ = load(weights, prefix + "in_proj.weight", {qkv + mlp, d_model}, source, used);
  if (config.qkv_proj_bias) in_b_ = load(weights, prefix + "in_proj.bias", {qkv + mlp}, source, used);
  if (config.d_conv > 0) {
    conv_w_ = load(weights, prefix + "conv1d.weight", {qkv, 1, config.d_conv}, source, used);
    conv_b_ = load(weights, prefix + "conv1d.bias", {qkv}, source, used);
  }
  out_w_ = load(weights, prefix + "out_proj.weight", {d_model, ctx}, source, used);
  if (config.out_proj_bias) out_b_ = load(weights, prefix + "out_proj.bias", {d_model}, source, used);
}

size_t AttentionLayer::parameter_count() const {
  size_t n = 0;
  for (const Tensor* t : {&in_w_, &in_b_, &conv_w_, &conv_b_, &out_w_, &out_b_})
    if (t->defined()) n += size_t(t->numel());
  return n;
}

AttentionRowCache AttentionLayer::new_cache() const {
  AttentionRowCache c;
  if (config_.d_conv > 0) c.conv.assign(size_t(config_.d_conv * config_.qkv_dim()), 0.0f);
  return c;
}

void AttentionLayer::forward(const float* x, int64_t L, AttentionRowCache& cache, float* out) const {
  const AttentionConfig& a = config_;
  const int64_t H = a.num_heads, Hkv = a.kv_heads(), hd = a.head_dim, qkv = a.qkv_dim();
  const int64_t mlp = a.mlp_dim ? a.mlp_width() : 0, width = qkv + mlp, ctx_w = H * hd + mlp / 2;
  std::vector<float> proj(size_t(L * width)), ctx(size_t(L * ctx_w)), q(size_t(L * H * hd));
  linear(x, L, d_model_, in_w_.data<float>(), width, proj.data());  // (L, qkv + mlp)
  if (in_b_.defined())
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < width; ++j) proj[size_t(t * width + j)] += in_b_.data<float>()[j];

  // Causal depthwise conv over the qkv columns; the cache keeps the last d_conv inputs (spec §14 #18).
  if (a.d_conv > 0) {
    const int64_t K = a.d_conv;
    const float* w = conv_w_.data<float>();
    for (int64_t t = 0; t < L; ++t) {
      float* row = proj.data() + t * width;
      std::copy(cache.conv.begin() + qkv, cache.conv.end(), cache.conv.begin());  // shift out the oldest
      std::copy_n(row, qkv, cache.conv.end() - qkv);
      for (int64_t ch = 0; ch < qkv; ++ch) {
        float acc = conv_b_.data<float>()[ch];
        for (int64_t k = 0; k < K; ++k) acc += w[ch * K + k] * cache.conv[size_t(k * qkv + ch)];
        row[ch] = acc;
      }
    }
  }

  // Split, rotate, append to the cache.
  const int64_t pos0 = cache.length;
  cache.k.resize(size_t((pos0 + L) * Hkv * hd));
  cache.v.resize(size_t((pos0 + L) * Hkv * hd));
  for (int64_t t = 0; t < L; ++t) {
    const float* row = proj.data() + t * width;
    float* qt = q.data() + t * H * hd;
    float* kt = cache.k.data() + (pos0 + t) * Hkv * hd;
    std::copy_n(row, H * hd, qt);
    std::copy_n(row + H * hd, Hkv * hd, kt);
    std::copy_n(row + H * hd + Hkv * hd, Hkv * hd, cache.v.data() + (pos0 + t) * Hkv * hd);
    if (a.rotary_emb_dim > 0) {
      rotary(qt, H, hd, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved, pos0 + t);
      rotary(kt, Hkv, hd, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved, pos0 + t);
    }
  }
  cache.length = pos0 + L;

  const float scale = a.softmax_scale != 0 ? float(a.softmax_scale) : float(1.0 / std::sqrt(double(hd)));
  std::vector<float> att(size_t(L * H * hd));
  attention({H, Hkv, hd, scale, a.causal}, q.data(), L, pos0, cache.k.data(), cache.v.data(), cache.length,
            att.data());
  for (int64_t t = 0; t < L; ++t) {
    float* c = ctx.data() + t * ctx_w;
    std::copy_n(att.data() + t * H * hd, H * hd, c);
    const float* m = proj.data() + t * width + qkv;  // MLP branch: up ⊙ silu(gate)
    for (int64_t j = 0; j < mlp / 2; ++j) c[H * hd + j] = m[j] * detail::silu(m[mlp / 2 + j]);
  }
  linear(ctx.data(), L, ctx_w, out_w_.data<float>(), d_model_, out);
  if (out_b_.defined())
    for (int64_t t = 0; t < L; ++t)
      for (int64_t j = 0; j < d_model_; ++j) out[t * d_model_ + j] += out_b_.data<float>()[j];
}

}  // namespace mamba3
