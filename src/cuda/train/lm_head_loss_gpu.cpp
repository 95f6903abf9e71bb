#include "cuda/train/lm_head_loss_gpu.h"

#include <algorithm>

namespace mamba3::cuda {

namespace {
// Automatic block of rows: 128 Mi logits (512 MiB) at most, and no more rows than one product needs to be
// efficient. Every block adds its dW product into the f32 (Vp, D) gradient (a read and a write of it): 32 Mi logits
// made that 25 passes over the 154 MB gradient per 125M step (≈ 2 ms); 128 Mi makes it 7.
constexpr int64_t kMaxLogitFloats = int64_t(1) << 27;
constexpr int64_t kMaxBlockRows = 4096;
}  // namespace

double lm_head_cross_entropy_gpu(const Context& ctx, TrainGemm& gemm, const float* hidden, int64_t N, int64_t D,
                                 const float* W, int64_t Vp, const int32_t* targets, double grad_scale,
                                 float* dhidden, float* dW, LmHeadScratch& scratch) {
  MAMBA3_CHECK(N >= 0 && D > 0 && Vp > 0, "lm_head_cross_entropy_gpu: bad shape N {} D {} Vp {}", N, D, Vp);
  const bool with_grad = dhidden != nullptr;
  MAMBA3_CHECK(!with_grad || dW, "lm_head_cross_entropy_gpu: dhidden given without dW");
  if (N == 0) return 0.0;
  int64_t block = scratch.max_block_rows > 0 ? scratch.max_block_rows
                                             : std::clamp<int64_t>(kMaxLogitFloats / Vp, 1, kMaxBlockRows);
  block = std::min(block, N);
  scratch.logits.reserve(size_t(block * Vp) * sizeof(float));
  scratch.row_loss.reserve(size_t(N) * sizeof(double));
  scratch.total.reserve(sizeof(double));
  float* logits = scratch.logits.as<float>();
  double* row_loss = scratch.row_loss.as<double>();
  const cudaStream_t s = ctx.stream();
  // bf16 mode: the operands TrainGemm::run would round on every product (W three times per block) rounded once.
  const bool bf16 = gemm.precision() == Precision::BF16;
  uint16_t *w16 = nullptr, *h16 = nullptr, *dl16 = nullptr;
  if (bf16) {
    scratch.w16.reserve(size_t(Vp * D) * 2);
    scratch.h16.reserve(size_t(N * D) * 2);
    w16 = scratch.w16.as<uint16_t>(), h16 = scratch.h16.as<uint16_t>();
    f32_to_bf16_2d(s, W, Vp, D, D, w16);
    f32_to_bf16_2d(s, hidden, N, D, D, h16);
    if (with_grad) {
      scratch.dl16.reserve(size_t(block * Vp) * 2);
      dl16 = scratch.dl16.as<uint16_t>();
    }
  }
  for (int64_t r0 = 0; r0 < N; r0 += block) {
    const int64_t n = std::min(block, N - r0);
    const float* h = hidden + r0 * D;
    if (bf16) gemm.run_bf16(ctx, false, true, n, Vp, D, 1.0f, h16 + r0 * D, D, w16, D, 0.0f, logits, Vp);
    else gemm.run(ctx, false, true, n, Vp, D, 1.0f, h, D, W, D, 0.0f, logits, Vp);  // (n, Vp)
    softmax_cross_entropy_rows_gpu(s, logits, n, Vp, targets + r0, grad_scale, with_grad, row_loss + r0,
                                   with_grad && bf16 ? dl16 : nullptr);
    if (!with_grad) continue;
    if (bf16) {
      gemm.run_bf16(ctx, false, false, n, D, Vp, 1.0f, dl16, Vp, w16, D, 0.0f, dhidden + r0 * D, D);
      gemm.run_bf16(ctx, true, false, Vp, D, n, 1.0f, dl16, Vp, h16 + r0 * D, D, 1.0f, dW, D);
    } else {
      gemm.run(ctx, false, false, n, D, Vp, 1.0f, logits, Vp, W, D, 0.0f, dhidden + r0 * D, D);  // dh = dlogits·W
      gemm.run(ctx, true, false, Vp, D, n, 1.0f, logits, Vp, h, D, 1.0f, dW, D);               // dW += dlogitsᵀ·h
    }
  }
  ordered_sum_gpu(s, row_loss, N, scratch.total.as<double>());
  double total = 0;
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(&total, scratch.total.raw(), sizeof(double), cudaMemcpyDeviceToHost, s));
  MAMBA3_CUDA_CHECK(cudaStreamSynchronize(s));
  return total;
}

}  // namespace mamba3::cuda
