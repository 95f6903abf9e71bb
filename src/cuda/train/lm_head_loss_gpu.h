#pragma once
// The lm_head fused with softmax cross-entropy on the GPU (spec §9.4), the math of train/lm_head_loss.h:
// logits = h·Wᵀ over all Vp ids; loss_r = logsumexp(logits_r) − logits_r[target_r]; dlogits = scale·(softmax −
// onehot); dh = dlogits·W; dW += dlogitsᵀ·h. Rows go one block at a time so memory stays at block·Vp floats; the
// matrix products run through TrainGemm (its precision mode applies; in the bf16 mode W and h are rounded once per
// call, and each block's dlogits are written in bf16 by the softmax kernel itself: the same bits as rounding the f32
// gradient afterwards). The softmax is f32 with the row maximum subtracted, its sum and the logsumexp in float64.
#include <cstdint>

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/train_gemm.h"

namespace mamba3::cuda {

// Grow-only buffers of lm_head_cross_entropy_gpu; reuse one per stream.
struct LmHeadScratch {
  // Rows per block of logits; 0 = automatic (block·Vp ≤ 128 Mi floats, at most 4096 rows).
  int64_t max_block_rows = 0;
  DeviceBuffer logits;    // (block, Vp) f32: the logits, then their gradient
  DeviceBuffer w16, h16, dl16;  // bf16 mode: W (Vp, D) and hidden (N, D) rounded once per call; a block's dlogits
  DeviceBuffer row_loss;  // (N) f64
  DeviceBuffer total;     // one f64
};

// hidden (N, D), W (Vp, D), targets (N, on the device): a target < 0 marks a row without loss (it adds nothing to
// the loss or the gradients); a target ≥ Vp makes the returned loss NaN. Returns Σ loss_r over the rows with a
// target, the per-row losses added in row order in float64 (deterministic); synchronises the stream.
// When dhidden is not null: dhidden (N, D) is overwritten (zero rows where target < 0) and dW (Vp, D) added to,
// both for grad_scale·Σ_r loss_r. dW may be null when dhidden is.
double lm_head_cross_entropy_gpu(const Context& ctx, TrainGemm& gemm, const float* hidden, int64_t N, int64_t D,
                                 const float* W, int64_t Vp, const int32_t* targets, double grad_scale,
                                 float* dhidden, float* dW, LmHeadScratch& scratch);

// Element-wise half (exposed for tests and reuse), over n rows of logits (n, Vp) whose targets are targets[0, n):
// row_loss[r] = logsumexp − logit[target] (0 when target < 0, NaN when ≥ Vp); when with_grad the logits are
// replaced by grad_scale·(softmax − onehot) (zero rows when target < 0) — or, when grad16 is given, that gradient
// goes rounded to bf16 (nearest even) into grad16 (n, Vp) and the logits stay (the bf16 mode's product operand
// without an f32 round trip).
void softmax_cross_entropy_rows_gpu(cudaStream_t s, float* logits, int64_t n, int64_t Vp, const int32_t* targets,
                                    double grad_scale, bool with_grad, double* row_loss, uint16_t* grad16 = nullptr);
// *out = Σ_i v[i] in float64, added in a fixed order (one block), on the device.
void ordered_sum_gpu(cudaStream_t s, const double* v, int64_t n, double* out);

}  // namespace mamba3::cuda
