#pragma once
// The Mamba-3 mixer's recurrent core on the GPU (spec §2–§4, §6, §7): from the in_proj output to the gated output
// that enters out_proj, for a prefill of L tokens or a decode step (L = 1), continuing from and updating the
// decode state. One fused kernel: B/C RMSNorm, Δ/A/λ, angle update, bias + rotary, the exponential-trapezoidal
// state update, y = h·q + D·v, the output norm, gate and MIMO contraction.
//
// Form: recurrent (the definition of spec §4.1) with each head's P×N state held in registers across the tokens;
// one thread block per (sequence, head). Decode reads and writes every state once; prefill is sequential in time
// per head (the chunked tensor-core form of spec §5.3 is the planned replacement for long prompts).
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/cuda_context.h"
#include "ops/mamba3_config.h"

namespace mamba3::cuda {

// Device pointers to one layer's f32 parameters (null where the configuration has none).
struct Mamba3GpuParams {
  const float* dt_bias;  // (H)
  const float* B_bias;   // (H, R, N)
  const float* C_bias;   // (H, R, N)
  const float* B_norm;   // (N)
  const float* C_norm;   // (N)
  const float* D;        // (H)
  const float* mimo_x;   // (H, R, P) or null (SISO)
  const float* mimo_z;   // (H, R, P) or null
  const float* mimo_o;   // (H, R, P) or null
  const float* norm;     // (d_inner) or null (is_outproj_norm false)
};

// Decode state of `batch` consecutive rows, f32, layouts of spec §4.2: angle (b, H, S), ssm (b, H, P, N),
// k (b, R, H, N), v (b, H, P).
// `arrivals` (b, H) int32, zero between calls: the decode kernel's per-head counter of finished channel chunks (the
// last chunk of a head writes its angle, k and v, after every chunk has read the old ones).
struct Mamba3GpuState {
  float* angle;
  float* ssm;
  float* k;
  float* v;
  int* arrivals;
};

// Largest supported sizes of the fused kernel (checked by mamba3_gpu_supported).
constexpr int64_t kMamba3GpuMaxRank = 4;
constexpr int64_t kMamba3GpuMaxState = 256;
constexpr int64_t kMamba3GpuMaxHeaddim = 128;  // 16 warps of 8 channels

// Empty when the kernel handles the configuration, else the reason (names the field).
std::string mamba3_gpu_supported(const Mamba3Config& c);

// zx: (batch, L, d_in_proj) f32 in_proj outputs; o: (batch, L, d_inner) in the precision's activation dtype.
void mamba3_recurrent_gpu(cudaStream_t s, const Mamba3Config& c, const Mamba3GpuParams& p, int64_t batch, int64_t L,
                          const float* zx, Mamba3GpuState state, void* o, Precision o_precision);

}  // namespace mamba3::cuda
