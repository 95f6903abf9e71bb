#include "cuda/cuda_context.h"

#include <fmt/format.h>

#include <string>

#include "cuda/env_switch.h"
#include "cuda/gemm_tuner.h"
#include "cuda/pdl.h"

namespace mamba3::cuda {

void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw Error(fmt::format("CUDA error '{}' ({}) in {} at {}:{}", cudaGetErrorString(err), int(err), what, file, line));
}

void throw_cublas_error(cublasStatus_t status, const char* what, const char* file, int line) {
  throw Error(fmt::format("cuBLAS error '{}' in {} at {}:{}", cublasGetStatusString(status), what, file, line));
}

const char* precision_name(Precision p) { return p == Precision::F32 ? "f32" : "bf16"; }

Precision parse_precision(const std::string& name) {
  if (name == "f32") return Precision::F32;
  if (name == "bf16") return Precision::BF16;
  fail("precision: '{}' is not one of f32, bf16", name);
}

DeviceInfo device_info() {
  DeviceInfo d;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    d.why_not = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return d;
  }
  if (count == 0) {
    d.why_not = "no CUDA device";
    return d;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    d.why_not = "cudaGetDeviceProperties failed";
    return d;
  }
  d.available = true;
  d.name = prop.name;
  d.sm_count = prop.multiProcessorCount;
  d.cc_major = prop.major;
  d.cc_minor = prop.minor;
  d.memory_bytes = prop.totalGlobalMem;
  d.l2_bytes = size_t(prop.l2CacheSize);
  return d;
}

Context::Context() : info_(device_info()) {
  MAMBA3_CHECK(info_.available, "--device cuda: no usable CUDA device ({})", info_.why_not);
  MAMBA3_CUDA_CHECK(cudaSetDevice(0));
  MAMBA3_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MAMBA3_CUBLAS_CHECK(cublasCreate(&cublas_));
  MAMBA3_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  // A fixed workspace keeps cuBLAS from allocating inside captured graphs.
  const size_t workspace = size_t(32) << 20;
  MAMBA3_CUDA_CHECK(cudaMalloc(&cublas_workspace_, workspace));
  MAMBA3_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_, workspace));
}

GemmTuner& Context::gemm_tuner() const {
  if (!gemm_tuner_) {
    // cuBLASLt gets its own workspace: a split-K algorithm keeps counters there, and nothing cuBLAS documents says
    // they survive cuBLAS's other kernels writing the same bytes.
    const size_t workspace = size_t(32) << 20;
    MAMBA3_CUBLAS_CHECK(cublasLtCreate(&cublas_lt_));
    MAMBA3_CUDA_CHECK(cudaMalloc(&cublas_lt_workspace_, workspace));
    gemm_tuner_ =
        std::make_unique<GemmTuner>(stream_, cublas_, cublas_lt_, cublas_lt_workspace_, workspace, info_.l2_bytes);
  }
  return *gemm_tuner_;
}

Context::~Context() {
  gemm_tuner_.reset();  // its plans' descriptors go before the handles
  if (cublas_lt_) cublasLtDestroy(cublas_lt_);
  if (cublas_lt_workspace_) cudaFree(cublas_lt_workspace_);
  if (cublas_) cublasDestroy(cublas_);
  if (cublas_workspace_) cudaFree(cublas_workspace_);
  if (stream_) cudaStreamDestroy(stream_);
}

size_t device_memory_in_use() {
  size_t free_bytes = 0, total_bytes = 0;
  MAMBA3_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return total_bytes - free_bytes;
}

bool pdl_enabled() {
  static const bool enabled = env_choice("MAMBA3_PDL", {"0", "1"}) != "0";
  return enabled;
}

int64_t pdl_max_rows() {
  static const int64_t rows = env_integer("MAMBA3_PDL_MAX_ROWS", kPdlMaxRows, 0, int64_t(1) << 30);
  return rows;
}

bool train_pdl_enabled() {
  static const bool enabled = env_choice("MAMBA3_TRAIN_PDL", {"0", "1"}) != "0";
  return enabled;
}

}  // namespace mamba3::cuda
