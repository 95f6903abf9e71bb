#pragma once
// The standalone CUDA benchmarks' check: a failed runtime call prints its place and error and ends the program. They
// link none of the engine's libraries (so not MAMBA3_CUDA_CHECK, which throws the engine's Error).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define BENCH_CUDA_CHECK(x)                                                            \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)
