#include "cuda/train/lm_head_loss_gpu.h"

#include <algorithm>

#include "cuda/env_switch.h"

namespace mamba3::cuda {

namespace {
// Automatic block of rows: 128 Mi logits (512 MiB) at most, and no more rows than one product needs to be
// efficient. Every block adds its dW product into the f32 (Vp, D) gradient (a read and a write of it): 32 Mi logits
// made that 25 passes over the 154 MB gradient per 125M step (≈ 2 ms); 128 Mi makes it 7.
constexpr int64_t kMaxLogitFloats = int64_t(1) << 27;
constexpr int64_t kMaxBlockRows = 4096;
// bf16 logits: up to 1 Gi of them (2 GiB) per block, split evenly: a 125M step's 16384 rows × 50280 ids in one
// block (one logits product, one softmax launch, one dX and one dW product: no pass over the f32 dW per extra
// block, 154 MB read and written each), where 256 Mi made 4 blocks.
constexpr int64_t kMaxLogitsBf16 = int64_t(1) << 30;
constexpr int64_t kMaxBlockRowsBf16 = 32768;

// MAMBA3_TRAIN_LM_BLOCK_ROWS (read once): rows per block where the scratch names none; 0 or unset: automatic.
int64_t env_block_rows() {
  static const int64_t rows = env_integer("MAMBA3_TRAIN_LM_BLOCK_ROWS", 0, 0, int64_t(1) << 24);
  return rows;
}

int64_t block_rows(int64_t max_block_rows, bool bf16, int64_t N, int64_t Vp) {
  if (max_block_rows <= 0) max_block_rows = env_block_rows();
  if (max_block_rows > 0) return std::min(max_block_rows, N);
  if (!bf16) return std::min(std::clamp<int64_t>(kMaxLogitFloats / Vp, 1, kMaxBlockRows), N);
  const int64_t most = std::clamp<int64_t>(kMaxLogitsBf16 / Vp, 1, kMaxBlockRowsBf16);
  const int64_t blocks = (N + most - 1) / most;
  return (N + blocks - 1) / blocks;
}
}  // namespace

double lm_head_cross_entropy_gpu(const Context& ctx, TrainGemm& gemm, const float* hidden, int64_t N, int64_t D,
                                 const float* W, int64_t Vp, const int32_t* targets, double grad_scale,
                                 float* dhidden, float* dW, LmHeadScratch& scratch, const uint16_t* W16) {
  const double* total_dev =
      lm_head_cross_entropy_enqueue(ctx, gemm, hidden, N, D, W, Vp, targets, grad_scale, dhidden, dW, scratch, W16);
  if (!total_dev) return 0.0;
  double total = 0;
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(&total, total_dev, sizeof(double), cudaMemcpyDeviceToHost, ctx.stream()));
  MAMBA3_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  return total;
}

const double* lm_head_cross_entropy_enqueue(const Context& ctx, TrainGemm& gemm, const float* hidden, int64_t N,
                                            int64_t D, const float* W, int64_t Vp, const int32_t* targets,
                                            double grad_scale, float* dhidden, float* dW, LmHeadScratch& scratch,
                                            const uint16_t* W16) {
  MAMBA3_CHECK(N >= 0 && D > 0 && Vp > 0, "lm_head_cross_entropy_gpu: bad shape N {} D {} Vp {}", N, D, Vp);
  const bool with_grad = dhidden != nullptr;
  MAMBA3_CHECK(!with_grad || dW, "lm_head_cross_entropy_gpu: dhidden given without dW");
  if (N == 0) return nullptr;
  const bool bf16 = gemm.precision() == Precision::BF16;
  const int64_t block = block_rows(scratch.max_block_rows, bf16, N, Vp);
  scratch.row_loss.reserve(size_t(N) * sizeof(double));
  scratch.total.reserve(sizeof(double));
  double* row_loss = scratch.row_loss.as<double>();
  const cudaStream_t s = ctx.stream();
  if (bf16) {
    // The operands TrainGemm::run would round on every product (W three times per block) rounded once (W not at
    // all when its rounding is given). Each block: bf16 logits, the softmax's bf16 gradient over them in place, and
    // the two products reading that gradient.
    scratch.h16.reserve(size_t(N * D) * 2);
    scratch.logits16.reserve(size_t(block * Vp) * 2);
    uint16_t* h16 = scratch.h16.as<uint16_t>();
    uint16_t* logits16 = scratch.logits16.as<uint16_t>();
    const uint16_t* w16 = W16;
    if (!w16) {
      scratch.w16.reserve(size_t(Vp * D) * 2);
      f32_to_bf16_2d(s, W, Vp, D, D, scratch.w16.as<uint16_t>());
      w16 = scratch.w16.as<uint16_t>();
    }
    f32_to_bf16_2d(s, hidden, N, D, D, h16);
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t n = std::min(block, N - r0);
      const uint16_t* h = h16 + r0 * D;
      gemm.run_bf16_out(ctx, false, true, n, Vp, D, 1.0f, h, D, w16, D, logits16, Vp);  // (n, Vp)
      softmax_cross_entropy_rows_bf16_gpu(s, logits16, n, Vp, targets + r0, grad_scale, with_grad, row_loss + r0);
      if (!with_grad) continue;
      gemm.run_bf16(ctx, false, false, n, D, Vp, 1.0f, logits16, Vp, w16, D, 0.0f, dhidden + r0 * D, D);
      gemm.run_bf16(ctx, true, false, Vp, D, n, 1.0f, logits16, Vp, h, D, 1.0f, dW, D);
    }
  } else {
    scratch.logits.reserve(size_t(block * Vp) * sizeof(float));
    float* logits = scratch.logits.as<float>();
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t n = std::min(block, N - r0);
      const float* h = hidden + r0 * D;
      gemm.run(ctx, false, true, n, Vp, D, 1.0f, h, D, W, D, 0.0f, logits, Vp);  // (n, Vp)
      softmax_cross_entropy_rows_gpu(s, logits, n, Vp, targets + r0, grad_scale, with_grad, row_loss + r0);
      if (!with_grad) continue;
      gemm.run(ctx, false, false, n, D, Vp, 1.0f, logits, Vp, W, D, 0.0f, dhidden + r0 * D, D);  // dh = dlogits·W
      gemm.run(ctx, true, false, Vp, D, n, 1.0f, logits, Vp, h, D, 1.0f, dW, D);               // dW += dlogitsᵀ·h
    }
  }
  ordered_sum_gpu(s, row_loss, N, scratch.total.as<double>());
  return scratch.total.as<double>();
}

}  // namespace mamba3::cuda
