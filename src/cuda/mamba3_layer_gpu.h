#pragma once
// One Mamba-3 mixer layer on the GPU: in_proj (cuBLAS) → the fused recurrent kernel → out_proj (cuBLAS).
// Parameters are checked exactly as on the CPU (they are loaded through Mamba3Mixer first).
#include <functional>
#include <memory>
#include <set>
#include <string>

#include "core/tensor.h"
#include "cuda/gemv_small_m.h"
#include "cuda/gpu_matrix.h"
#include "cuda/mamba3_gpu.h"
#include "ops/mamba3_config.h"

namespace mamba3::cuda {

// Per-row sizes (floats) of the four state tensors and their sum.
struct Mamba3StateSizes {
  int64_t angle, ssm, k, v;
  explicit Mamba3StateSizes(const Mamba3Config& c)
      : angle(c.nheads() * c.num_angles()),
        ssm(c.nheads() * c.headdim * c.d_state),
        k(c.rank() * c.nheads() * c.d_state),
        v(c.nheads() * c.headdim) {}
  int64_t total() const { return angle + ssm + k + v; }
};

// The state of `batch` rows in one allocation: [angle | ssm | k | v | arrivals | decode stage | lazy | ring], each
// (batch, …); the decode stage is the staged path's one-token scratch (kept with the state so a captured decode graph
// stays valid); lazy and ring exist with deferred state writes (write_every 2 or 4; Mamba3GpuState::write_every).
struct GpuMamba3State {
  DeviceBuffer buffer;
  int64_t batch = 0, heads = 0;
  Mamba3StateSizes sizes;
  Mamba3Config config;
  bool ssm_bf16 = false;  // the bf16-state mode: the ssm state stored as bf16 (views carry ssm16, ssm null)
  int write_every = 1;    // deferred state writes: every head's ssm written every write_every-th decode step

  GpuMamba3State(const Mamba3Config& c, int64_t batch, bool ssm_bf16 = false, int write_every = 1);  // zeroed
  // Views of rows [row, batch); `active` null (all rows active): set it on the view to skip rows in decode.
  Mamba3GpuState rows_from(int64_t row) const;
  // The ssm state of one row (f32 or bf16) and its bytes: for copies and resets of whole rows.
  void* ssm_row(int64_t row) const;
  size_t ssm_row_bytes() const { return size_t(sizes.ssm) * (ssm_bf16 ? 2 : 4); }
  // The deferred writes' words and ring of one row, and their bytes (0 when write_every is 1): copies and resets.
  void* lazy_row(int64_t row) const;
  size_t lazy_row_bytes() const;
  void* ring_row(int64_t row) const;
  size_t ring_row_bytes() const;

 private:
  int64_t ssm_section_floats() const;
  int64_t lazy_offset() const;  // floats before the deferred writes' words
};

class GpuMamba3Layer {
 public:
  GpuMamba3Layer(const Mamba3Config& config, const TensorMap& weights, const std::string& prefix,
                 const std::string& source, std::set<std::string>* used, Precision precision);

