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

// Spec §2.2 for one head and token: Δ, A and the trapezoid's α, β, γ from the in_proj row's raw Δ, A and λ entries
// (lam_raw unused when euler).
struct TokenScalars {
  float dt, A, alpha, beta, gamma;
};
__device__ __forceinline__ TokenScalars token_scalars_of(float dt_raw, float a_raw, float lam_raw, float dt_bias,
                                                         bool heavy_tail, float A_floor, bool euler) {
  TokenScalars t;
  t.dt = softplus_f(dt_raw + dt_bias);
  const float f = heavy_tail ? (a_raw >= 0.0f ? 1.0f + a_raw : 1.0f / (1.0f - a_raw)) : softplus_f(a_raw);
  t.A = fminf(-f, -A_floor);
  const float lam = euler ? 1.0f : sigmoid_f(lam_raw);
  t.alpha = expf(t.A * t.dt);
  t.beta = (1.0f - lam) * t.dt * t.alpha;
  t.gamma = lam * t.dt;
  return t;
}
// The same for head h of an in_proj row.
__device__ __forceinline__ TokenScalars token_scalars(const float* row, int off_dt, int H, int h, float dt_bias,
                                                      bool heavy_tail, float A_floor, bool euler) {
  return token_scalars_of(row[off_dt + h], row[off_dt + H + h], euler ? 0.0f : row[off_dt + 2 * H + h], dt_bias,
                          heavy_tail, A_floor, euler);
}

// The warp sums of R per-lane partials with fewer shuffles than R separate butterflies (MIMO R = 4: 6 instead of 20):
// the first exchanges halve the values each lane carries, then a plain butterfly finishes. Returns, in every lane, the
// full sum of rank rank_of_lane<R>(lane); ranks ≥ R come out as 0.
template <int R>
__host__ __device__ constexpr int rank_span() {  // lanes per rank after the exchanges
  return R == 1 ? 32 : (R == 2 ? 16 : 8);
}
template <int R>
__device__ __forceinline__ int rank_of_lane(int lane) {
  return lane / rank_span<R>();
}
template <int R>
__device__ __forceinline__ float reduce_ranks(const float (&part)[R], int lane) {
  constexpr unsigned full = 0xffffffffu;
  if constexpr (R == 1) {
    return warp_sum(part[0]);
  } else if constexpr (R == 2) {
    const bool hi = lane & 16;
    float c = (hi ? part[1] : part[0]) + __shfl_xor_sync(full, hi ? part[0] : part[1], 16);
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) c += __shfl_xor_sync(full, c, o);
    return c;
  } else {
    const float p0 = part[0], p1 = part[1], p2 = part[2], p3 = R > 3 ? part[R - 1] : 0.0f;
    const bool hi = lane & 16, mid = lane & 8;
    const float x = (hi ? p2 : p0) + __shfl_xor_sync(full, hi ? p0 : p2, 16);
    const float y = (hi ? p3 : p1) + __shfl_xor_sync(full, hi ? p1 : p3, 16);
    float c = (mid ? y : x) + __shfl_xor_sync(full, mid ? x : y, 8);
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) c += __shfl_xor_sync(full, c, o);
    return c;
  }
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

// The per-head output norm's scales of spec §7 for R ranks: misc[r] = 1/√(mean_p y_r[p]² + ε), y(r·P + p) the
// outputs; warp r (of `warps`) takes rank r. The caller synchronises before reading misc.
template <typename Y>
__device__ __forceinline__ void output_norm_scales(Y y, int R, int P, int warp, int warps, int lane, float* misc) {
  for (int r = warp; r < R; r += warps) {
    float ss = 0.0f;
    for (int q = lane; q < P; q += 32) {
      const float v = y(r * P + q);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) misc[r] = rsqrtf(ss / float(P) + kMamba3NormEps);
  }
}

__device__ __forceinline__ void store_output(void* o, int64_t i, float v, bool bf16) {
  if (bf16)
    static_cast<__nv_bfloat16*>(o)[i] = __float2bfloat16(v);
  else
    static_cast<float*>(o)[i] = v;
}

// Row p's update coefficients vp_r = β·mx_r·x_{−1}, vc_r = γ·mx_r·x (shared memory, 2R floats per row, 16-byte
// aligned rows for R = 2 and 4): one broadcast vector load per rank pair instead of R scalar loads and multiplies.
template <int R>
__device__ __forceinline__ void load_coefs(const float* src, float (&vp)[R], float (&vc)[R]) {
  if constexpr (R == 4) {
    const float4 a = reinterpret_cast<const float4*>(src)[0], c = reinterpret_cast<const float4*>(src)[1];
    vp[0] = a.x, vp[1] = a.y, vp[2] = a.z, vp[3] = a.w, vc[0] = c.x, vc[1] = c.y, vc[2] = c.z, vc[3] = c.w;
  } else if constexpr (R == 2) {
    const float4 a = *reinterpret_cast<const float4*>(src);
    vp[0] = a.x, vp[1] = a.y, vc[0] = a.z, vc[1] = a.w;
  } else if constexpr (R == 1) {
    const float2 a = *reinterpret_cast<const float2*>(src);
    vp[0] = a.x, vc[0] = a.y;
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) vp[r] = src[r], vc[r] = src[R + r];
  }
}
__host__ __device__ constexpr int coef_stride_of(int R) {  // floats per row of the coefficient table
  return R == 3 ? 6 : 2 * R;
}
template <int R>
__host__ __device__ constexpr int coef_stride() {
  return coef_stride_of(R);
}

}  // namespace mamba3::cuda
