#include "model/mamba3_mixer_backward.h"

#include "core/error.h"
#include "ops/mamba3_reference_backward.h"
#include "ops/mamba3_scan_backward.h"

namespace mamba3 {

Mamba3MixerGradients mamba3_mixer_backward(const Mamba3Mixer& mixer, const Tensor& u, const Tensor& dout,
                                           const Mamba3State* init, const Tensor* zx_raw) {
  const Mamba3Config& c = mixer.config();
  for (const Tensor* t : {&u, &dout})
    MAMBA3_CHECK(t->dtype() == DType::F32 && t->ndim() == 3 && t->dim(2) == c.d_model && t->dim(1) >= 1,
                 "Mamba3 backward: u and dout must be F32 (batch, L ≥ 1, {}), got {} {}", c.d_model,
                 dtype_name(t->dtype()), shape_str(t->shape()));
  MAMBA3_CHECK(u.shape() == dout.shape(), "Mamba3 backward: u {} and dout {} differ", shape_str(u.shape()),
               shape_str(dout.shape()));
  const int64_t B = u.dim(0), L = u.dim(1);
  MAMBA3_CHECK(!zx_raw || (zx_raw->dtype() == DType::F32 && has_shape(*zx_raw, {B * L, c.d_in_proj()})),
               "Mamba3 backward: the kept in_proj output must be F32 ({}, {}), got {} {}", B * L, c.d_in_proj(),
               zx_raw ? dtype_name(zx_raw->dtype()) : "", zx_raw ? shape_str(zx_raw->shape()) : "");
  Mamba3MixerGradients g;
  for (const auto& [name, shape] : mamba3_parameter_shapes(c)) g.params[name] = Tensor::zeros(DType::F32, shape);
  g.u = Tensor::empty(DType::F32, u.shape());
  g.init = mixer.new_state(B);
  auto grad = [&](const char* name) -> float* {
    auto it = g.params.find(name);
    return it == g.params.end() ? nullptr : it->second.data<float>();
  };
  Mamba3GradViews views{grad("dt_bias"),        grad("B_bias"),        grad("C_bias"),        grad("mimo_x"),
                        grad("mimo_z"),         grad("mimo_o"),        grad("D"),             grad("in_proj.weight"),
                        grad("B_norm.weight"),  grad("C_norm.weight"), grad("norm.weight"),   grad("out_proj.weight")};
  auto ptr = [&](const char* name) -> const float* {
    return c.is_outproj_norm || std::string(name) != "norm.weight" ? mixer.param(name).data<float>() : nullptr;
  };
  auto opt = [&](const char* name) -> const float* { return c.is_mimo ? mixer.param(name).data<float>() : nullptr; };
  Mamba3ReferenceWeights w{{ptr("dt_bias"), ptr("B_bias"), ptr("C_bias"), opt("mimo_x"), opt("mimo_z"), opt("mimo_o"),
                            ptr("D"), ptr("norm.weight")},
                           ptr("in_proj.weight"), ptr("out_proj.weight"), ptr("B_norm.weight"), ptr("C_norm.weight")};
  Mamba3State init_copy;
  Mamba3StateView init_view{};
  if (init) {
    init_copy = init->clone();  // the kernels take mutable views; never write the caller's state
    init_view = init_copy.view();
  }
  Mamba3StateView dinit = g.init.view();
  mamba3_backward(c, w, B, L, u.data<float>(), dout.data<float>(), init ? &init_view : nullptr, views,
                  g.u.data<float>(), &dinit, zx_raw ? zx_raw->data<float>() : nullptr);
  return g;
}

}  // namespace mamba3