  const Mamba3Config& config() const { return config_; }
  // Kernels of the recurrence. Default (until set_path): chunked — bf16 prefills on the chunked tensor-core kernel,
  // f32 prefills on the staged kernels, decode steps on the one-kernel head decode (mamba3_decode_gpu.h) for SISO and
  // MIMO at every batch (MAMBA3_FUSED_DECODE_MAX=n runs decode steps of at most n (sequence, head) pairs on the fused
  // recurrent kernel instead; default 0). MAMBA3_PREFILL_PATH (read once per process: chunked | staged | fused; unset or empty:
  // chunked) replaces the default path. Chunked became the default on 2026-12-01 after every CUDA test passed with it.
  void set_path(Mamba3GpuPath path) { path_ = path, auto_path_ = false; }
  Mamba3GpuPath path() const { return path_; }
  // Bound on the staged prefill's scratch (k, q, φ, α/β/γ per token); a longer prefill runs in segments.
  // Default 1 GiB, or MAMBA3_PREFILL_STAGE_MB (read once per process).
  void set_prefill_stage_bytes(size_t bytes) { prefill_stage_bytes_ = bytes; }
  // Layers that never run at the same time (one model's, on one stream) can share one prefill scratch; the model
  // passes the same buffer to each (the scratch is dead between layer calls). Default: the layer's own.
  void share_prefill_stage(std::shared_ptr<DeviceBuffer> buffer) { prefill_stage_ = std::move(buffer); }
  // The f32 copy of a bf16 state (GpuMamba3State with ssm_bf16) for the kernels that read f32 only (prefill, and
  // decode where the head kernel does not reach); shareable the same way.
  void share_state_scratch(std::shared_ptr<DeviceBuffer> buffer) { state_scratch_ = std::move(buffer); }
  // Whether decode steps of a bf16 state run without that copy (the head decode kernel reaches this layer's shape).
  bool decodes_bf16_state() const;
  // Whether decode steps of this layer can defer their state writes (mamba3_decode_defers_writes: SISO on the head
  // kernel's FMA rows under the current decode choice), so that a state made for it may have write_every > 1.
  bool defers_state_writes() const;
  // Folds the pending tokens of rows [0, batch) of a deferring state into its ssm, k and v (mamba3_settle_gpu); a
  // no-op at write_every 1. forward() does it before any call that does not defer.
  void settle(const Context& ctx, const Mamba3GpuState& state, int64_t batch) const;
  size_t parameter_bytes() const;
  const GpuMatrix& in_proj() const { return in_proj_; }
  const GpuMatrix& out_proj() const { return out_proj_; }
  // Scratch the caller provides for `rows` tokens: zx (rows·d_in_proj f32) and o (rows·d_inner activations).
  size_t zx_bytes(int64_t rows) const { return size_t(rows * config_.d_in_proj()) * 4; }
  size_t o_bytes(int64_t rows) const { return size_t(rows * config_.d_inner()) * activation_size(precision_); }

  // x: (batch·L, d_model) activations, `batch` sequences of L tokens continuing `state` (rows from its first);
  // out: (batch·L, d_model) f32. A decode step (L = 1) skips the rows that state.active marks inactive (their state
  // is unchanged; their rows of o and out are unspecified).
  // edge, when set, is called as the two products are queued: AfterInProj once in_proj is, BeforeOutProj before
  // out_proj is (where a decode step requests the next weights into L2: cuda_model.cpp).
  enum class Edge { AfterInProj, BeforeOutProj };
  // A decode step with the RMSNorms folded into the products (gpu_matrix.h: one row, or 65–128 through the stream
  // GEMM's wide class): `in` set, x is bf16(v ⊙ g) and in_proj scales by the partials' rstd; `out` set, out_proj adds
  // its result to the residual and writes the next norm's input and partials there instead of `out`. The model checks
  // the shapes (CudaModel).
  struct FoldedNorms {
    const GemvRowScale* in = nullptr;
    const GemvResidualNorm* out = nullptr;
  };
  void forward(const Context& ctx, const void* x, int64_t batch, int64_t L, Mamba3GpuState state, float* zx, void* o,
               float* out, const std::function<void(Edge)>& edge = nullptr, const FoldedNorms* folded = nullptr) const;

 private:
  Mamba3Config config_;
  Precision precision_;
  GpuMatrix in_proj_, out_proj_;
  DeviceBuffer dt_bias_, B_bias_, C_bias_, B_norm_, C_norm_, D_, mimo_x_, mimo_z_, mimo_o_, norm_;
  Mamba3GpuParams params_{};
  Mamba3GpuPath path_ = Mamba3GpuPath::Chunked;
  bool auto_path_ = true;
  int64_t fused_decode_max() const;  // (sequence, head) pairs up to which an automatic decode step runs fused
  size_t prefill_stage_bytes_;
  std::shared_ptr<DeviceBuffer> prefill_stage_;  // grow-only; prefill only (decode uses the state's stage)
  std::shared_ptr<DeviceBuffer> state_scratch_;  // grow-only; bf16 states only
};

}  // namespace mamba3::cuda
