#pragma once
// Backward of the whole Mamba-3 mixer on CPU in f32, through the chunked form of spec §5.3 (the fast companion of
// mamba3_reference_backward, which is its oracle). Per (batch row, head), in parallel:
//   1. forward over chunks, keeping only the state H_c at each chunk start, and the output stage's backward
//      (dy from dO, o for out_proj's gradient);
//   2. reverse over chunks, carrying dH (P×N). With W = (Q·Kᵀ) ⊙ coef (coef(t,s) = e^{Λ_t−Λ_s}·scale_s for s < t,
//      γ_t on the diagonal) and w_s = e^{Λ_last−Λ_s}·scale_s:
//        dV = Wᵀ·dY + D·dY + diag(w)·K·dHᵀ,      dS = (dY·Vᵀ) ⊙ coef,   dQ = dS·K + diag(e^Λ)·dY·H_c,
//        dK = dSᵀ·Q + diag(w)·V·dH,              dH ← e^{Λ_last}·dH + (diag(e^Λ)·dY)ᵀ·Q,
//      plus the gradients of Λ (→ A·Δ by a reverse prefix sum), scale and γ (→ Δ, λ), then per token the rotation,
//      bias and value backward and the reverse cumulative sum of the angle gradient;
// then the B/C RMSNorm backward (summing heads into their groups), θ (summing heads), and the projections.
// Cost ≈ 3× the chunked forward (seven chunk GEMMs of the forward's sizes per chunk instead of three) plus
// 4·B·L·d_model·(d_in + d_inner) FLOPs for the projection gradients. Memory per thread: O(L·(R·P + S) + L/C·P·N).
#include <cstdint>

#include "ops/mamba3_reference.h"

namespace mamba3 {

// Gradient destinations (f32), accumulated (+=). Entries for parameters the config lacks are ignored (may be null).
struct Mamba3GradViews {
  float* dt_bias;   // (H)
  float* B_bias;    // (H, R, N)
  float* C_bias;    // (H, R, N)
  float* mimo_x;    // (H, R, P)
  float* mimo_z;    // (H, R, P)
  float* mimo_o;    // (H, R, P)
  float* D;         // (H)
  float* in_proj;   // (d_in, d_model)
  float* B_norm;    // (N)
  float* C_norm;    // (N)
  float* norm;      // (d_inner)
  float* out_proj;  // (d_model, d_inner)
};

// Gradients of sum(out ⊙ dout), out = mixer(u) starting from `init` (batch-major views as in mamba3_scan; null =
// zero state). u, dout: (batch, L, d_model). du (batch, L, d_model) is written; grads are accumulated; dinit (may
// be null) receives the gradient of the initial state. The upstream gradient of the final state is taken as zero.
// zx_raw (optional): u·W_inᵀ (batch·L, d_in) as the forward computed it; otherwise it is recomputed.
void mamba3_backward(const Mamba3Config& c, const Mamba3ReferenceWeights& w, int64_t batch, int64_t L, const float* u,
                     const float* dout, const Mamba3StateView* init, const Mamba3GradViews& grads, float* du,
                     const Mamba3StateView* dinit = nullptr, const float* zx_raw = nullptr);

}  // namespace mamba3
