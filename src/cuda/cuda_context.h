#pragma once
// The device, its stream and cuBLAS handles, and the numeric mode of the CUDA backend.
#include <cublasLt.h>

#include <cstddef>
#include <memory>
#include <string>

#include "cuda/cuda_check.h"

namespace mamba3::cuda {

// F32: the exact mode — weights and activations f32, cuBLAS in pedantic f32 (no TF32), for comparisons with the
// CPU and the golden data. BF16: weights and matrix-product inputs bf16 with f32 accumulation (the official GPU
// convention). In both, the residual stream, matrix-product outputs and the Mamba-3 states are f32.
enum class Precision { F32, BF16 };
const char* precision_name(Precision p);
Precision parse_precision(const std::string& name);  // "f32" | "bf16"; throws naming the value

struct DeviceInfo {
  bool available = false;
  std::string name;          // "NVIDIA H100 80GB HBM3"
  std::string why_not;       // when !available: the driver's answer
  int sm_count = 0, cc_major = 0, cc_minor = 0;
  size_t memory_bytes = 0, l2_bytes = 0;
};
// Device 0, or available = false when there is no usable device (no driver, no GPU). Never throws.
DeviceInfo device_info();
// Bytes of the current device's memory in use now (total − free: this process's allocations and context, and any
// other process's), for reports such as `mamba3 bench --train`.
size_t device_memory_in_use();

class GemmTuner;

// Owns a non-blocking stream, a cuBLAS and a cuBLASLt handle used on it, and the tuned matrix-product plans
// (gemm_tuner.h). Not thread-safe: one per model.
class Context {
 public:
  Context();  // throws mamba3::Error when no device is usable
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  // The bf16 products' per-shape algorithm cache (with its cuBLASLt handle and workspace, made on first use: only
  // MAMBA3_GEMM_TUNE=1 runs products through it); it changes through a const Context, as the stream's work does.
  GemmTuner& gemm_tuner() const;
  const DeviceInfo& info() const { return info_; }
  void sync() const { MAMBA3_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  // Fixed-shape matrix products (0: off). When set, linear() (gpu_matrix.h) calls cuBLAS with exactly this many rows
  // per call, padding the last block, so a row's result never depends on how many rows share the call (the server's
  // exact batched prefill: prompts prefilled together equal prompts prefilled alone). Buffers that linear() reads
  // or writes must then hold padded_rows(m) rows. Set for the duration of a call by RowBlockScope.
  int64_t gemm_row_block() const { return gemm_row_block_; }
  int64_t padded_rows(int64_t m) const {
    return gemm_row_block_ > 0 ? (m + gemm_row_block_ - 1) / gemm_row_block_ * gemm_row_block_ : m;
  }

 private:
  friend class RowBlockScope;
  mutable int64_t gemm_row_block_ = 0;
  DeviceInfo info_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_workspace_ = nullptr;
  mutable cublasLtHandle_t cublas_lt_ = nullptr;
  mutable void* cublas_lt_workspace_ = nullptr;
  mutable std::unique_ptr<GemmTuner> gemm_tuner_;
};

// Sets ctx's matrix-product row block for the lifetime of the scope (restores the previous value).
class RowBlockScope {
 public:
  RowBlockScope(const Context& ctx, int64_t rows) : ctx_(ctx), saved_(ctx.gemm_row_block_) {
    ctx.gemm_row_block_ = rows;
  }
  ~RowBlockScope() { ctx_.gemm_row_block_ = saved_; }
  RowBlockScope(const RowBlockScope&) = delete;
  RowBlockScope& operator=(const RowBlockScope&) = delete;

 private:
  const Context& ctx_;
  int64_t saved_;
};

}  // namespace mamba3::cuda
