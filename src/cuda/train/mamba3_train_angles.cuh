#pragma once
// The arithmetic of the rotary angle scan and of its backward, one helper per step, shared by every kernel that runs
// them (mamba3_train_token.cu: the per-angle split and fused scans, the suffix sums and the per-token backward;
// mamba3_train_angle_blocks.cu: the segment-block kernels). Multiply-adds are written out (__fmaf_rn, __fmul_rn) so
// that each kernel rounds alike whatever the compiler would contract: the paths give the same bits, which
// FusedAnglesGiveTheSplitBits checks.
#include <cuda_bf16.h>

#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_math.cuh"

namespace mamba3::cuda::train_detail {

// φ reduced to [0, 2π) (a rounding below: within an ulp of it). The quotient by 2π as a product with its reciprocal:
// the IEEE division was most of the scan's instructions, and where the two differ (φ within an ulp of a multiple of
// 2π) both results name the same angle.
constexpr float kInvTwoPi = 0.159154943091895335769f;
__device__ __forceinline__ float wrap_angle(float phi) {
  return __fmaf_rn(-kTwoPi, floorf(__fmul_rn(phi, kInvTwoPi)), phi);
}

// The scan's increment factor π·tanh(θ) (0 without rotary: then nothing turns).
__device__ __forceinline__ float angle_rate(float theta, bool no_rotary) {
  return no_rotary ? 0.0f : kPi * tanhf(theta);
}

// One step of the scan: φ ← wrap(φ + rate·Δ).
__device__ __forceinline__ float angle_step(float phi, float rate, float dt, bool no_rotary) {
  if (!no_rotary) phi = __fmaf_rn(rate, dt, phi);
  return wrap_angle(phi);
}

// The backward's two terms of a head at (t, angle i), given dΦ (the suffix sum of dφ) and th = tanh θ_i:
// Δ's share a += dΦ·π·th (summed over i, then over the warp), and θ_i's factor x = dΦ·π·Δ, which the θ gradient
// sums over the heads in head order through theta_grad_add.
// Both start from dΦ·π (angle_scaled_dphi), which the S = 32 block backward stores and uses twice.
__device__ __forceinline__ float angle_scaled_dphi(float dPhi) { return __fmul_rn(dPhi, kPi); }
__device__ __forceinline__ float angle_dt_share_add_scaled(float a, float dPhiPi, float th) {
  return __fmaf_rn(dPhiPi, th, a);
}
__device__ __forceinline__ float angle_theta_factor_scaled(float dPhiPi, float dt) { return __fmul_rn(dPhiPi, dt); }
__device__ __forceinline__ float angle_dt_share_add(float a, float dPhi, float th) {
  return angle_dt_share_add_scaled(a, angle_scaled_dphi(dPhi), th);
}
__device__ __forceinline__ float angle_theta_factor(float dPhi, float dt) {
  return angle_theta_factor_scaled(angle_scaled_dphi(dPhi), dt);
}
__device__ __forceinline__ float theta_grad_add(float g, float x, float th) {
  return __fmaf_rn(x, __fmaf_rn(-th, th, 1.0f), g);
}

// The per-token scalar gradients of one head (spec §2.2 chain: scale_t = γ_t + σ̄_{t+1}, γ = λΔ, σ̄ = (1−λ)Δ, A·Δ):
// dgam = dγ + dscale_t, dsig = dscale_{t−1} (0 at t = 0), ang = Δ's share from the angles.
struct ScalarGrads {
  float dsp, dA, dtrap;
};
__device__ __forceinline__ ScalarGrads angle_scalar_grads(float dtv, float A, float lam, float dAdl, float dsp_factor,
                                                          float dadt, float dgam, float dsig, float ang, bool euler) {
  const float ddt =
      __fadd_rn(__fmaf_rn(dsig, __fsub_rn(1.0f, lam), __fmaf_rn(dgam, lam, __fmul_rn(dadt, A))), ang);
  const float dlam = __fmul_rn(__fsub_rn(dgam, dsig), dtv);
  ScalarGrads g;
  g.dsp = __fmul_rn(ddt, dsp_factor);
  g.dA = __fmul_rn(__fmul_rn(dadt, dtv), dAdl);
  g.dtrap = euler ? 0.0f : __fmul_rn(__fmul_rn(dlam, lam), __fsub_rn(1.0f, lam));  // euler: λ does not depend on trap
  return g;
}

// Row `row`'s dt, A and trap columns of head h in dzx (and, rounded to nearest even, in dzx16 when given).
__device__ __forceinline__ void write_scalar_grads(const AngleBackwardParams& p, int64_t row, int h,
                                                   const ScalarGrads& g) {
  const MixerDims& d = p.d;
  float* dz = p.dzx + row * d.din;
  dz[d.off_dt + h] = g.dsp;
  dz[d.off_A + h] = g.dA;
  dz[d.off_trap + h] = g.dtrap;
  if (p.dzx16) {
    uint16_t* dz16 = p.dzx16 + row * d.din;
    dz16[d.off_dt + h] = __bfloat16_as_ushort(__float2bfloat16_rn(g.dsp));
    dz16[d.off_A + h] = __bfloat16_as_ushort(__float2bfloat16_rn(g.dA));
    dz16[d.off_trap + h] = __bfloat16_as_ushort(__float2bfloat16_rn(g.dtrap));
  }
}

}  // namespace mamba3::cuda::train_detail
