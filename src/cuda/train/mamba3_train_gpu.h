#pragma once
// The Mamba-3 mixer's training forward and backward on the GPU (f32 inside; the projections through TrainGemm in
// its precision). A port of the CPU's chunked backward (src/ops/mamba3_scan_backward.h, whose comment gives the
// math) with one thread block per (sequence, head) walking GPU chunks of T tokens (T·R ≤ 64, independent of
// config.chunk_size: the result is the same up to rounding). Every sequence starts from the zero state.
// Deterministic: fixed-order reductions only (no float atomics), so the same inputs give bit-identical gradients.
// Scratch (grow-only, kept between calls) is O(B·L·(d_in + d_inner + H·R·(2N + P) + H·S)) floats for the backward:
// the per-head gradients of the normalised B and C, (B·L, H, R, N) each, are the largest part.
#include <cstdint>

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/train_gemm.h"
#include "ops/mamba3_config.h"

namespace mamba3::cuda {

// Device pointers (f32) of one mixer's parameters, official names (spec); null where the config has none.
struct Mamba3TrainWeights {
  const float *in_proj, *out_proj, *dt_bias, *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *D, *B_norm, *C_norm, *norm;
};
// Gradient destinations, same shapes; ACCUMULATED (+=). Null where the config has none (or where not wanted).
struct Mamba3TrainGrads {
  float *in_proj, *out_proj, *dt_bias, *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *D, *B_norm, *C_norm, *norm;
};

class Mamba3TrainGpu {
 public:
  // Throws mamba3::Error for configs the kernels do not handle (MIMO rank > 4, more than 256 rotary angles).
  explicit Mamba3TrainGpu(const Mamba3Config& c);
  const Mamba3Config& config() const { return c_; }

  // out (B·L, d_model) f32 = mixer(u), u (B·L, d_model) f32, every sequence from the zero state (training).
  void forward(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t B, int64_t L,
               const float* u, float* out);
  // Gradients of sum(out ⊙ dout): du (B·L, d_model) overwritten; parameter grads accumulated. Recomputes what it
  // needs from u (nothing is kept from forward). Deterministic: no float atomics; same inputs → bit-identical grads.
  void backward(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, const Mamba3TrainGrads& g,
                int64_t B, int64_t L, const float* u, const float* dout, float* du);

  // The GPU chunk length (tokens) used for sequences of length L: the largest T ≤ 64/R (and ≤ L) whose shared-memory
  // tiles fit the device. Needs a device.
  int chunk_length(int64_t L, bool backward);

  // Chunk path of the bf16 mode: true runs the chunk kernels' products on tensor cores (mma.sync, operands rounded to
  // bf16, f32 accumulation, states kept f32), false the exact f32 products. Only used when the TrainGemm runs in
  // Precision::BF16 (the f32 mode is always exact). Default from MAMBA3_TRAIN_CHUNK, read once per process: "tc" or
  // "f32" (unset: f32); any other value throws.
  void set_chunk_tensor_cores(bool on) { chunk_tc_ = on; }
  bool chunk_tensor_cores() const { return chunk_tc_; }

 private:
  // in_proj, B/C normalisation, per-token scalars and angles (shared by forward and backward).
  void prepare(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t B, int64_t L,
               const float* u);

  Mamba3Config c_;
  int max_smem_ = 0;  // opt-in shared memory per block of the device (queried on first use)
  bool chunk_tc_ = false;  // tensor-core chunk products in the bf16 mode (set_chunk_tensor_cores)
  // Forward: zx_raw (M, d_in), zx (M, d_in) B/C normalised, scalars 5 × (B·H, L), cs/sn (B·H, L, S), o (M, d_inner).
  DeviceBuffer zx_raw_, zx_, scalars_, cs_, sn_, o_;
  // Backward: dO (M, d_inner), dzx (M, d_in), dy (B·H, L, R, P), Hc (B·H, chunks, P, N), dBn/dCn (M, H, R, N),
  // dphi (B·H, L, S), dadt/dgam/dscale 3 × (B·H, L), dth (M, H, S), per-row/per-(b, h) partials, colsum scratch.
  DeviceBuffer dO_, dzx_, dy_, Hc_, dBn_, dCn_, dphi_, sgrad_, dth_, part_, colsum_;
};

}  // namespace mamba3::cuda
