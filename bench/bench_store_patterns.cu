// Global-store patterns of one warp instruction on the GPU: the rate at which 6144 blocks of four warps write a
// 64 × 64 tile each (50 MB in bf16, 100 MB in f32) when every warp instruction writes its 16 rows in a given shape.
// Why the training kernels write whole rows instead of storing straight from mma fragments (docs/perf.md, twenty-fourth
// session): a store that touches 8 rows with 16 bytes each ran at a quarter of the coalesced rate on an H200.
// Usage: bench_store_patterns [repetitions]   (a table on stdout; needs a CUDA device)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>

namespace {

constexpr int kTiles = 6144, kTileElems = 64 * 64;

__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

enum Pattern {
  kBf16Fragments,   // 4 bytes per lane as mma fragments leave them: 16 bytes in each of 8 rows
  kBf16QuadRows,    // 16 bytes per lane after a quad exchange: 64 bytes in each of 8 rows
  kF32Fragments,    // 8 bytes per lane as fragments: 32 bytes in each of 8 rows
  kBf16OneRow,      // 2 bytes per lane: one row's 64 bytes
  kF32Strided,      // 4 bytes per lane at an 8-byte stride, half the lanes: one row's 128 bytes in two instructions
  kBf16Coalesced,   // 16 bytes per lane, whole rows
  kF32Coalesced,    // 16 bytes per lane, whole rows
  kPatterns
};
const char* const kNames[kPatterns] = {
    "bf16, 4 B/lane, 8 rows x 16 B (mma fragments)", "bf16, 16 B/lane, 8 rows x 64 B (quad exchange)",
    "f32, 8 B/lane, 8 rows x 32 B (mma fragments)",  "bf16, 2 B/lane, 1 row x 64 B",
    "f32, 4 B/lane at 8-B stride, 1 row x 64 B",     "bf16, 16 B/lane, whole rows",
    "f32, 16 B/lane, whole rows"};
bool is_f32(int pattern) { return pattern == kF32Fragments || pattern == kF32Strided || pattern == kF32Coalesced; }

// Block = one tile, warp w = its rows [16w, 16w + 16), lane = 4g + q as in an mma fragment.
template <int kPattern>
__global__ void __launch_bounds__(128) store_kernel(float* f32, uint16_t* b16, float v) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int64_t base = int64_t(blockIdx.x) * kTileElems + 16 * warp * 64;  // the warp's first element
  if constexpr (kPattern == kBf16Fragments) {
    uint32_t* o = reinterpret_cast<uint32_t*>(b16 + base + g * 64) + q;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) o[nt * 4] = bf16_pair(v, v + nt), o[nt * 4 + 8 * 32] = bf16_pair(v, v - nt);
  } else if constexpr (kPattern == kBf16QuadRows) {
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        *reinterpret_cast<uint4*>(b16 + base + (g + 8 * half) * 64 + (4 * j + q) * 8) =
            make_uint4(bf16_pair(v, v), j, half, 0);
  } else if constexpr (kPattern == kF32Fragments) {
    float* o = f32 + base + g * 64 + 2 * q;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      *reinterpret_cast<float2*>(o + nt * 8) = make_float2(v, v + nt);
      *reinterpret_cast<float2*>(o + nt * 8 + 8 * 64) = make_float2(v, v - nt);
    }
  } else if constexpr (kPattern == kBf16OneRow) {
#pragma unroll
    for (int k = 0; k < 32; ++k) reinterpret_cast<__nv_bfloat16*>(b16)[base + k * 32 + lane] = __float2bfloat16_rn(v + k);
  } else if constexpr (kPattern == kF32Strided) {
#pragma unroll
    for (int k = 0; k < 32; ++k)
#pragma unroll
      for (int m = 0; m < 2; ++m)
        if (lane < 16) f32[base + k * 32 + 2 * lane + m] = v + k;
  } else if constexpr (kPattern == kBf16Coalesced) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      reinterpret_cast<uint4*>(b16 + base)[k * 32 + lane] = make_uint4(bf16_pair(v, v), k, 0, 0);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) reinterpret_cast<float4*>(f32 + base)[k * 32 + lane] = make_float4(v, v + k, v, v);
  }
}

bool check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "bench_store_patterns: %s: %s\n", what, cudaGetErrorString(e));
  return false;
}

template <int kPattern>
bool measure(float* f32, uint16_t* b16, int reps, cudaEvent_t e0, cudaEvent_t e1) {
  for (int w = 0; w < 3; ++w) store_kernel<kPattern><<<kTiles, 128>>>(f32, b16, 1.0f);
  cudaEventRecord(e0);
  for (int r = 0; r < reps; ++r) store_kernel<kPattern><<<kTiles, 128>>>(f32, b16, 1.0f);
  cudaEventRecord(e1);
  if (!check(cudaEventSynchronize(e1), kNames[kPattern]) || !check(cudaGetLastError(), kNames[kPattern])) return false;
  float ms = 0.0f;
  cudaEventElapsedTime(&ms, e0, e1);
  const double us = 1e3 * ms / reps, mb = (is_f32(kPattern) ? 4.0 : 2.0) * kTiles * kTileElems / 1e6;
  std::printf("| %-48s | %7.1f | %6.1f | %5.2f |\n", kNames[kPattern], us, mb, mb / us);
  return true;
}

template <int... kP>
bool measure_all(std::integer_sequence<int, kP...>, float* f32, uint16_t* b16, int reps, cudaEvent_t e0,
                 cudaEvent_t e1) {
  return (measure<kP>(f32, b16, reps, e0, e1) && ...);
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  if (reps < 1) {
    std::fprintf(stderr, "bench_store_patterns: repetitions must be >= 1 (got '%s')\n", argv[1]);
    return 2;
  }
  cudaDeviceProp prop{};
  if (!check(cudaGetDeviceProperties(&prop, 0), "no CUDA device")) return 1;
  float* f32 = nullptr;
  uint16_t* b16 = nullptr;
  if (!check(cudaMalloc(&f32, size_t(kTiles) * kTileElems * 4), "cudaMalloc") ||
      !check(cudaMalloc(&b16, size_t(kTiles) * kTileElems * 2), "cudaMalloc"))
    return 1;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0), cudaEventCreate(&e1);
  std::printf("%s: %d blocks x 4 warps, each warp 16 rows x 64 columns, mean of %d calls\n", prop.name, kTiles, reps);
  std::printf("| pattern (one warp store instruction) | us/call | MB | TB/s |\n|---|---|---|---|\n");
  const bool ok = measure_all(std::make_integer_sequence<int, kPatterns>{}, f32, b16, reps, e0, e1);
  cudaFree(f32), cudaFree(b16);
  return ok ? 0 : 1;
}
