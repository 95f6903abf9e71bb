#include "train/lm_gradients.h"

#include <algorithm>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/parallel_work.h"
#include "model/mamba3_mixer.h"
#include "model/mamba3_mixer_backward.h"
#include "ops/linear.h"
#include "ops/norm.h"
#include "ops/mamba3_reference_backward.h"
#include "ops/norm_backward.h"
#include "train/attention_layer_grad.h"
#include "train/data.h"
#include "train/gated_mlp_grad.h"
#include "train/lm_head_loss.h"

namespace mamba3 {

namespace {

// Parameter lookup with shape checks, the set of names used (so a stray tensor is reported), and the gradient
// tensor of each parameter.
class ParamTable {
 public:
  ParamTable(const TensorMap& params, TensorMap* grads) : params_(params), grads_(grads) {}

  const float* get(const std::string& name, const Shape& shape) {
    auto it = params_.find(name);
    MAMBA3_CHECK(it != params_.end(), "lm_loss_and_grad: missing parameter '{}'", name);
    MAMBA3_CHECK(it->second.dtype() == DType::F32, "lm_loss_and_grad: parameter '{}' has dtype {}, expected F32",
                 name, dtype_name(it->second.dtype()));
    MAMBA3_CHECK(it->second.shape() == shape, "lm_loss_and_grad: parameter '{}': expected shape {}, got {}", name,
                 shape_str(shape), shape_str(it->second.shape()));
    used_.insert(name);
    return it->second.data<float>();
  }
  const float* get_if(bool present, const std::string& name, const Shape& shape) {
    return present ? get(name, shape) : nullptr;
  }
  // The gradient buffer of a parameter already fetched with get() (null when no gradients are wanted).
  float* grad(const std::string& name) {
    if (!grads_) return nullptr;
    auto it = grads_->find(name);
    MAMBA3_CHECK(it != grads_->end(), "lm_loss_and_grad: internal: no gradient for '{}'", name);
    return it->second.data<float>();
  }
  float* grad_if(bool present, const std::string& name) { return present ? grad(name) : nullptr; }
  void mark_used(const std::string& name) { used_.insert(name); }

  // After every get(): rejects stray tensors and prepares zeroed gradient tensors for every parameter.
  void finish() {
    for (const auto& [name, t] : params_)
      MAMBA3_CHECK(used_.count(name), "lm_loss_and_grad: unexpected tensor '{}' (not a parameter of this configuration)",
                   name);
    if (!grads_) return;
    for (auto it = grads_->begin(); it != grads_->end();)
      it = params_.count(it->first) ? std::next(it) : grads_->erase(it);
    for (const auto& [name, t] : params_) {
      Tensor& g = (*grads_)[name];
      if (!g.defined() || g.dtype() != DType::F32 || g.shape() != t.shape()) {
        g = Tensor::zeros(DType::F32, t.shape());
      } else {
        std::fill_n(g.data<float>(), g.numel(), 0.0f);
      }
    }
  }

