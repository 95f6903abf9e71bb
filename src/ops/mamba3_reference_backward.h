#pragma once
// The plain reference backward of the whole Mamba-3 mixer (in_proj … out_proj), in float64: reverse mode through the
// per-token recurrence of spec §4.1. The forward is run once storing, per token, the raw in_proj row, the angles and
// the state h_t; the backward then walks t = L−1 … 0, recomputing each token's preprocessing from those and carrying
//   dH        the gradient of h_t (P×N per head), multiplied by α_t on the way back,
//   dΦ        the gradient of the cumulative angle φ_t (reverse cumulative sum, spec §12 step 5),
//   dk', dv'  the gradients of the previous token's k and v through its β term.
// Slow by design (a few float64 passes over B·L·H·P·N); the oracle for the fast backward and the golden gradients.
//
// Loss convention: gradients of sum(out ⊙ dout). Initial states are optional (zero when absent); their gradients
// are always returned. Gradient 0 for the A logit where the A_floor clamp binds (A = −A_floor).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "ops/mamba3_config.h"

namespace mamba3 {

// Official parameter names of a mixer with config `c`, in state_dict order, with their shapes (spec §1.3).
std::vector<std::pair<std::string, Shape>> mamba3_parameter_shapes(const Mamba3Config& c);

// One mixer layer's parameters (or their gradients) in float64, by official name; only those the config has.
struct Mamba3Params64 {
  TensorMap tensors;  // F64

  static Mamba3Params64 zeros(const Mamba3Config& c);
  // Copies `prefix + name` for every parameter of `c` from `weights` (any float dtype); throws if one is missing or
  // has the wrong shape.
  static Mamba3Params64 from(const Mamba3Config& c, const TensorMap& weights, const std::string& prefix = "");
  // Null when the config has no such parameter.
  double* data(const std::string& name);
  const double* data(const std::string& name) const;
};

// A decode state (spec §4.2) in float64: angle (B, H, S), ssm (B, H, P, N), k (B, R, H, N), v (B, H, P).
struct Mamba3State64 {
  Tensor angle, ssm, k, v;  // F64
  static Mamba3State64 zeros(const Mamba3Config& c, int64_t batch);
};

// Forward in float64: u (B, L, d_model) → out (B, L, d_model), F64. Starts from `init` (zeros when null); when
// `final_state` is given it receives the end state (angles not wrapped).
Tensor mamba3_reference_forward64(const Mamba3Config& c, const Mamba3Params64& p, const Tensor& u,
                                  const Mamba3State64* init = nullptr, Mamba3State64* final_state = nullptr);

struct Mamba3Gradients64 {
  Mamba3Params64 params;  // d loss / d parameter, by official name
  Tensor u;               // (B, L, d_model)
  Mamba3State64 init;     // d loss / d initial state
  Tensor out;             // the forward output (B, L, d_model), a by-product
};

// Gradients of sum(out ⊙ dout) with out = mixer(u) from `init` (zeros when null). u, dout: (B, L, d_model), any
// float dtype; L ≥ 1.
Mamba3Gradients64 mamba3_reference_backward(const Mamba3Config& c, const Mamba3Params64& p, const Tensor& u,
                                            const Tensor& dout, const Mamba3State64* init = nullptr);

}  // namespace mamba3
