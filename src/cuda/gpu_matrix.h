#pragma once
// Parameters on the device, and y = x·Wᵀ (+ b) through cuBLAS.
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"

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

}  // namespace mamba3::cuda
