#include "cuda/train/gated_mlp_train_gpu.h"

#include "cuda/train/fused_gemm.h"

namespace mamba3::cuda {

void gated_mlp_forward_gpu(const Context& ctx, TrainGemm& gemm, const float* fc1, const float* fc2, int64_t D,
                           int64_t d_ff, const float* x, int64_t rows, float* h, float* o, float* y,
                           const uint16_t* x16, const uint16_t* fc1_16, const uint16_t* fc2_16, uint16_t* y16) {
  if (rows <= 0) return;
  if (gemm.precision() == Precision::BF16) {  // h and o kept as bf16 in their buffers
    uint16_t *h16 = reinterpret_cast<uint16_t*>(h), *o16 = reinterpret_cast<uint16_t*>(o);
    // fc1 and the activation in one product where the operands are there in bf16 (fused_gemm.h: o from the same
    // rounded h, the activation kernel's bits), else cuBLAS and the activation kernel.
    if (x16 && fc1_16 && fused_gemm_enabled() &&
        fused_gemm_gated_forward_supported(x16, D, fc1_16, D, d_ff, h16, o16)) {
      fused_gemm_gated_forward(ctx.stream(), x16, D, fc1_16, rows, D, d_ff, h16, o16);
    } else {
      gemm.run_mixed_bf16_out(ctx, false, true, rows, 2 * d_ff, D, 1.0f, x, x16, D, fc1, fc1_16, D, h16, 2 * d_ff);
      gated_silu_forward_gpu(ctx.stream(), nullptr, rows, d_ff, nullptr, o16, h16);
    }
    if (y16)
      gemm.run_mixed_bf16_out(ctx, false, true, rows, D, d_ff, 1.0f, nullptr, o16, d_ff, fc2, fc2_16, d_ff, y16, D);
    else
      gemm.run_mixed(ctx, false, true, rows, D, d_ff, 1.0f, nullptr, o16, d_ff, fc2, fc2_16, d_ff, 0.0f, y, D);
    return;
  }
  gemm.run(ctx, false, true, rows, 2 * d_ff, D, 1.0f, x, D, fc1, D, 0.0f, h, 2 * d_ff);  // h (rows, 2·d_ff)
  gated_silu_forward_gpu(ctx.stream(), h, rows, d_ff, o);                               // o (rows, d_ff)
  gemm.run(ctx, false, true, rows, D, d_ff, 1.0f, o, d_ff, fc2, d_ff, 0.0f, y, D);      // y (rows, D)
}

void gated_mlp_backward_gpu(const Context& ctx, TrainGemm& gemm, const float* fc1, const float* fc2, int64_t D,
                            int64_t d_ff, const float* x, int64_t rows, const float* h, const float* o,
                            const float* dy, float* dx, float* dfc1, float* dfc2, float* scratch,
                            const uint16_t* x16, const uint16_t* fc1_16, const uint16_t* fc2_16,
                            const uint16_t* dy16, uint16_t* dx16) {
  if (rows <= 0) return;
  const int64_t F2 = 2 * d_ff;
  const bool bf16 = gemm.precision() == Precision::BF16;
  // The bf16 mode (d_ff even): do = dy·fc2 rounded to bf16 by its product (as PyTorch autocast's linear backward
  // gives it) at the scratch's start, [da, dg] as bf16 after the f32 rows' room (rows·d_ff floats hold rows·2·d_ff
  // bf16 values). Odd d_ff: do in f32 in the first half of each scratch row (stride 2·d_ff), turned into [da, dg] in
  // place (f32 mode) or into the bf16 rows.
  const bool do16 = bf16 && d_ff % 2 == 0;
  uint16_t* const dh16 = bf16 ? reinterpret_cast<uint16_t*>(scratch + rows * F2) : nullptr;
  // The do product with the activation's backward in its epilogue (fused_gemm.h) where dy and fc2 are there in bf16:
  // fc2ᵀ's bf16 copy goes where do would have gone (D·d_ff ≤ 4·rows·d_ff bf16 values), and [da, dg] come out with
  // the activation kernel's bits from the same do.
  uint16_t* const w2t = reinterpret_cast<uint16_t*>(scratch);
  const bool fused = do16 && dy16 && fc2_16 && fused_gemm_enabled() && D <= 4 * rows &&
                     fused_gemm_gated_backward_supported(dy16, D, w2t, D, d_ff, h, dh16);
  {
    const TrainGemm::HeldA held(gemm, ctx, dy, dy16, rows, D, D);  // rounded once (or given) for both products
    if (bf16)  // dfc2 += dyᵀ·o (D, d_ff), o kept as bf16 by the forward
      gemm.run_mixed(ctx, true, false, D, d_ff, rows, 1.0f, dy, nullptr, D, nullptr,
                     reinterpret_cast<const uint16_t*>(o), d_ff, 1.0f, dfc2, d_ff);
    else
      gemm.run(ctx, true, false, D, d_ff, rows, 1.0f, dy, D, o, d_ff, 1.0f, dfc2, d_ff);
    if (fused) {
      transpose_bf16_gpu(ctx.stream(), fc2_16, D, d_ff, w2t);
      fused_gemm_gated_backward(ctx.stream(), dy16, D, w2t, rows, D, d_ff, reinterpret_cast<const uint16_t*>(h), dh16);
    } else if (do16)
      gemm.run_mixed_bf16_out(ctx, false, false, rows, d_ff, D, 1.0f, dy, nullptr, D, fc2, fc2_16, d_ff,
                              reinterpret_cast<uint16_t*>(scratch), d_ff);
    else
      gemm.run_mixed(ctx, false, false, rows, d_ff, D, 1.0f, dy, nullptr, D, fc2, fc2_16, d_ff, 0.0f, scratch, F2);
  }
  if (bf16) {
    const uint16_t* h16 = reinterpret_cast<const uint16_t*>(h);
    if (!fused) {  // (fused: [da, dg] written by the product)
      if (do16)
        gated_silu_backward_bf16_gpu(ctx.stream(), reinterpret_cast<const uint16_t*>(scratch), h16, rows, d_ff, dh16);
      else
        gated_silu_backward_gpu(ctx.stream(), nullptr, rows, d_ff, scratch, dh16, h16);
    }
    gemm.run_mixed(ctx, true, false, F2, D, rows, 1.0f, nullptr, dh16, F2, x, x16, D, 1.0f, dfc1, D);
    if (dx16)
      gemm.run_mixed_bf16_out(ctx, false, false, rows, D, F2, 1.0f, nullptr, dh16, F2, fc1, fc1_16, D, dx16, D);
    else
      gemm.run_mixed(ctx, false, false, rows, D, F2, 1.0f, nullptr, dh16, F2, fc1, fc1_16, D, 0.0f, dx, D);
    return;
  }
  gated_silu_backward_gpu(ctx.stream(), h, rows, d_ff, scratch);                      // dh (rows, 2·d_ff)
  const TrainGemm::HeldA held_dh(gemm, ctx, scratch, rows, F2, F2);
  gemm.run(ctx, true, false, F2, D, rows, 1.0f, scratch, F2, x, D, 1.0f, dfc1, D);    // dfc1 += dhᵀ·x (2·d_ff, D)
  gemm.run(ctx, false, false, rows, D, F2, 1.0f, scratch, F2, fc1, D, 0.0f, dx, D);   // dx = dh·fc1 (rows, D)
}

}  // namespace mamba3::cuda
