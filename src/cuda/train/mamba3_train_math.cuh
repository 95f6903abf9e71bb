#pragma once
// Device helpers shared by the training kernels: the CPU's scalar functions (src/ops/mamba3_common.h) in f32, a
// deterministic warp sum and the rotary pairing of spec §3.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace mamba3::cuda::train_detail {

constexpr float kPi = 3.14159265358979323846f;
constexpr float kTwoPi = 6.28318530717958647692f;
constexpr float kEps = 1e-5f;  // RMSNorm epsilon (B/C and output norms)

__device__ __forceinline__ float softplus_f(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
// e^{-z} as __expf forms it (z·(−log2 e) rounded, then the hardware 2^x) but with subnormal results flushed to zero:
// without the flush 2^x takes a range test and two predicated multiplies per element. 1 + e^{-z} is the same float
// either way (a subnormal is far below half an ulp of 1), so the gate keeps its bits.
__device__ __forceinline__ float exp_neg_ftz(float z) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(__fmul_rn(z, -1.44269502f)));
  return e;
}
// The output stage's gate σ(z) in the bf16 mode (fast): the hardware exponential and an approximate division, a few
// ulp from sigmoid_f — far inside that mode's bf16 roundings — at a fraction of its instructions (the gate was the
// largest section of the forward core's output stage). Every kernel that forms or differentiates the batched path's
// gate takes it from here with the same `fast`, so the cores' o is the generic output kernel's bit for bit. The exact
// mode keeps sigmoid_f. (-z large: 1 + e^{-z} overflows and the quotient is 0, the limit.)
__device__ __forceinline__ float gate_sigmoid_f(float z, bool fast) {
  return fast ? __fdividef(1.0f, 1.0f + exp_neg_ftz(z)) : sigmoid_f(z);
}

// The SISO output gate's backward at one channel in the bf16 mode (o = yn·silu(z)): dyn = dO·silu(z) and
// dz = dO·yn·σ(z)·(1 + z·(1 − σ(z))), their roundings spelled out so that every kernel forming them (the output-stage
// backward, the fused core's output part, the e^Λ ⊙ dy kernel before the reverse chain) gives the same bits.
__device__ __forceinline__ float siso_gate_dy(float dO, float z, float sg) { return __fmul_rn(dO, __fmul_rn(z, sg)); }
struct SisoGateGrad {
  float dyn, dz;
};
__device__ __forceinline__ SisoGateGrad siso_gate_backward(float dO, float z, float yn) {
  const float sg = gate_sigmoid_f(z, true);
  const float dz = __fmul_rn(__fmul_rn(__fmul_rn(dO, yn), sg), __fmaf_rn(z, __fsub_rn(1.0f, sg), 1.0f));
  return {siso_gate_dy(dO, z, sg), dz};
}

