#pragma once
// GatedMLP of GPU training (spec §9.5), the math of train/gated_mlp_grad.h on device buffers, every matrix product
// through TrainGemm (so its precision mode applies):
//   [a, g] = x·fc1ᵀ; o = a ⊙ silu(g); y = o·fc2ᵀ.
//   Backward: do = dy·fc2, dfc2 += dyᵀ·o, da = do·silu(g), dg = do·a·silu′(g), dfc1 += [da, dg]ᵀ·x, dx = [da, dg]·fc1.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/cuda_context.h"
#include "cuda/train/train_gemm.h"

namespace mamba3::cuda {

// fc1 (2·d_ff, D), fc2 (D, d_ff), x and y (rows, D); h (rows, 2·d_ff) pre-activations and o (rows, d_ff) gated
// values are written and kept for the backward. x16 (optional, used in the bf16 mode only): x rounded to bf16 by its
// producer; the products read it instead of rounding x (x may then be null). fc1_16, fc2_16 (optional, the bf16 mode
// only): the weights rounded to bf16 (the parameter store's mirror), read instead of rounding fc1 / fc2 again. The
// same for the backward. Either way the same bits. y16 (optional, the bf16 mode only): y rounded once to bf16 there
// by fc2's product instead of f32 into y (y may then be null); likewise dx16 for the backward's dx.
void gated_mlp_forward_gpu(const Context& ctx, TrainGemm& gemm, const float* fc1, const float* fc2, int64_t D,
                           int64_t d_ff, const float* x, int64_t rows, float* h, float* o, float* y,
                           const uint16_t* x16 = nullptr, const uint16_t* fc1_16 = nullptr,
                           const uint16_t* fc2_16 = nullptr, uint16_t* y16 = nullptr);

// dx (rows, D) is overwritten; dfc1 and dfc2 are added to. scratch: rows·3·d_ff floats (contents lost).
// In the bf16 mode the forward keeps h as bf16 (fc1's product rounds its f32 accumulation once, as PyTorch autocast's
// bf16 linear output; in h's buffer) and o as bf16 (in o's buffer; the products read nothing else of it), and the
// backward writes [da, dg] as bf16: the products' operands without an f32 round trip. dy16 (optional): dy's bf16
// rounding written by its producer (the norm backward), read instead of rounding dy again.
void gated_mlp_backward_gpu(const Context& ctx, TrainGemm& gemm, const float* fc1, const float* fc2, int64_t D,
                            int64_t d_ff, const float* x, int64_t rows, const float* h, const float* o,
                            const float* dy, float* dx, float* dfc1, float* dfc2, float* scratch,
                            const uint16_t* x16 = nullptr, const uint16_t* fc1_16 = nullptr,
                            const uint16_t* fc2_16 = nullptr, const uint16_t* dy16 = nullptr,
                            uint16_t* dx16 = nullptr);

// The element-wise halves (exposed for tests and reuse):
// o[r, j] = h[r, j]·silu(h[r, d_ff + j]); with o16, rounded to bf16 into o16 (rows, d_ff) instead of o. With h16
// (rows, 2·d_ff bf16) the pre-activations are read from there instead of h (h unused, may be null).
void gated_silu_forward_gpu(cudaStream_t s, const float* h, int64_t rows, int64_t d_ff, float* o,
                            uint16_t* o16 = nullptr, const uint16_t* h16 = nullptr);
// In place on dh (rows, 2·d_ff): on entry dh[r, j] (j < d_ff) holds do[r, j]; on exit dh[r, :] = [da, dg]. With
// dh16, [da, dg] go rounded to bf16 into dh16 (rows, 2·d_ff) instead.
void gated_silu_backward_gpu(cudaStream_t s, const float* h, int64_t rows, int64_t d_ff, float* dh,
                             uint16_t* dh16 = nullptr, const uint16_t* h16 = nullptr);
// The same with every operand bf16: do16 (rows, d_ff), h16 (rows, 2·d_ff) in, dh16 (rows, 2·d_ff) = [da, dg] out
// (f32 arithmetic, each result rounded once). d_ff must be even.
void gated_silu_backward_bf16_gpu(cudaStream_t s, const uint16_t* do16, const uint16_t* h16, int64_t rows,
                                  int64_t d_ff, uint16_t* dh16);

// dst (cols, rows) = srcᵀ for a (rows, cols) matrix of bf16 bits (fc2's bf16 mirror as the fused do product's B).
void transpose_bf16_gpu(cudaStream_t s, const uint16_t* src, int64_t rows, int64_t cols, uint16_t* dst);

}  // namespace mamba3::cuda
