#pragma once
// Parameters on the device, and y = x·Wᵀ (+ b) through cuBLAS.
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/gemv_small_m.h"

namespace mamba3::cuda {

// The element type activations have when they enter a matrix product in this precision (f32 or bf16).
inline size_t activation_size(Precision p) { return p == Precision::F32 ? 4 : 2; }

// A weight matrix W (N rows = outputs, K columns = inputs), stored in the precision's dtype, with an optional f32
// bias of N.
struct GpuMatrix {
  DeviceBuffer weight, bias;
  int64_t n = 0, k = 0;
  Precision precision = Precision::F32;

  // Converts any float tensor of shape (N, K) (and bias (N)) on upload.
  static GpuMatrix upload(const Tensor& w, Precision precision, const Tensor* bias = nullptr);
  size_t nbytes() const { return weight.bytes() + bias.bytes(); }
};

// A vector of f32 parameters (norm weights, biases, per-head scalars).
DeviceBuffer upload_f32(const Tensor& t);

// y (M, N) f32 = x (M, K) · Wᵀ (+ bias). x holds activations of W's precision, rows `x_stride` elements apart
// (K when packed); y rows are `y_stride` floats apart (N when packed). With ctx.gemm_row_block() set, every cuBLAS
// call has exactly that many rows (x and y must hold ctx.padded_rows(M) rows; the padding rows' y is meaningless).
// bf16 products that do not take the small-batch kernel (gemv_small_m.h) go through gemm_bf16 (gemm_tuner.h: cuBLAS's
// default algorithm, or with MAMBA3_GEMM_TUNE=1 the one timed fastest for their shape).
void linear(const Context& ctx, const GpuMatrix& w, const void* x, int64_t m, float* y, int64_t x_stride = 0,
            int64_t y_stride = 0);

// The GatedMLP's first half: act (M, N/2) = y_2j ⊙ silu(y_2j+1) for y = x · Wᵀ, W's rows (value, gate) pairs. At
// batch 1–4 in bf16 one fused matrix-vector launch (gemv_small_m_gated_pairs), at the stream GEMM's rows one fused
// stream GEMM when its tiles are unsplit (stream_gemm_gated_pairs); otherwise linear() into y (M, N f32, scratch)
// and gated_silu(). x packed (K apart); act in `act_precision`, packed.
void linear_gated_silu(const Context& ctx, const GpuMatrix& w, const void* x, int64_t m, float* y, void* act,
                       Precision act_precision);

// RMSNorm folded into a decode step's products (gemv_small_m.h at one row, stream_gemm.h at 65–128 rows): the product
// before a norm (P: out_proj, fc2) adds the residual and writes the norm's bf16(v ⊙ g) and partial sums, the product
// after it (C: in_proj, fc1) scales by the rows' rstd. Whether these take W at `rows` rows (x: packed bf16, 16-byte
// aligned as every device buffer is; the calls check it):
bool folded_norm_supported(const Context& ctx, const GpuMatrix& w, int64_t rows);
// The partials P writes at this row count (the parts C sums: GemvRowScale::parts).
int64_t folded_norm_parts(const Context& ctx, const GpuMatrix& w, int64_t rows);
// P: residual (rows, N) += x·Wᵀ, out.out16 = bf16(residual ⊙ out.weight), partials.
void linear_residual_norm(const Context& ctx, const GpuMatrix& w, const void* x, int64_t rows,
                          const GemvResidualNorm& out);
// C: y (rows, N) f32 = rstd ⊙ x·Wᵀ; and the GatedMLP form act (rows, N/2) bf16.
void linear_scaled(const Context& ctx, const GpuMatrix& w, const void* x, int64_t rows, float* y,
                   const GemvRowScale& in);
void linear_gated_silu_scaled(const Context& ctx, const GpuMatrix& w, const void* x, int64_t rows, void* act,
                              const GemvRowScale& in);

}  // namespace mamba3::cuda