// The bf16 bits of v rounded to nearest even (as __float2bfloat16_rn; NaN stays NaN), written out so that host
// emulations of the kernels can compile it too.
__host__ __device__ __forceinline__ uint16_t bf16_bits_rn(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Butterfly sum: every lane gets the same, fixed-order result (no atomics, bit-reproducible).
// A chunk row's output before the norm and gate, y = (e^Λ·Z + D·v) + W·v, with its roundings spelled out so that
// the MIMO forward core (which stores it) and the MIMO output instance (which forms it otherwise) give the same bits.
__device__ __forceinline__ float chunk_row_y(float e, float z, float D, float v, float wv) {
  return __fadd_rn(__fmaf_rn(e, z, __fmul_rn(D, v)), wv);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One rank's term of the MIMO output stage (spec §7) at a channel: o += mo·yn·silu(mz·z), and for the backward (dO:
// the gradient of o there) the rank's shares of the mimo_o and mimo_z gradients, of its normed y (dyn) and of z.
struct MimoGate {
  float o, go, dyn, gz, dz;
};
__device__ __forceinline__ MimoGate mimo_gate(float yn, float z, float mz, float mo, float dO, bool fast) {
  const float zz = mz * z, sg = gate_sigmoid_f(zz, fast), si = zz * sg;
  const float dsi = sg * (1.0f + zz * (1.0f - sg)), dzz = dO * mo * yn * dsi;
  return {mo * yn * si, dO * yn * si, dO * mo * si, dzz * z, dzz * mz};
}

// Rotary pair holding element n: SISO pairs (2i, 2i+1), MIMO ("halves") pairs (i, i + N/2), i < S. False when n
// passes through unrotated.
__device__ __forceinline__ bool rotary_pair(int n, int N, int S, bool halves, int& i, int& a, int& b) {
  if (halves) {
    const int half = N / 2;
    if (n < S) {
      i = n, a = n, b = n + half;
      return true;
    }
    if (n >= half && n < half + S) {
      i = n - half, a = i, b = n;
      return true;
    }
    return false;
  }
  if (n < 2 * S) {
    i = n / 2, a = 2 * i, b = a + 1;
    return true;
  }
  return false;
}

// A hint: the 32-byte sector at `ptr` into L2 (no register, no wait), for loads a loop will issue an iteration later.
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// cos and sin of a wrapped angle φ ∈ [0, 2π) (launch_angles wraps every one) from the SFU's approximations at
// φ − π ∈ [−π, π), where they are within 2^-21.4 absolute (cos φ = −cos(φ − π), sin φ = −sin(φ − π)). The
// accurate cosf/sinf made the build and the rotation backward a quarter slower.
__device__ __forceinline__ float2 rotary_cos_sin(float phi) {
  float s, c;
  __sincosf(phi - kPi, &s, &c);
  return make_float2(-c, -s);
}

// The angle codes (BatchedParams::phi_code): φ ∈ [0, 2π] as round(φ·65536/2π) mod 65536, in steps of 2π/65536 ≈
// 9.6e-5, so within 4.8e-5 of φ (a rotated q moves by ≤ 4.8e-5 of its length, against its own bf16 rounding's 2^-9;
// the official SISO kernels keep their angles in bf16, within 2^-6 ≈ 0.016). Half of φ's bytes; 2π wraps to 0.
constexpr float kCodesPerRadian = 10430.3783504704527f;      // 65536 / 2π
constexpr float kRadiansPerCode = 9.58737992428525769e-05f;  // 2π / 65536
__device__ __forceinline__ uint16_t angle_code(float phi) {
  return uint16_t(__float2uint_rn(__fmul_rn(phi, kCodesPerRadian)) & 0xFFFFu);
}
__device__ __forceinline__ float angle_from_code(uint32_t code) { return __fmul_rn(float(code), kRadiansPerCode); }
// Angle i from the codes where given, else from phi (BatchedParams::phi, phi_code).
__device__ __forceinline__ float angle_at(const float* phi, const uint16_t* code, int64_t i) {
  return code ? angle_from_code(code[i]) : phi[i];
}

// Element n of Rot(in + bias, φ) (phi: the token's S angles).
__device__ __forceinline__ float bias_rotate_at(const float* in, const float* bias, const float* phi, int n, int N,
                                                int S, bool halves) {
  int i, a, b;
  if (!rotary_pair(n, N, S, halves, i, a, b)) return in[n] + bias[n];
  const float va = in[a] + bias[a], vb = in[b] + bias[b];
  const float2 r = rotary_cos_sin(phi[i]);
  return n == a ? va * r.x - vb * r.y : va * r.y + vb * r.x;
}

// Element n of Rot(·, φ)ᵀ·g: the gradient through the rotation (g: gradient of the rotated vector).
// cs, sn: the cosine and sine of n's pair's angle (unused where n does not rotate).
__device__ __forceinline__ float unrotate_at(const float* g, float cs, float sn, int n, int N, int S, bool halves) {
  int i, a, b;
  if (!rotary_pair(n, N, S, halves, i, a, b)) return g[n];
  return n == a ? g[a] * cs + g[b] * sn : g[b] * cs - g[a] * sn;
}

// coef(t, s) of spec §5.3 between chunk rows j (token t = j / R) and jj (token s = jj / R), from the chunk scalars Λ,
// scale and γ: e^{Λ_t − Λ_s}·scale_s below the token diagonal, γ_t on it, 0 above; ex = e^{Λ_t − Λ_s} below the
// diagonal, else 0 (the weight of scale's gradient).
// kR: R when known at compile time (1, 2, 4: the two integer divisions per element, ~20 instructions each at a
// runtime R, become nothing or shifts), 0 for the runtime R.
template <int kR = 0>
__device__ __forceinline__ float chunk_coef(const float* Lam, const float* scale, const float* gam, int R, int j,
                                            int jj, float& ex) {
  const int r = kR > 0 ? kR : R;
  const int tl = j / r, sl = jj / r;
  ex = 0.0f;
  if (sl < tl) {
    ex = expf(Lam[tl] - Lam[sl]);
    return ex * scale[sl];
  }
  return sl == tl ? gam[tl] : 0.0f;
}

// chunk_coef<1> (SISO: rows are tokens) from its operands in registers, without per-element branches: token t's Λ and
// γ, token s's Λ and scale. e^{Λ_t − Λ_s} is formed for every element and kept only below the diagonal (s < t), so
// the values and ex are chunk_coef's bits.
__device__ __forceinline__ float siso_coef(float lam_t, float gam_t, float lam_s, float scale_s, int t, int s,
                                           float& ex) {
  const float e = expf(lam_t - lam_s);
  const bool below = s < t;
  ex = below ? e : 0.0f;
  return below ? e * scale_s : (s == t ? gam_t : 0.0f);
}

// siso_coef over the m16n8 accumulator tiles of a warp whose rows are tokens t (lane (g, q): rows r0 + g and
// r0 + g + 8) and whose columns are tokens s: the rows' Λ and γ held, each tile's column pair (sc = c0 + 2q, sc + 1)
// loaded once. Element e of a tile: row e / 2, column e % 2 (the accumulator layout).
struct SisoCoefRowsT {
  int t[2];
  float lam[2], gam[2];
  __device__ __forceinline__ SisoCoefRowsT(const float* Lam, const float* gam_, int r0, int g)
      : t{r0 + g, r0 + g + 8}, lam{Lam[r0 + g], Lam[r0 + g + 8]}, gam{gam_[r0 + g], gam_[r0 + g + 8]} {}
  __device__ __forceinline__ void tile(const float* Lam, const float* scale, int sc, float (&cf)[4],
                                       float (&ex)[4]) const {
    const float ls[2] = {Lam[sc], Lam[sc + 1]}, ss[2] = {scale[sc], scale[sc + 1]};
#pragma unroll
    for (int e = 0; e < 4; ++e)
      cf[e] = siso_coef(lam[e / 2], gam[e / 2], ls[e % 2], ss[e % 2], t[e / 2], sc + e % 2, ex[e]);
  }
};

// Whether a core may skip the 16 × 16 blocks above the causal diagonal (coef 0 there: their products add exact zeros):
// the rank known at compile time and dividing 16, so a 16-row block's tokens end where a 16-column block's do.
template <int kR>
__host__ __device__ constexpr bool causal_blocks_skippable() {
  return kR == 1 || kR == 2 || kR == 4;
}

}  // namespace mamba3::cuda::train_detail
