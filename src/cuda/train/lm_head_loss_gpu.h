#pragma once
// The lm_head fused with softmax cross-entropy on the GPU (spec §9.4), the math of train/lm_head_loss.h:
// logits = h·Wᵀ over all Vp ids; loss_r = logsumexp(logits_r) − logits_r[target_r]; dlogits = scale·(softmax −
// onehot); dh = dlogits·W; dW += dlogitsᵀ·h. Rows go one block at a time so memory stays at block·Vp logits; the
// matrix products run through TrainGemm in its precision mode.
//   f32 mode:  f32 logits, overwritten by their f32 gradient.
//   bf16 mode: W and h rounded to bf16 once per call; the logits product writes bf16 logits (as PyTorch autocast's
//              lm_head does; the loss upcasts them), and the softmax overwrites them in place with the bf16 gradient
//              that the two backward products read: half the bytes of f32 logits, each read once by the softmax.
// The softmax is f32 with the row maximum subtracted, its sum and the logsumexp in float64.
#include <cstdint>

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/train_gemm.h"

namespace mamba3::cuda {

// Grow-only buffers of lm_head_cross_entropy_gpu; reuse one per stream.
struct LmHeadScratch {
  // Rows per block of logits; 0 = automatic: f32 mode block·Vp ≤ 128 Mi logits and at most 4096 rows; bf16 mode
  // ≤ 1 Gi logits (2 GiB) and at most 32768 rows, the rows split evenly over the fewest blocks.
  int64_t max_block_rows = 0;
  DeviceBuffer logits;    // f32 mode: (block, Vp) f32, the logits, then their gradient
  DeviceBuffer logits16;  // bf16 mode: (block, Vp) bf16, the logits, then their gradient
  DeviceBuffer w16, h16;  // bf16 mode: W (Vp, D) (unless given rounded) and hidden (N, D) rounded once per call
  DeviceBuffer row_loss;  // (N) f64
  DeviceBuffer total;     // one f64
};

// hidden (N, D), W (Vp, D), targets (N, on the device): a target < 0 marks a row without loss (it adds nothing to
// the loss or the gradients); a target ≥ Vp makes the returned loss NaN. Returns Σ loss_r over the rows with a
// target, the per-row losses added in row order in float64 (deterministic); synchronises the stream.
// When dhidden is not null: dhidden (N, D) is overwritten (zero rows where target < 0) and dW (Vp, D) added to,
// both for grad_scale·Σ_r loss_r. dW may be null when dhidden is. W16 (optional, the bf16 mode only): W already
// rounded to bf16 (the parameter store's mirror), used instead of rounding W into scratch.w16 (the same bits).
double lm_head_cross_entropy_gpu(const Context& ctx, TrainGemm& gemm, const float* hidden, int64_t N, int64_t D,
                                 const float* W, int64_t Vp, const int32_t* targets, double grad_scale,
                                 float* dhidden, float* dW, LmHeadScratch& scratch, const uint16_t* W16 = nullptr);

// The same without the wait: everything queued on ctx's stream, and the device address of Σ loss_r returned
// (scratch.total; null when N = 0), valid once the stream reaches it and until the next call with this scratch.
const double* lm_head_cross_entropy_enqueue(const Context& ctx, TrainGemm& gemm, const float* hidden, int64_t N,
                                            int64_t D, const float* W, int64_t Vp, const int32_t* targets,
                                            double grad_scale, float* dhidden, float* dW, LmHeadScratch& scratch,
                                            const uint16_t* W16 = nullptr);

// Element-wise half (exposed for tests and reuse), over n rows of logits (n, Vp) whose targets are targets[0, n):
// row_loss[r] = logsumexp − logit[target] (0 when target < 0, NaN when ≥ Vp); when with_grad the logits are
// replaced by grad_scale·(softmax − onehot) (zero rows when target < 0). Deterministic: each row's reductions run
// in a fixed order that depends on Vp only.
// f32 logits (the f32 mode): two passes over each row (maximum with sum, then gradient).
void softmax_cross_entropy_rows_gpu(cudaStream_t s, float* logits, int64_t n, int64_t Vp, const int32_t* targets,
                                    double grad_scale, bool with_grad, double* row_loss);
// bf16 logits (the bf16 mode; bits, rows packed Vp apart, any Vp — odd ones leave every other row 2-byte aligned):
// the same math on the upcast values, and the gradient rounded to bf16 (nearest even) in place. When two rows fit
// in a block's shared memory (Vp up to ~58000 on sm_90) each row is read once, by the bulk copy engine while the
// block computes the row before it (one read and one write: 4 bytes per logit, where the f32 kernel moves 12); longer
// rows take three reads. The target's entry scale·(p − 1) is computed in float64 (p ≈ 1 would cancel in f32), the
// others as f32 e^(l − max)·(scale/Σ). A row gives the same bits wherever it lies in the buffer.
void softmax_cross_entropy_rows_bf16_gpu(cudaStream_t s, uint16_t* logits16, int64_t n, int64_t Vp,
                                         const int32_t* targets, double grad_scale, bool with_grad, double* row_loss);
// *out = Σ_i v[i] in float64, added in a fixed order (one block), on the device.
void ordered_sum_gpu(cudaStream_t s, const double* v, int64_t n, double* out);

}  // namespace mamba3::cuda
