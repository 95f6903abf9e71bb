#include "model/mamba3_mixer.h"

#include <algorithm>

#include "ops/linear.h"
#include "ops/mamba3_reference.h"
#include "ops/mamba3_scan.h"
#include "ops/mamba3_step.h"

namespace mamba3 {

Mamba3State Mamba3State::zeros(const Mamba3Config& c, int64_t batch) {
  const int64_t H = c.nheads();
  return {Tensor::zeros(DType::F32, {batch, H, c.num_angles()}),
          Tensor::zeros(DType::F32, {batch, H, c.headdim, c.d_state}),
          Tensor::zeros(DType::F32, {batch, c.rank(), H, c.d_state}), Tensor::zeros(DType::F32, {batch, H, c.headdim})};
}

Mamba3StateView Mamba3State::view() {
  return {angle.data<float>(), ssm.data<float>(), k.data<float>(), v.data<float>()};
}

struct Mamba3Mixer::Workspace {
  Tensor zx, o;  // (rows, d_in), (rows, d_inner); grown on demand, never shrunk
  Mamba3StepScratch step;

  void reserve(const Mamba3Config& c, int64_t rows) {
    if (!zx.defined() || zx.dim(0) < rows) {
      zx = Tensor::empty(DType::F32, {rows, c.d_in_proj()});
      o = Tensor::empty(DType::F32, {rows, c.d_inner()});
    }
  }
};

Mamba3Mixer::~Mamba3Mixer() = default;
Mamba3Mixer::Mamba3Mixer(Mamba3Mixer&&) noexcept = default;

Mamba3Mixer::Mamba3Mixer(const Mamba3Config& config, const TensorMap& weights, const std::string& prefix,
                         const std::string& source, std::set<std::string>* used)
    : config_(config), ws_(std::make_unique<Workspace>()) {
  config_.validate(source + ": " + (prefix.empty() ? std::string("Mamba3 layer") : prefix));
  const Mamba3Config& c = config_;
  const int64_t H = c.nheads(), R = c.rank(), N = c.d_state, P = c.headdim;
  struct Spec {
    const char* name;
    Shape shape;
    bool present;
  };
  const Spec specs[] = {
      {"dt_bias", {H}, true},
      {"B_bias", {H, R, N}, true},
      {"C_bias", {H, R, N}, true},
      {"mimo_x", {H, R, P}, c.is_mimo},
      {"mimo_z", {H, R, P}, c.is_mimo},
      {"mimo_o", {H, R, P}, c.is_mimo},
      {"D", {H}, true},
      {"in_proj.weight", {c.d_in_proj(), c.d_model}, true},
      {"B_norm.weight", {N}, true},
      {"C_norm.weight", {N}, true},
      {"norm.weight", {c.d_inner()}, c.is_outproj_norm},
      {"out_proj.weight", {c.d_model, c.d_inner()}, true},
  };
  for (const Spec& s : specs) {
    const std::string full = prefix + s.name;
    auto it = weights.find(full);
    if (!s.present) {
      MAMBA3_CHECK(it == weights.end(), "{}: unexpected tensor '{}' for {}", source, full, c.describe());
      continue;
    }
    MAMBA3_CHECK(it != weights.end(), "{}: missing parameter '{}' (needed by {})", source, full, c.describe());
    const Tensor& t = it->second;
    MAMBA3_CHECK(dtype_is_float(t.dtype()), "{}: tensor '{}' has dtype {}, expected a float type", source, full,
                 dtype_name(t.dtype()));
    MAMBA3_CHECK(t.shape() == s.shape, "{}: tensor '{}': expected shape {}, got {}", source, full, shape_str(s.shape),
                 shape_str(t.shape()));
    params_[s.name] = t.to(DType::F32);
    if (used) used->insert(full);
  }
  auto get = [&](const char* name) -> const float* {
    auto it = params_.find(name);
    return it == params_.end() ? nullptr : it->second.data<float>();
  };
  head_ = {get("dt_bias"), get("B_bias"), get("C_bias"), get("mimo_x"), get("mimo_z"),
           get("mimo_o"),  get("D"),      get("norm.weight")};
  in_proj_ = get("in_proj.weight"), out_proj_ = get("out_proj.weight");
  B_norm_ = get("B_norm.weight"), C_norm_ = get("C_norm.weight");
}

const Tensor& Mamba3Mixer::param(const std::string& name) const {
  auto it = params_.find(name);
  if (it == params_.end()) fail("Mamba3 layer has no parameter '{}'", name);
  return it->second;
}

size_t Mamba3Mixer::parameter_count() const {
  size_t n = 0;
  for (const auto& [name, t] : params_) n += size_t(t.numel());
  return n;
}


void Mamba3Mixer::check_io(const Tensor& u, const Mamba3State& state, int64_t rank, const char* what) const {
  const Mamba3Config& c = config_;
  MAMBA3_CHECK(u.dtype() == DType::F32, "Mamba3 {}: input must be F32, got {}", what, dtype_name(u.dtype()));
  MAMBA3_CHECK(u.ndim() == rank && u.dim(-1) == c.d_model, "Mamba3 {}: input shape {} should be ({}d_model={})", what,
               shape_str(u.shape()), rank == 3 ? "batch, seqlen, " : "batch, ", c.d_model);
  check_state(state, u.dim(0), what);
}

void Mamba3Mixer::check_state(const Mamba3State& state, int64_t B, const char* what) const {
  const Mamba3Config& c = config_;
  const int64_t H = c.nheads();
  // Shapes are compared without building a Shape; messages are only formatted on failure.
  if (!has_shape(state.angle, {B, H, c.num_angles()}))
    check_shape(state.angle, {B, H, c.num_angles()}, fmt::format("Mamba3 {}: angle state", what));
  if (!has_shape(state.ssm, {B, H, c.headdim, c.d_state}))
    check_shape(state.ssm, {B, H, c.headdim, c.d_state}, fmt::format("Mamba3 {}: ssm state", what));
  if (!has_shape(state.k, {B, c.rank(), H, c.d_state}))
    check_shape(state.k, {B, c.rank(), H, c.d_state}, fmt::format("Mamba3 {}: k state", what));
  if (!has_shape(state.v, {B, H, c.headdim}))
    check_shape(state.v, {B, H, c.headdim}, fmt::format("Mamba3 {}: v state", what));
  for (const Tensor* t : {&state.angle, &state.ssm, &state.k, &state.v})
    MAMBA3_CHECK(t->dtype() == DType::F32, "Mamba3 {}: states must be F32", what);
}

Tensor Mamba3Mixer::prefill(const Tensor& u, Mamba3State& state, Tensor* zx_raw) const {
  check_io(u, state, 3, "prefill");
  const Mamba3Config& c = config_;
  const int64_t B = u.dim(0), L = u.dim(1), rows = B * L;
  Tensor out = Tensor::empty(DType::F32, {B, L, c.d_model});
  if (L == 0) return out;
  ws_->reserve(c, rows);
  float* zx = ws_->zx.data<float>();
  float* o = ws_->o.data<float>();
  linear(u.data<float>(), rows, c.d_model, param("in_proj.weight").data<float>(), c.d_in_proj(), zx);  // (B·L, d_in)
  if (zx_raw) {
    if (!has_shape(*zx_raw, {rows, c.d_in_proj()}) || zx_raw->dtype() != DType::F32)
      *zx_raw = Tensor::empty(DType::F32, {rows, c.d_in_proj()});
    std::copy_n(zx, rows * c.d_in_proj(), zx_raw->data<float>());
  }
  mamba3_normalize_bc(c, param("B_norm.weight").data<float>(), param("C_norm.weight").data<float>(), rows, zx);
  mamba3_scan(c, head_params(), B, L, zx, state.view(), o);                                            // (B·L, d_inner)
  linear(o, rows, c.d_inner(), param("out_proj.weight").data<float>(), c.d_model, out.data<float>());  // (B·L, D)
  return out;
}

void Mamba3Mixer::step(const Tensor& u, Mamba3State& state, Tensor& out) const {
  check_io(u, state, 2, "step");
  if (!has_shape(out, {u.dim(0), config_.d_model}) || out.dtype() != DType::F32)
    check_shape(out, {u.dim(0), config_.d_model}, "Mamba3 step: output (F32)");
  step(u.data<float>(), u.dim(0), state, out.data<float>());
}

void Mamba3Mixer::step(const float* u, int64_t B, Mamba3State& state, float* out) const {
  const Mamba3Config& c = config_;
  check_state(state, B, "step");
  const Mamba3HeadParams p = head_params();
  ws_->reserve(c, B);
  float* zx = ws_->zx.data<float>();
  float* o = ws_->o.data<float>();
  linear(u, B, c.d_model, in_proj_, c.d_in_proj(), zx);
  mamba3_normalize_bc(c, B_norm_, C_norm_, B, zx);
  mamba3_step(c, p, B, zx, state.view(), o, ws_->step);
  linear(o, B, c.d_inner(), out_proj_, c.d_model, out);
}

Tensor Mamba3Mixer::step(const Tensor& u, Mamba3State& state) const {
  check_io(u, state, 2, "step");
  Tensor out = Tensor::empty(DType::F32, {u.dim(0), config_.d_model});
  step(u, state, out);
  return out;
}

Tensor Mamba3Mixer::prefill_reference(const Tensor& u, Mamba3State& state) const {
  check_io(u, state, 3, "prefill_reference");
  const int64_t B = u.dim(0), L = u.dim(1);
  Tensor out = Tensor::empty(DType::F32, {B, L, config_.d_model});
  Mamba3ReferenceWeights w{head_params(), param("in_proj.weight").data<float>(),
                           param("out_proj.weight").data<float>(), param("B_norm.weight").data<float>(),
                           param("C_norm.weight").data<float>()};
  mamba3_reference(config_, w, B, L, u.data<float>(), state.view(), out.data<float>());
  return out;
}

Tensor Mamba3Mixer::step_reference(const Tensor& u, Mamba3State& state) const {
  check_io(u, state, 2, "step_reference");
  Tensor out = prefill_reference(u.reshape({u.dim(0), 1, u.dim(1)}), state);
  return out.reshape({u.dim(0), config_.d_model});
}

}  // namespace mamba3
