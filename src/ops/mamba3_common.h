#pragma once
// Pieces shared by the Mamba-3 prefill scan and decode step on CPU: the per-token, per-head preprocessing of spec §2
// (Δ, A, λ, angle update, bias + rotation, MIMO values) and the output stage of §7. Written once so the two forms
// cannot drift apart.
#include <cmath>
#include <cstdint>
#include <numbers>

#include "ops/mamba3_config.h"

namespace mamba3 {

// Plain f32 views of the mixer's per-head parameters (kernels take these, never Tensor).
struct Mamba3HeadParams {
  const float* dt_bias;  // (H)
  const float* B_bias;   // (H, R, N)
  const float* C_bias;   // (H, R, N)
  const float* mimo_x;   // (H, R, P) or null (SISO)
  const float* mimo_z;   // (H, R, P) or null
  const float* mimo_o;   // (H, R, P) or null
  const float* D;        // (H)
  const float* norm;     // (d_inner) or null (no output norm)
};

// Decode/prefill state views for one batch row (spec §4.2).
struct Mamba3StateView {
  float* angle;  // (H, S)
  float* ssm;    // (H, P, N)
  float* k;      // (R, H, N)
  float* v;      // (H, P)
};

namespace detail {

constexpr float kTwoPi = float(2 * std::numbers::pi);
constexpr float kNormEps = 1e-5f;

inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x * sigmoid(x); }

// Per-token, per-head scalars of spec §2.2.
struct HeadScalars {
  float dt;   // Δ
  float adt;  // A·Δ (< 0)
  float lam;  // λ = σ(trap)
};

inline HeadScalars head_scalars(const Mamba3Config& c, const float* zx, int64_t h, const float* dt_bias) {
  const int64_t H = c.nheads();
  const float* dd = zx + c.off_dt();
  float dt = softplus(dd[h] + dt_bias[h]);
  float a_logit = dd[H + h];
  float f = c.a_activation == AActivation::HeavyTail ? (a_logit >= 0 ? 1.0f + a_logit : 1.0f / (1.0f - a_logit))
                                                     : softplus(a_logit);
  float A = std::min(-f, -float(c.A_floor));
  // Euler ablation (spec §15): λ ≡ 1, so β = 0, γ = Δ and the shifted γ vanishes; the trap logit is ignored.
  return {dt, A * dt, c.euler ? 1.0f : sigmoid(dd[2 * H + h])};
}

// φ ← wrap(φ + π·tanh(θ)·Δ) for the S angles of one head, tanh θ_i given by tanh_theta(i); also returns cos/sin of
// the new angles. With the no-rotary ablation (spec §15) the increment is 0 and θ is ignored (φ stays at its start, 0
// for new sequences).
template <class TanhTheta>
inline void advance_angles_by(const Mamba3Config& c, TanhTheta tanh_theta, float dt, float* phi, float* cs,
                              float* sn) {
  const int64_t S = c.num_angles();
  for (int64_t i = 0; i < S; ++i) {
    float a = c.no_rotary ? phi[i] : phi[i] + float(std::numbers::pi) * tanh_theta(i) * dt;
    a -= kTwoPi * std::floor(a / kTwoPi);
    phi[i] = a;
    cs[i] = std::cos(a);
    sn[i] = std::sin(a);
  }
}

// From θ itself.
inline void advance_angles(const Mamba3Config& c, const float* theta, float dt, float* phi, float* cs, float* sn) {
  advance_angles_by(c, [theta](int64_t i) { return std::tanh(theta[i]); }, dt, phi, cs, sn);
}

// From tanh θ computed beforehand (callers that walk every head of a token compute it once per token).
inline void advance_angles_tanh(const Mamba3Config& c, const float* tanh_theta, float dt, float* phi, float* cs,
                                float* sn) {
  advance_angles_by(c, [tanh_theta](int64_t i) { return tanh_theta[i]; }, dt, phi, cs, sn);
}

// out = Rot(in + bias, φ): SISO pairs (2i, 2i+1), MIMO pairs (i, i + N/2) (spec §3).
inline void bias_rotate(const float* in, const float* bias, const float* cs, const float* sn, int64_t N, int64_t S,
                        bool halves, float* out) {
  for (int64_t n = 0; n < N; ++n) out[n] = in[n] + bias[n];
  const int64_t stride = halves ? 1 : 2, partner = halves ? N / 2 : 1;
  for (int64_t i = 0; i < S; ++i) {
    float& a = out[i * stride];
    float& b = out[i * stride + partner];
    float a0 = a, b0 = b;
    a = a0 * cs[i] - b0 * sn[i];
    b = a0 * sn[i] + b0 * cs[i];
  }
}

// In place: each of the `count` vectors of length N becomes RMSNorm(v)·w (spec §2.4 step 1).
inline void rmsnorm_rows(float* v, int64_t count, int64_t N, const float* w) {
  for (int64_t c = 0; c < count; ++c, v += N) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t n = 0; n < N; ++n) ss += v[n] * v[n];
    float r = 1.0f / std::sqrt(ss / float(N) + kNormEps);
    for (int64_t n = 0; n < N; ++n) v[n] = v[n] * r * w[n];
  }
}

// Output stage of spec §7 for one token and head: y (R, P) already holds h·q + D·v; z (P); o (P) is written.
inline void output_stage(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t h, const float* y, const float* z,
                         float* o) {
  const int64_t P = c.headdim, R = c.rank();
  const float* nw = p.norm ? p.norm + h * P : nullptr;
  for (int64_t q = 0; q < P; ++q) o[q] = 0;
  for (int64_t r = 0; r < R; ++r) {
    const float* yr = y + r * P;
    float rstd = 1.0f;
    if (nw) {
      float ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t q = 0; q < P; ++q) ss += yr[q] * yr[q];
      rstd = 1.0f / std::sqrt(ss / float(P) + kNormEps);
    }
    if (!c.is_mimo) {
      for (int64_t q = 0; q < P; ++q) o[q] = (nw ? yr[q] * rstd * nw[q] : yr[q]) * silu(z[q]);
    } else {
      const float* mz = p.mimo_z + (h * R + r) * P;
      const float* mo = p.mimo_o + (h * R + r) * P;
      for (int64_t q = 0; q < P; ++q) o[q] += mo[q] * (nw ? yr[q] * rstd * nw[q] : yr[q]) * silu(mz[q] * z[q]);
    }
  }
}

}  // namespace detail
}  // namespace mamba3
