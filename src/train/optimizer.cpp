#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mamba3 {

bool uses_weight_decay(const std::string& name) {
  const size_t dot = name.rfind('.');
  const std::string leaf = dot == std::string::npos ? name : name.substr(dot + 1);
  const std::string module = dot == std::string::npos ? std::string() : name.substr(0, dot);
  const std::string owner = module.substr(module.rfind('.') == std::string::npos ? 0 : module.rfind('.') + 1);
  if (leaf == "dt_bias" || leaf == "D") return false;  // official _no_weight_decay
  if (leaf == "bias" || (leaf.size() > 5 && leaf.ends_with("_bias"))) return false;  // bias, B_bias, C_bias
  if (leaf.starts_with("mimo_")) return false;
  if (owner.find("norm") != std::string::npos) return false;  // norm, norm2, norm_f, B_norm, C_norm
  return true;
}

AdamW::AdamW(const AdamWConfig& config, const TensorMap& params) : config_(config) {
  MAMBA3_CHECK(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1,
               "AdamW: betas must lie in [0, 1), got ({}, {})", config.beta1, config.beta2);
  MAMBA3_CHECK(config.eps > 0 && config.weight_decay >= 0, "AdamW: eps must be > 0 and weight decay ≥ 0 (got {}, {})",
               config.eps, config.weight_decay);
  for (const auto& [name, p] : params) {
    MAMBA3_CHECK(p.dtype() == DType::F32, "AdamW: parameter {} is {}, training needs f32 master weights", name,
                 dtype_name(p.dtype()));
    m_[name] = Tensor::zeros(DType::F32, p.shape());
    v_[name] = Tensor::zeros(DType::F32, p.shape());
  }
}

void AdamW::step(TensorMap& params, const TensorMap& grads, double lr) {
  MAMBA3_CHECK(params.size() == m_.size(), "AdamW: {} parameters, the optimizer was built for {}", params.size(),
               m_.size());
  ++t_;
  const double b1 = config_.beta1, b2 = config_.beta2;
  const double bc1 = 1 - std::pow(b1, double(t_)), bc2 = 1 - std::pow(b2, double(t_));
  for (auto& [name, p] : params) {
    auto mi = m_.find(name);
    MAMBA3_CHECK(mi != m_.end(), "AdamW: parameter {} is unknown to the optimizer", name);
    auto gi = grads.find(name);
    MAMBA3_CHECK(gi != grads.end(), "AdamW: no gradient for parameter {}", name);
    const Tensor& g = gi->second;
    check_shape(g, p.shape(), "gradient of " + name);
    MAMBA3_CHECK(g.dtype() == DType::F32, "AdamW: gradient of {} is {}, expected f32", name, dtype_name(g.dtype()));
    float* w = p.data<float>();
    float* m = mi->second.data<float>();
    float* v = v_.at(name).data<float>();
    const float* gd = g.data<float>();
    const double decay = uses_weight_decay(name) ? lr * config_.weight_decay : 0.0;
    const int64_t n = p.numel();
    for (int64_t i = 0; i < n; ++i) {
      const double gv = gd[i];
      const double mv = b1 * m[i] + (1 - b1) * gv;
      const double vv = b2 * v[i] + (1 - b2) * gv * gv;
      m[i] = float(mv);
      v[i] = float(vv);
      double wv = double(w[i]) * (1 - decay);
      wv -= lr * (mv / bc1) / (std::sqrt(vv / bc2) + config_.eps);
      w[i] = float(wv);
    }
  }
}

NamedTensors AdamW::state_tensors() const {
  NamedTensors out;
  for (const auto& [name, m] : m_) out.emplace_back("exp_avg." + name, m);
  for (const auto& [name, v] : v_) out.emplace_back("exp_avg_sq." + name, v);
  return out;
}

void AdamW::load_state(const std::map<std::string, Tensor>& tensors, int64_t steps, const std::string& source) {
  MAMBA3_CHECK(steps >= 0, "{}: optimizer step count {} is negative", source, steps);
  for (auto* moments : {&m_, &v_}) {
    const std::string prefix = moments == &m_ ? "exp_avg." : "exp_avg_sq.";
    for (auto& [name, dst] : *moments) {
      auto it = tensors.find(prefix + name);
      MAMBA3_CHECK(it != tensors.end(), "{}: optimizer state {} is missing", source, prefix + name);
      check_shape(it->second, dst.shape(), source + ": " + prefix + name);
      dst.copy_from(it->second);
    }
  }
  t_ = steps;
}

double global_grad_norm(const TensorMap& grads) {
  double sum = 0;
  for (const auto& [name, g] : grads) {
    MAMBA3_CHECK(g.dtype() == DType::F32, "gradient of {} is {}, expected f32", name, dtype_name(g.dtype()));
    const float* d = g.data<float>();
    const int64_t n = g.numel();  // hoisted: numel() is an out-of-line call
    for (int64_t i = 0; i < n; ++i) sum += double(d[i]) * d[i];
  }
  return std::sqrt(sum);
}

double clip_grad_norm(TensorMap& grads, double max_norm) {
  const double norm = global_grad_norm(grads);
  MAMBA3_CHECK(std::isfinite(norm), "gradient norm is {} (the loss diverged)", norm);
  if (max_norm <= 0 || norm <= max_norm) return norm;
  const double scale = max_norm / (norm + 1e-6);
  for (auto& [name, g] : grads) {
    float* d = g.data<float>();
    const int64_t n = g.numel();
    for (int64_t i = 0; i < n; ++i) d[i] = float(d[i] * scale);
  }
  return norm;
}

void accumulate_grads(TensorMap& sum, const TensorMap& g, double scale) {
  for (const auto& [name, t] : g) {
    MAMBA3_CHECK(t.dtype() == DType::F32, "gradient of {} is {}, expected f32", name, dtype_name(t.dtype()));
    auto [it, fresh] = sum.try_emplace(name);
    if (fresh) it->second = Tensor::zeros(DType::F32, t.shape());
    check_shape(t, it->second.shape(), "gradient of " + name);
    float* dst = it->second.data<float>();
    const float* src = t.data<float>();
    const int64_t n = t.numel();
    for (int64_t i = 0; i < n; ++i) dst[i] = float(dst[i] + scale * src[i]);
  }
}

double LrSchedule::at(int64_t step) const {
  MAMBA3_CHECK(total > 0 && warmup >= 0, "learning-rate schedule: total {} must be > 0 and warmup {} ≥ 0", total,
               warmup);
  const double lo = peak * min_lr_ratio;
  step = std::max<int64_t>(0, std::min(step, total - 1));
  if (step < warmup) return peak * double(step + 1) / double(warmup);
  if (kind == Kind::Cosine) {
    const double span = double(std::max<int64_t>(1, total - warmup));
    return lo + 0.5 * (peak - lo) * (1 + std::cos(M_PI * double(step - warmup) / span));
  }
  const int64_t decay = std::max<int64_t>(1, std::llround(decay_fraction * double(total)));
  const int64_t start = std::max(warmup, total - decay);
  if (step < start) return peak;
  const double frac = double(step - start + 1) / double(std::max<int64_t>(1, total - start));
  return peak + (lo - peak) * frac;
}

LrSchedule::Kind LrSchedule::parse_kind(const std::string& name) {
  if (name == "cosine") return Kind::Cosine;
  if (name == "wsd") return Kind::WarmupStableDecay;
  fail("unknown learning-rate schedule '{}' (expected cosine or wsd)", name);
}

std::string LrSchedule::kind_name(Kind kind) { return kind == Kind::Cosine ? "cosine" : "wsd"; }

}  // namespace mamba3
