#pragma once
// GatedMLP (spec §9.5) for training: forward keeping its activations, and backward.
// [a, g] = x·fc1ᵀ; o = a ⊙ silu(g); y = o·fc2ᵀ.  Backward: do = dy·fc2, dfc2 += dyᵀ·o, da = do·silu(g),
// dg = do·a·silu′(g) with silu′(g) = σ(g)·(1 + g·(1 − σ(g))), dfc1 += [da, dg]ᵀ·x, dx = [da, dg]·fc1.
#include <cstdint>

namespace mamba3 {

// x, y: (rows, D); h: (rows, 2·d_ff) pre-activations (written); o: (rows, d_ff) gated values (written).
void gated_mlp_train_forward(const float* fc1, const float* fc2, int64_t D, int64_t d_ff, const float* x,
                             int64_t rows, float* h, float* o, float* y);
// dx (rows, D) is overwritten; dfc1 (2·d_ff, D) and dfc2 (D, d_ff) are added to.
void gated_mlp_train_backward(const float* fc1, const float* fc2, int64_t D, int64_t d_ff, const float* x,
                              int64_t rows, const float* h, const float* o, const float* dy, float* dx, float* dfc1,
                              float* dfc2);

}  // namespace mamba3
