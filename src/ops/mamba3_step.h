#pragma once
// Mamba-3 decode step on CPU (spec §4.3): one token per batch row, O(1) in the sequence length.
//
//   h ← α·h + β·Σ_r v_{prev,r} k_{prev,r}ᵀ + γ·Σ_r v_r k_rᵀ,    y_r = h·q_r + D·v_r,    o = output stage (§7)
//
// Cost per row and head: the P×N state is read and written once (8·P·N bytes) with ≈ (4R + 2R)·P·N FLOPs;
// everything else is O(R·(N + P)). The update and the read-out share one pass over the state. Allocates nothing.
#include <cstdint>
#include <vector>

#include "ops/mamba3_common.h"

namespace mamba3 {

// Per-thread scratch for mamba3_step, sized once (reuse it across tokens: the step itself never allocates).
struct Mamba3StepScratch {
  void reserve(const Mamba3Config& c, int threads);
  struct PerThread {
    std::vector<float> q, k, v, vprev, y, cs, sn;
  };
  std::vector<PerThread> per_thread;
};

// zx: (batch, d_in) with B/C already normalised; state updated in place; o: (batch, d_inner).
void mamba3_step(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t batch, const float* zx,
                 Mamba3StateView state, float* o, Mamba3StepScratch& scratch);

}  // namespace mamba3
