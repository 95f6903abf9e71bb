#pragma once
// The Mamba-3 mixer layer (mamba_ssm.modules.mamba3.Mamba3): parameters under their official names, the chunked
// prefill and the O(1) decode step on CPU (fast paths in src/ops), and the float64 reference beside them.
#include <memory>
#include <set>
#include <string>

#include "core/tensor.h"
#include "ops/mamba3_config.h"
#include "ops/mamba3_common.h"

namespace mamba3 {

// The decode cache of one layer for a batch of sequences (spec §4.2), all f32:
// angle (B, H, S), ssm (B, H, P, N), k (B, R, H, N), v (B, H, P). Zero for new sequences.
struct Mamba3State {
  Tensor angle, ssm, k, v;

  static Mamba3State zeros(const Mamba3Config& c, int64_t batch);
  int64_t batch() const { return ssm.dim(0); }
  size_t nbytes() const { return angle.nbytes() + ssm.nbytes() + k.nbytes() + v.nbytes(); }
  Mamba3State clone() const { return {angle.clone(), ssm.clone(), k.clone(), v.clone()}; }
  // Rows [b0, b1) as views sharing this state's storage (prefill one sequence of a batch in place).
  Mamba3State rows(int64_t b0, int64_t b1) const {
    return {angle.slice(b0, b1), ssm.slice(b0, b1), k.slice(b0, b1), v.slice(b0, b1)};
  }
  Mamba3StateView view();
};

class Mamba3Mixer {
 public:
  // Loads the parameters `prefix + name` from `weights` (any float dtype; converted to f32) and checks every shape.
  // `source` names the checkpoint in errors. Names used are added to `used` when given (for strict loading).
  Mamba3Mixer(const Mamba3Config& config, const TensorMap& weights, const std::string& prefix = "",
              const std::string& source = "weights", std::set<std::string>* used = nullptr);
  ~Mamba3Mixer();
  Mamba3Mixer(Mamba3Mixer&&) noexcept;

  const Mamba3Config& config() const { return config_; }
  Mamba3State new_state(int64_t batch) const { return Mamba3State::zeros(config_, batch); }
  size_t parameter_count() const;

  // u (B, L, d_model) f32 → (B, L, d_model). Starts from `state` (zeros or carried over) and leaves the final
  // decode state there. Any L ≥ 1, any chunk alignment. zx_raw (optional): receives in_proj's output (B·L, d_in)
  // before the B/C norms, for a training backward (mamba3_mixer_backward) that would otherwise recompute it.
  Tensor prefill(const Tensor& u, Mamba3State& state, Tensor* zx_raw = nullptr) const;
  // One decode token: u (B, d_model) → out (B, d_model), preallocated. After the first call with a given batch
  // size it allocates nothing.
  void step(const Tensor& u, Mamba3State& state, Tensor& out) const;
  Tensor step(const Tensor& u, Mamba3State& state) const;
  // The same on raw rows: u (batch, d_model), out (batch, d_model); batch must match the state. For the model's
  // decode loop, which keeps its activations in reused buffers.
  void step(const float* u, int64_t batch, Mamba3State& state, float* out) const;

  // The float64 reference (straight loops, per-token recurrence) with the same interface.
  Tensor prefill_reference(const Tensor& u, Mamba3State& state) const;
  Tensor step_reference(const Tensor& u, Mamba3State& state) const;

  // Parameters by official name (relative to the layer), f32.
  const Tensor& param(const std::string& name) const;

 private:
  struct Workspace;
  void check_io(const Tensor& u, const Mamba3State& state, int64_t rank, const char* what) const;
  void check_state(const Mamba3State& state, int64_t batch, const char* what) const;  // allocation-free when valid
  Mamba3HeadParams head_params() const { return head_; }

  Mamba3Config config_;
  TensorMap params_;
  // Raw views of params_ (stable: tensor buffers never move), so the hot paths do no lookups.
  Mamba3HeadParams head_{};
  const float *in_proj_ = nullptr, *out_proj_ = nullptr, *B_norm_ = nullptr, *C_norm_ = nullptr;
  std::unique_ptr<Workspace> ws_;  // scratch reused across calls (the layer is not safe for concurrent calls)
};

}  // namespace mamba3
