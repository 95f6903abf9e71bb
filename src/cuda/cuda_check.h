#pragma once
// One checking path for every CUDA runtime and cuBLAS call and every kernel launch: failures throw mamba3::Error
// with the call's text and place (the library never aborts).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace mamba3::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* what, const char* file, int line);

}  // namespace mamba3::cuda

#define MAMBA3_CUDA_CHECK(expr)                                                         \
  do {                                                                                  \
    cudaError_t mamba3_err_ = (expr);                                                   \
    if (mamba3_err_ != cudaSuccess)                                                     \
      ::mamba3::cuda::throw_cuda_error(mamba3_err_, #expr, __FILE__, __LINE__);         \
  } while (0)

#define MAMBA3_CUBLAS_CHECK(expr)                                                       \
  do {                                                                                  \
    cublasStatus_t mamba3_st_ = (expr);                                                 \
    if (mamba3_st_ != CUBLAS_STATUS_SUCCESS)                                            \
      ::mamba3::cuda::throw_cublas_error(mamba3_st_, #expr, __FILE__, __LINE__);        \
  } while (0)

// After a <<<…>>> launch: catches bad launch configurations at once (asynchronous faults surface at the next sync).
#define MAMBA3_LAUNCH_CHECK() MAMBA3_CUDA_CHECK(cudaGetLastError())
