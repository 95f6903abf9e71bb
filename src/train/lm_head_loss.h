#pragma once
// The lm_head fused with softmax cross-entropy (spec §9.4): logits = h·Wᵀ over all V_pad ids, loss_r =
// logsumexp(logits_r) − logits_r[target_r] (float64 logsumexp). The logits are formed one block of rows at a time,
// so memory stays at block·V_pad floats. Backward: dlogits = scale·(softmax − onehot); dh = dlogits·W,
// dW += dlogitsᵀ·h.
#include <cstdint>

namespace mamba3 {

// hidden (N, D), W (Vp, D), targets (N) in [0, Vp). Returns Σ_r loss_r (not averaged). When dhidden is not null:
// dhidden (N, D) is overwritten and dW (Vp, D) added to, both for `grad_scale`·Σ_r loss_r.
double lm_head_cross_entropy(const float* hidden, int64_t N, int64_t D, const float* W, int64_t Vp,
                             const int64_t* targets, double grad_scale, float* dhidden, float* dW);

}  // namespace mamba3
