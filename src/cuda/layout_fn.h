#pragma once
// MAMBA3_LAYOUT_FN: the qualifiers of index arithmetic shared by a kernel and its host test (stream_gemm_layout.h,
// train/fused_gemm_layout.h): host and device, inlined, constexpr under nvcc; inline constexpr in plain C++.
#if defined(__CUDACC__)
#define MAMBA3_LAYOUT_FN __host__ __device__ __forceinline__ constexpr
#else
#define MAMBA3_LAYOUT_FN inline constexpr
#endif
