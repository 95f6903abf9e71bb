#include <cuda_bf16.h>

#include <cmath>

#include "cuda/train/block_reduce.cuh"
#include "cuda/train/lm_head_loss_gpu.h"

namespace mamba3::cuda {
namespace {

using train_detail::block_max;
using train_detail::block_sum;
using train_detail::kMaxWarps;
using train_detail::threads_for;

// One block per row: loss = log Σ e^(l − max) + max − l[target]; optionally l ← scale·(softmax − onehot).
// Cost: two passes over the row (max with sum, gradient): ~2 reads + 1 write of n·Vp floats, ~2·n·Vp exps.
__global__ void softmax_cross_entropy_kernel(float* logits, int64_t n, int64_t Vp, const int32_t* targets,
                                             double scale, bool with_grad, double* row_loss, __nv_bfloat16* grad16) {
  __shared__ double red[kMaxWarps];
  __shared__ float redf[kMaxWarps];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    float* l = logits + r * Vp;
    const int32_t tgt = targets[r];
    if (tgt < 0) {  // no loss here: a zero gradient row keeps it out of dh and dW
      if (threadIdx.x == 0) row_loss[r] = 0.0;
      if (with_grad)
        for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
          if (grad16) grad16[r * Vp + j] = __float2bfloat16_rn(0.0f);
          else l[j] = 0.0f;
        }
      continue;
    }
    const bool valid = tgt < Vp;
    // Read before the barriers inside the reductions, so no thread has overwritten it yet.
    const float lt = valid ? l[tgt] : 0.0f;
    // One pass for the maximum and the sum (each thread rescales its running sum when its maximum grows), then the
    // threads' sums rescaled to the row maximum: one read of the row fewer than max-then-sum.
    float m = -INFINITY;
    double part = 0;
    for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
      const float v = l[j];
      if (v > m) {
        part = part * double(expf(m - v)) + 1.0;
        m = v;
      } else {
        part += double(expf(v - m));
      }
    }
    const float mx = block_max(m, redf);
    const double sum = block_sum(m == -INFINITY ? 0.0 : part * double(expf(m - mx)), red);
    const double lse = double(mx) + log(sum);
    if (threadIdx.x == 0) row_loss[r] = valid ? lse - double(lt) : nan("");
    if (!with_grad) continue;
    for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
      // The target's entry is p − 1 with p near 1 for a confident model: float64 there avoids the cancellation.
      const float g = j == tgt ? float(scale * (exp(double(lt) - lse) - 1.0))
                               : float(scale * double(expf(float(double(l[j]) - lse))));
      if (grad16) grad16[r * Vp + j] = __float2bfloat16_rn(g);  // the bf16 mode's product operand, rounded here
      else l[j] = g;
    }
  }
}

// *out = Σ v in float64: thread t adds v[t], v[t + blockDim], … in order, then the fixed-order block sum.
__global__ void ordered_sum_kernel(const double* v, int64_t n, double* out) {
  __shared__ double red[kMaxWarps];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

}  // namespace

void softmax_cross_entropy_rows_gpu(cudaStream_t s, float* logits, int64_t n, int64_t Vp, const int32_t* targets,
                                    double grad_scale, bool with_grad, double* row_loss, uint16_t* grad16) {
  if (n <= 0) return;
  const unsigned blocks = unsigned(n < (1 << 20) ? n : (1 << 20));
  softmax_cross_entropy_kernel<<<blocks, threads_for(Vp, 512), 0, s>>>(
      logits, n, Vp, targets, grad_scale, with_grad, row_loss, reinterpret_cast<__nv_bfloat16*>(grad16));
  MAMBA3_LAUNCH_CHECK();
}

void ordered_sum_gpu(cudaStream_t s, const double* v, int64_t n, double* out) {
  ordered_sum_kernel<<<1, 256, 0, s>>>(v, n, out);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
