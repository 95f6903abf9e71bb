#pragma once
// Mamba-3 chunked prefill on CPU (spec §5): per (batch row, head), chunks of C tokens; inside a chunk the quadratic
// "dual" form, between chunks the carried P×N state. Parallel over batch × heads.
//
//   y_{t,r} = e^{Λ_t}·H·q_{t,r} + Σ_{s<t in chunk} Σ_{r'} e^{Λ_t−Λ_s}·scale_s·(q_{t,r}·k_{s,r'})·v_{s,r'}
//             + γ_t·Σ_{r'} (q_{t,r}·k_{t,r'})·v_{t,r'} + D·v_{t,r}
//   H ← e^{Λ_last}·H + Σ_s e^{Λ_last−Λ_s}·scale_s·Σ_r v_{s,r} k_{s,r}ᵀ,     scale_s = γ_s + (1−λ_{s+1})·Δ_{s+1}
//
// Cost per token and head (C chunk, R rank): ≈ 2·C·R²·(N + P)/2 (intra, causal half) + 4·R·P·N (inter + state) FLOPs;
// reads one in_proj row, writes one output row. Precision: f32 throughout, exponents of differences (never of
// sums that could overflow).
#include <cstdint>
#include <vector>

#include "ops/mamba3_common.h"

namespace mamba3 {

// B and C segments of each zx row (rows × d_in) become RMSNorm(·)·weight, in place (spec §2.4 step 1).
void mamba3_normalize_bc(const Mamba3Config& c, const float* B_norm, const float* C_norm, int64_t rows, float* zx);

// zx: (batch, L, d_in) with B/C already normalised; state: batch-major views (angle (B,H,S), ssm (B,H,P,N),
// k (B,R,H,N), v (B,H,P)) read as the initial state and overwritten with the final one; o: (batch, L, d_inner),
// the gated output ready for out_proj.
void mamba3_scan(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t batch, int64_t L, const float* zx,
                 Mamba3StateView state, float* o);

}  // namespace mamba3
