#include "cuda/gpu_matrix.h"

#include <vector>

#include "cuda/basic_kernels.h"
#include "cuda/env_switch.h"
#include "cuda/gemm_tuner.h"
#include "cuda/gemv_small_m.h"
#include "cuda/stream_gemm.h"

namespace mamba3::cuda {

GpuMatrix GpuMatrix::upload(const Tensor& w, Precision precision, const Tensor* bias) {
  MAMBA3_CHECK(w.ndim() == 2, "GpuMatrix: weight must be 2-D, got {}", shape_str(w.shape()));
  GpuMatrix m;
  m.n = w.dim(0);
  m.k = w.dim(1);
  m.precision = precision;
  const DType dt = precision == Precision::F32 ? DType::F32 : DType::BF16;
  Tensor host = w.to(dt);
  m.weight = DeviceBuffer(host.nbytes());
  m.weight.upload(host.raw(), host.nbytes());
  if (bias && bias->defined()) {
    check_shape(*bias, {m.n}, "GpuMatrix: bias");
    m.bias = upload_f32(*bias);
  }
  return m;
}

DeviceBuffer upload_f32(const Tensor& t) {
  Tensor host = t.to(DType::F32);
  DeviceBuffer b(host.nbytes());
  if (host.nbytes()) b.upload(host.raw(), host.nbytes());
  return b;
}

void linear(const Context& ctx, const GpuMatrix& w, const void* x, int64_t m, float* y, int64_t x_stride,
            int64_t y_stride) {
  if (m == 0) return;
  const int64_t ldx = x_stride ? x_stride : w.k, ldy = y_stride ? y_stride : w.n;
  const float one = 1.0f, zero = 0.0f;
  // Column-major view: yᵀ (N × M) = W (K × N, transposed) · xᵀ (K × M).
  const bool f32 = w.precision == Precision::F32;
  auto gemm = [&](const void* xb, int64_t rows, float* yb) {
    if (!f32) return gemm_bf16(ctx, w.weight.raw(), xb, yb, GemmShape{w.n, w.k, rows, ldx, ldy});
    MAMBA3_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, int(w.n), int(rows), int(w.k), &one,
                                     w.weight.raw(), CUDA_R_32F, int(w.k), xb, CUDA_R_32F, int(ldx), &zero, yb,
                                     CUDA_R_32F, int(ldy), CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
  };
  if (const int64_t block = ctx.gemm_row_block(); block > 0) {
    // Always `block` rows per call (the last block padded: the caller's buffers hold padded_rows(m) rows).
    const size_t elem = activation_size(w.precision);
    for (int64_t r0 = 0; r0 < m; r0 += block)
      gemm(static_cast<const char*>(x) + size_t(r0 * ldx) * elem, block, y + r0 * ldy);
  } else if (!f32 && stream_gemm_preferred(m) && stream_gemm_supported(ctx, m, w.n, w.k, ldx, w.weight.raw(), x)) {
    stream_gemm(ctx, w.weight.raw(), w.n, w.k, x, m, ldx, y, ldy);
  } else if (!f32 && m <= kGemvPreferredRows && gemv_small_m_supported(m, w.k, ldx, w.weight.raw(), x)) {
    gemv_small_m(ctx.stream(), w.weight.raw(), w.n, w.k, x, m, ldx, y, ldy);
  } else {
    gemm(x, m, y);
  }
  if (!w.bias.empty()) add_bias(ctx.stream(), y, m, w.n, ldy, w.bias.as<float>());
}

namespace {

// MAMBA3_GEMV_GATED=0 keeps the activation kernel after the matrix-vector product and the stream GEMM (A/B runs).
// Read once.
bool gated_gemv_enabled() {
  static const bool on = env_choice("MAMBA3_GEMV_GATED", {"0", "1"}) != "0";
  return on;
}

}  // namespace

void linear_gated_silu(const Context& ctx, const GpuMatrix& w, const void* x, int64_t m, float* y, void* act,
                       Precision act_precision) {
  if (m == 0) return;
  MAMBA3_CHECK(w.n % 2 == 0, "linear_gated_silu: {} output rows are not (value, gate) pairs", w.n);
  const bool fusable = w.precision == Precision::BF16 && act_precision == Precision::BF16 && w.bias.empty() &&
                       ctx.gemm_row_block() == 0 && gated_gemv_enabled();
  // Same route order as linear(): the stream GEMM where it is preferred (b4 on the H200: 1.286 ms/step through it
  // against 1.399 through the matrix-vector kernel), then the matrix-vector kernel.
  if (fusable && stream_gemm_preferred(m) &&
      stream_gemm_gated_pairs_supported(ctx, m, w.n, w.k, w.k, w.weight.raw(), x)) {
    stream_gemm_gated_pairs(ctx, w.weight.raw(), w.n, w.k, x, m, w.k, act);
    return;
  }
  if (fusable && m <= kGemvPairsMaxRows && gemv_small_m_supported(m, w.k, w.k, w.weight.raw(), x)) {
    gemv_small_m_gated_pairs(ctx.stream(), w.weight.raw(), w.n, w.k, x, m, w.k, act);
    return;
  }
  linear(ctx, w, x, m, y);
  gated_silu(ctx.stream(), y, m, w.n / 2, act, act_precision);
}

bool folded_norm_supported(const Context& ctx, const GpuMatrix& w, int64_t rows) {
  if (w.precision != Precision::BF16 || !w.bias.empty() || ctx.gemm_row_block() != 0 ||
      reinterpret_cast<uintptr_t>(w.weight.raw()) % 16 != 0)
    return false;
  if (rows == 1) return !stream_gemm_preferred(1) && w.k % 8 == 0;
  return stream_gemm_folds_preferred(rows) && stream_gemm_folds_norms(ctx, rows, w.n, w.k);
}

int64_t folded_norm_parts(const Context& ctx, const GpuMatrix& w, int64_t rows) {
  return rows == 1 ? gemv_norm_parts(w.n, w.k) : stream_gemm_norm_parts(ctx, w.n, w.k);
}

void linear_residual_norm(const Context& ctx, const GpuMatrix& w, const void* x, int64_t rows,
                          const GemvResidualNorm& out) {
  if (rows == 1) return gemv_small_m_residual_norm(ctx.stream(), w.weight.raw(), w.n, w.k, x, out);
  stream_gemm_residual_norm(ctx, w.weight.raw(), w.n, w.k, x, rows, w.k, out);
}

void linear_scaled(const Context& ctx, const GpuMatrix& w, const void* x, int64_t rows, float* y,
                   const GemvRowScale& in) {
  if (rows == 1) return gemv_small_m_scaled(ctx.stream(), w.weight.raw(), w.n, w.k, x, y, in);
  stream_gemm_scaled(ctx, w.weight.raw(), w.n, w.k, x, rows, w.k, y, w.n, in);
}

void linear_gated_silu_scaled(const Context& ctx, const GpuMatrix& w, const void* x, int64_t rows, void* act,
                              const GemvRowScale& in) {
  if (rows == 1) return gemv_small_m_gated_pairs_scaled(ctx.stream(), w.weight.raw(), w.n, w.k, x, act, in);
  stream_gemm_gated_pairs_scaled(ctx, w.weight.raw(), w.n, w.k, x, rows, w.k, act, in);
}

}  // namespace mamba3::cuda