 private:
  const TensorMap& params_;
  TensorMap* grads_;
  std::set<std::string> used_;
};

struct NormParams {
  const float *w = nullptr, *b = nullptr;
  std::string name;  // "backbone.layers.3.norm"
};

struct Layer {
  NormParams norm, norm2;
  std::string prefix;  // "backbone.layers.3."
  std::unique_ptr<Mamba3Mixer> mamba;
  bool attention = false;
  AttentionParamViews attn;
  const float *fc1 = nullptr, *fc2 = nullptr;
  // Activations kept for the backward.
  Tensor res_in, normed;   // (B, L, D) residual before the norm, the mixer input
  Tensor zx_raw;           // (B·L, d_in) the Mamba-3 mixer's in_proj output (its backward skips recomputing it)
  Tensor res_mid, normed2;  // (B·L, D) residual before norm2, the MLP input
  std::vector<float> mlp_h, mlp_o;
  AttentionActivations attn_act;
};

}  // namespace

double lm_loss_and_grad(const ModelConfig& c, const TensorMap& params, const int64_t* tokens, int64_t B, int64_t L,
                        TensorMap* grads) {
  MAMBA3_CHECK(B >= 1 && L >= 1, "lm_loss_and_grad: need B ≥ 1 and L ≥ 1, got B {} L {}", B, L);
  MAMBA3_CHECK(tokens != nullptr, "lm_loss_and_grad: tokens is null");
  for (int64_t i = 0; i < B * (L + 1); ++i)
    MAMBA3_CHECK(tokens[i] >= 0 && tokens[i] < c.vocab_size,
                 "lm_loss_and_grad: token {} at row {} position {} is outside the vocabulary [0, {})", tokens[i],
                 i / (L + 1), i % (L + 1), c.vocab_size);
  std::vector<int64_t> inputs, targets;
  split_windows(tokens, B, L, inputs, targets);
  return lm_loss_and_grad_labels(c, params, inputs.data(), targets.data(), B, L, grads);
}

double lm_loss_and_grad_labels(const ModelConfig& c, const TensorMap& params, const int64_t* input_ids,
                               const int64_t* target_ids, int64_t B, int64_t L, TensorMap* grads) {
  MAMBA3_CHECK(B >= 1 && L >= 1, "lm_loss_and_grad: need B ≥ 1 and L ≥ 1, got B {} L {}", B, L);
  MAMBA3_CHECK(input_ids != nullptr && target_ids != nullptr, "lm_loss_and_grad: inputs or targets is null");
  int64_t labelled = 0;
  for (int64_t i = 0; i < B * L; ++i) {
    MAMBA3_CHECK(input_ids[i] >= 0 && input_ids[i] < c.vocab_size,
                 "lm_loss_and_grad: input {} at row {} position {} is outside the vocabulary [0, {})", input_ids[i],
                 i / L, i % L, c.vocab_size);
    MAMBA3_CHECK(target_ids[i] < c.vocab_size,
                 "lm_loss_and_grad: target {} at row {} position {} is outside the vocabulary [0, {})", target_ids[i],
                 i / L, i % L, c.vocab_size);
    labelled += target_ids[i] >= 0;
  }
  MAMBA3_CHECK(labelled > 0, "lm_loss_and_grad: no position has a target (all {} are negative)", B * L);
  use_single_threaded_blas();
  const int64_t D = c.d_model, V = c.vocab_padded(), N = B * L, dff = c.d_ff();
  const bool want = grads != nullptr;
  const float eps = float(c.norm_epsilon);

  // Parameters.
  ParamTable pt(params, grads);
  const float* emb = pt.get("backbone.embedding.weight", {V, D});
  const float* head = emb;
  if (!c.tie_embeddings) {
    head = pt.get("lm_head.weight", {V, D});
  } else if (params.count("lm_head.weight")) {
    pt.get("lm_head.weight", {V, D});  // a stored tied copy: accepted; it receives no gradient of its own
  }
  auto norm_params = [&](const std::string& name) {
    NormParams n;
    n.name = name;
    n.w = pt.get(name + ".weight", {D});
    n.b = pt.get_if(!c.rms_norm, name + ".bias", {D});
    return n;
  };
  std::vector<Layer> layers(size_t(c.n_layer));
  for (int64_t i = 0; i < c.n_layer; ++i) {
    Layer& l = layers[size_t(i)];
    l.prefix = "backbone.layers." + std::to_string(i) + ".";
    l.norm = norm_params(l.prefix + "norm");
    const std::string mp = l.prefix + "mixer.";
    if (c.is_attention_layer(i)) {
      const AttentionConfig& a = c.attn;
      const int64_t qkv = a.qkv_dim(), mlp = a.mlp_dim ? a.mlp_width() : 0;
      l.attention = true;
      l.attn.in_w = pt.get(mp + "in_proj.weight", {qkv + mlp, D});
      l.attn.in_b = pt.get_if(a.qkv_proj_bias, mp + "in_proj.bias", {qkv + mlp});
      l.attn.conv_w = pt.get_if(a.d_conv > 0, mp + "conv1d.weight", {qkv, 1, a.d_conv});
      l.attn.conv_b = pt.get_if(a.d_conv > 0, mp + "conv1d.bias", {qkv});
      l.attn.out_w = pt.get(mp + "out_proj.weight", {D, a.num_heads * a.head_dim + mlp / 2});
      l.attn.out_b = pt.get_if(a.out_proj_bias, mp + "out_proj.bias", {D});
    } else {
      for (const auto& [name, shape] : mamba3_parameter_shapes(c.ssm)) pt.get(mp + name, shape);
      l.mamba = std::make_unique<Mamba3Mixer>(c.ssm, params, mp, "lm_loss_and_grad");
    }
    if (c.d_intermediate > 0) {
      l.norm2 = norm_params(l.prefix + "norm2");
      l.fc1 = pt.get(l.prefix + "mlp.fc1.weight", {2 * dff, D});
      l.fc2 = pt.get(l.prefix + "mlp.fc2.weight", {D, dff});
    }
  }
  const NormParams norm_f = norm_params("backbone.norm_f");
  pt.finish();

  auto norm = [&](const NormParams& n, const float* x, float* y) {
    if (c.rms_norm) {
      rmsnorm(x, N, D, n.w, eps, y);
    } else {
      layernorm(x, N, D, n.w, n.b, eps, y);
    }
  };
  // dx (+)= ∂/∂x of the norm given dy; the norm's parameter gradients are added to.
  auto norm_backward = [&](const NormParams& n, const float* x, const float* dy, float* dx, bool accumulate) {
    if (c.rms_norm) {
      rmsnorm_backward(x, dy, N, D, n.w, eps, dx, pt.grad(n.name + ".weight"), accumulate);
    } else {
      layernorm_backward(x, dy, N, D, n.w, eps, dx, pt.grad(n.name + ".weight"), pt.grad(n.name + ".bias"),
                         accumulate);
    }
  };

  // Forward. `residual` and `hidden` follow spec §9.3; each layer keeps what its backward needs.
  const std::vector<int64_t> inputs(input_ids, input_ids + N);
  Tensor hidden = Tensor::empty(DType::F32, {B, L, D});
  Tensor residual = Tensor::empty(DType::F32, {B, L, D});
  parallel_for_work(N, D, [&](int64_t r) { std::copy_n(emb + inputs[size_t(r)] * D, D, hidden.data<float>() + r * D); });
  auto add_into_residual = [&](bool first) {
    float* res = residual.data<float>();
    const float* hid = hidden.data<float>();
    parallel_for_work(N, D, [&](int64_t r) {
      for (int64_t j = r * D; j < (r + 1) * D; ++j) res[j] = first ? hid[j] : hid[j] + res[j];
    });
  };
  for (size_t i = 0; i < layers.size(); ++i) {
    Layer& l = layers[i];
    add_into_residual(i == 0);
    l.res_in = want ? residual.clone() : residual;
    l.normed = Tensor::empty(DType::F32, {B, L, D});
    norm(l.norm, residual.data<float>(), l.normed.data<float>());
    if (l.mamba) {
      Mamba3State state = l.mamba->new_state(B);
      Tensor out = l.mamba->prefill(l.normed, state, want ? &l.zx_raw : nullptr);
      std::copy_n(out.data<float>(), N * D, hidden.data<float>());
    } else {
      attention_train_forward(c.attn, D, l.attn, l.normed.data<float>(), B, L, l.attn_act, hidden.data<float>());
    }
    if (l.fc1) {
      add_into_residual(false);
      l.res_mid = want ? residual.clone() : residual;
      l.normed2 = Tensor::empty(DType::F32, {B, L, D});
      norm(l.norm2, residual.data<float>(), l.normed2.data<float>());
      l.mlp_h.resize(size_t(N * 2 * dff));
      l.mlp_o.resize(size_t(N * dff));
      gated_mlp_train_forward(l.fc1, l.fc2, D, dff, l.normed2.data<float>(), N, l.mlp_h.data(), l.mlp_o.data(),
                              hidden.data<float>());
    }
  }
  add_into_residual(false);
  Tensor normed_f = Tensor::empty(DType::F32, {B, L, D});
  norm(norm_f, residual.data<float>(), normed_f.data<float>());

  // Loss, and the gradient of the lm_head and of norm_f's output. Only labelled positions reach the lm_head: when
  // some are unlabelled their rows are gathered first and their gradient is zero.
  const double scale = 1.0 / double(labelled);
  Tensor dnormed = want ? Tensor::zeros(DType::F32, {B, L, D}) : Tensor();
  float* dhead = want ? pt.grad(c.tie_embeddings ? "backbone.embedding.weight" : "lm_head.weight") : nullptr;
  double loss = 0;
  if (labelled == N) {
    loss = scale * lm_head_cross_entropy(normed_f.data<float>(), N, D, head, V, target_ids, scale,
                                         want ? dnormed.data<float>() : nullptr, dhead);
  } else {
    std::vector<int64_t> rows, targets;
    for (int64_t r = 0; r < N; ++r)
      if (target_ids[r] >= 0) rows.push_back(r), targets.push_back(target_ids[r]);
    std::vector<float> h(static_cast<size_t>(labelled * D)), dh(want ? h.size() : 0);
    for (size_t i = 0; i < rows.size(); ++i)
      std::copy_n(normed_f.data<float>() + rows[i] * D, D, h.data() + int64_t(i) * D);
    loss = scale * lm_head_cross_entropy(h.data(), labelled, D, head, V, targets.data(), scale,
                                         want ? dh.data() : nullptr, dhead);
    if (want)
      for (size_t i = 0; i < rows.size(); ++i)
        std::copy_n(dh.data() + int64_t(i) * D, D, dnormed.data<float>() + rows[i] * D);
  }
  if (!want) return loss;

  // Backward. `g` is the gradient of the residual stream (every hidden added into it shares it).
  Tensor g = Tensor::empty(DType::F32, {B, L, D});
  norm_backward(norm_f, residual.data<float>(), dnormed.data<float>(), g.data<float>(), false);
  for (size_t i = layers.size(); i-- > 0;) {
    Layer& l = layers[i];
    if (l.fc1) {
      gated_mlp_train_backward(l.fc1, l.fc2, D, dff, l.normed2.data<float>(), N, l.mlp_h.data(), l.mlp_o.data(),
                               g.data<float>(), dnormed.data<float>(), pt.grad(l.prefix + "mlp.fc1.weight"),
                               pt.grad(l.prefix + "mlp.fc2.weight"));
      norm_backward(l.norm2, l.res_mid.data<float>(), dnormed.data<float>(), g.data<float>(), true);
    }
    if (l.mamba) {
      Mamba3MixerGradients mg = mamba3_mixer_backward(*l.mamba, l.normed, g, nullptr, &l.zx_raw);
      for (const auto& [name, t] : mg.params) {
        float* dst = pt.grad(l.prefix + "mixer." + name);
        const float* src = t.data<float>();
        const int64_t n = t.numel();  // not in the loop condition: an out-of-line call per element (3 % of a step)
        for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
      }
      std::copy_n(mg.u.data<float>(), N * D, dnormed.data<float>());
    } else {
      const std::string mp = l.prefix + "mixer.";
      const AttentionConfig& a = c.attn;
      AttentionGradViews ag{pt.grad(mp + "in_proj.weight"),
                            pt.grad_if(a.qkv_proj_bias, mp + "in_proj.bias"),
                            pt.grad_if(a.d_conv > 0, mp + "conv1d.weight"),
                            pt.grad_if(a.d_conv > 0, mp + "conv1d.bias"),
                            pt.grad(mp + "out_proj.weight"),
                            pt.grad_if(a.out_proj_bias, mp + "out_proj.bias")};
      attention_train_backward(a, D, l.attn, l.normed.data<float>(), B, L, l.attn_act, g.data<float>(),
                               dnormed.data<float>(), ag);
    }
    norm_backward(l.norm, l.res_in.data<float>(), dnormed.data<float>(), g.data<float>(), true);
  }
  // Embedding: scatter-add of the residual stream's gradient (rows in order: deterministic).
  float* demb = pt.grad("backbone.embedding.weight");
  const float* gd = g.data<float>();
  for (int64_t r = 0; r < N; ++r) {
    float* dst = demb + inputs[size_t(r)] * D;
    for (int64_t j = 0; j < D; ++j) dst[j] += gd[r * D + j];
  }
  return loss;
}

}  // namespace mamba3
