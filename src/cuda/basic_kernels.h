#pragma once
// Small fused kernels of the language model around the matrix products: embedding gather, residual add + norm,
// GatedMLP activation, bias, dtype conversion. Activations written for a matrix product are f32 (Precision::F32)
// or bf16 (Precision::BF16); everything else is f32.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/cuda_context.h"

namespace mamba3::cuda {

// y[i, :] += bias for m rows of n (row stride ld).
void add_bias(cudaStream_t s, float* y, int64_t m, int64_t n, int64_t ld, const float* bias);

// out[i, :] = table[ids[i], :] (table (V, D) in the precision's dtype), as f32.
void embed(cudaStream_t s, const int32_t* ids, int64_t rows, const void* table, Precision table_precision, int64_t d,
           float* out);

// residual ← hidden + residual (first: residual ← hidden); out ← Norm(residual)·w (+ b) in `out_precision`.
// RMSNorm when b is null, LayerNorm (biased variance) otherwise; eps as given. Computed in f32 from the f32 sum.
void add_norm(cudaStream_t s, const float* hidden, float* residual, int64_t rows, int64_t d, bool first,
              const float* w, const float* b, float eps, void* out, Precision out_precision);

// GatedMLP: in (rows, 2F) = F (y, gate) pairs, y_j at column 2j and gate_j at 2j + 1 (fc1's rows interleaved at
// upload: interleave_gate_rows in cuda_model.cpp) → out (rows, F) = y ⊙ silu(gate).
void gated_silu(cudaStream_t s, const float* in, int64_t rows, int64_t f, void* out, Precision out_precision);

// n floats → the precision's activation dtype (a copy for F32).
void to_activation(cudaStream_t s, const float* in, int64_t n, void* out, Precision out_precision);
// n bf16 values (bits) → f32 (exact).
void bf16_to_f32(cudaStream_t s, const uint16_t* in, int64_t n, float* out);

}  // namespace mamba3::cuda
