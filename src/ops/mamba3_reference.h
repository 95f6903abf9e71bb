#pragma once
// The plain reference Mamba-3 mixer: straight loops in float64, one token at a time through the recurrence of
// spec §4.1 (the definition every other form must equal), in_proj and out_proj included. Used for both prefill
// and decode; slow by design and never on a hot path.
#include <cstdint>

#include "ops/mamba3_common.h"

namespace mamba3 {

struct Mamba3ReferenceWeights {
  Mamba3HeadParams head;
  const float* in_proj;   // (d_in, d_model)
  const float* out_proj;  // (d_model, d_inner)
  const float* B_norm;    // (N)
  const float* C_norm;    // (N)
};

// u: (batch, L, d_model); state (batch-major, as in mamba3_scan) continued and overwritten; out: (batch, L, d_model).
// Angles are stored wrapped into [0, 2π).
void mamba3_reference(const Mamba3Config& c, const Mamba3ReferenceWeights& w, int64_t batch, int64_t L,
                      const float* u, Mamba3StateView state, float* out);

}  // namespace mamba3
