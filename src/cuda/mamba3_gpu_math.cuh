#pragma once
// Device arithmetic that every Mamba-3 inference kernel (fused, staged, chunked, head decode) shares, written once so
// that all paths compute the spec's expressions identically: the activations, warp sums, the per-token scalars of
// spec §2.2 and the gated output of spec §7. Include from .cu files only.
#include <cuda_bf16.h>

namespace mamba3::cuda {

inline constexpr float kMamba3Pi = 3.14159265358979323846f;
inline constexpr float kMamba3TwoPi = 6.28318530717958647692f;
inline constexpr float kMamba3NormEps = 1e-5f;

__device__ __forceinline__ float softplus_f(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Spec §2.2 for head h of one in_proj row: Δ, A and the trapezoid's α, β, γ.
struct TokenScalars {
  float dt, A, alpha, beta, gamma;
};
__device__ __forceinline__ TokenScalars token_scalars(const float* row, int off_dt, int H, int h, float dt_bias,
                                                      bool heavy_tail, float A_floor, bool euler) {
  TokenScalars t;
  t.dt = softplus_f(row[off_dt + h] + dt_bias);
  const float al = row[off_dt + H + h];
  const float f = heavy_tail ? (al >= 0.0f ? 1.0f + al : 1.0f / (1.0f - al)) : softplus_f(al);
  t.A = fminf(-f, -A_floor);
  const float lam = euler ? 1.0f : sigmoid_f(row[off_dt + 2 * H + h]);
  t.alpha = expf(t.A * t.dt);
  t.beta = (1.0f - lam) * t.dt * t.alpha;
  t.gamma = lam * t.dt;
  return t;
}

// Spec §7 for one channel: y(r) is rank r's output (normed when the layer has the output norm); SISO y·silu(z), MIMO
// Σ_r mo(r)·y(r)·silu(mz(r)·z).
template <typename Y, typename MZ, typename MO>
__device__ __forceinline__ float gated_output(int R, bool mimo, float z, Y y, MZ mz, MO mo) {
  float acc = 0.0f;
  for (int r = 0; r < R; ++r) {
    const float yr = y(r);
    if (mimo) {
      const float zz = mz(r) * z;
      acc += mo(r) * yr * (zz * sigmoid_f(zz));
    } else {
      acc = yr * (z * sigmoid_f(z));
    }
  }
  return acc;
}

__device__ __forceinline__ void store_output(void* o, int64_t i, float v, bool bf16) {
  if (bf16)
    static_cast<__nv_bfloat16*>(o)[i] = __float2bfloat16(v);
  else
    static_cast<float*>(o)[i] = v;
}

}  // namespace mamba3::cuda
