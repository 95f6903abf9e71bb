#pragma once
// AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's torch.optim.AdamW update), gradient clipping
// by global norm, gradient accumulation helpers and the learning-rate schedules of `mamba3 train`.
//
// Every parameter and gradient is f32 (the CPU master weights). The optimizer keeps two f32 moments per parameter,
// named "exp_avg.<param>" and "exp_avg_sq.<param>" in its saved state.
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "io/safetensors.h"

namespace mamba3 {

// Whether weight decay applies to a parameter, by its official state_dict name. Decayed: the matrices of the
// Linear layers (in_proj, out_proj, fc1, fc2, lm_head), conv1d weights and the embedding (the lm_head's tied twin).
// Not decayed: dt_bias and D (the parameters the official code flags `_no_weight_decay`, spec §1.3), and — the
// common practice for LMs — every bias (Linear biases, B_bias, C_bias), every norm weight and bias (norm, norm2,
// norm_f, B_norm, C_norm, the mixer's output norm), and the per-head MIMO scales mimo_x/mimo_z/mimo_o (small
// (H, R, P) gains initialised to 1/R or 1, not projections). Names outside the model follow the same suffix rules.
bool uses_weight_decay(const std::string& name);

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // decoupled: p ← p − lr·wd·p, for parameters where uses_weight_decay(name)
};

class AdamW {
 public:
  // Moments start at zero, one pair per tensor of `params` (which must all be f32).
  AdamW(const AdamWConfig& config, const TensorMap& params);

  // One update of every parameter from its gradient (same names and shapes; a missing gradient is an error):
  //   p ← p − lr·wd·p;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
  //   p ← p − lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε)        (t = steps() after the increment)
  void step(TensorMap& params, const TensorMap& grads, double lr);

  int64_t steps() const { return t_; }
  const AdamWConfig& config() const { return config_; }

  // The moments as named tensors (shared storage, not copies), for a checkpoint.
  NamedTensors state_tensors() const;
  // Restores moments written by state_tensors() and the step count; every parameter's moments must be present
  // with its shape. `source` names the file in errors.
  void load_state(const std::map<std::string, Tensor>& tensors, int64_t steps, const std::string& source);

 private:
  AdamWConfig config_;
  TensorMap m_, v_;
  int64_t t_ = 0;
};

// √(Σ g²) over every gradient tensor, in float64.
double global_grad_norm(const TensorMap& grads);
// Scales every gradient by max_norm / (norm + 1e-6) when the global norm exceeds max_norm (torch's
// clip_grad_norm_); max_norm ≤ 0 disables clipping. Returns the norm before clipping.
double clip_grad_norm(TensorMap& grads, double max_norm);

// Gradient accumulation: sum[name] += scale · g[name], allocating zeroed f32 tensors on first use.
void accumulate_grads(TensorMap& sum, const TensorMap& g, double scale);

// Learning rate at optimizer step `step` (0-based) of `total`:
//   warmup:  peak · (step+1) / warmup                                        for step < warmup
//   cosine:  min + ½(peak − min)(1 + cos(π · (step − warmup) / (total − warmup)))
//   wsd:     peak until the last decay_fraction·total steps, then linear to min, reaching min at step total−1
// with min = peak · min_lr_ratio. Steps past total keep the final value.
struct LrSchedule {
  enum class Kind { Cosine, WarmupStableDecay };
  Kind kind = Kind::Cosine;
  double peak = 1e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup = 0;
  int64_t total = 1;
  double decay_fraction = 0.2;  // wsd only

  double at(int64_t step) const;
  // "cosine" or "wsd"; anything else throws.
  static Kind parse_kind(const std::string& name);
  static std::string kind_name(Kind kind);
};

}  // namespace mamba3
