#include <cuda_bf16.h>

#include "cuda/cuda_check.h"
#include "cuda/gemv_small_m.h"
#include "cuda/pdl.h"

namespace mamba3::cuda {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ void accumulate(const uint4& wv, const uint4& xv, float& acc) {
  const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv);
  const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __bfloat1622float2(w2[i]), b = __bfloat1622float2(x2[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

// Pieces (16 bytes of a weight row) each lane requests at once. A window of 8–16 (to fill the memory pipe with few
// warps) measured slower on an H200 (1.5B decode b1 1.76 vs 1.58 ms with the other changes of that run): its 97
// registers cut the blocks per SM to 2, and the GEMVs of a batch-1 step are too short to make up for that. Kept at 2.
template <int M>
__host__ __device__ constexpr int pieces_in_flight() {
  return 2;
}

// Warp w of block b computes output column n = b·8 + w for all M rows: lanes stride over K in 8-element (16-byte)
// pieces, U of them requested at once, then a warp reduction per row. Each row's terms are added in the order of
// the pieces (i = lane, lane + 32, …) whatever M and U are, so a row's result does not depend on its batch.
template <int M>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const __nv_bfloat16* __restrict__ w, int64_t n, int64_t k,
                                                          const __nv_bfloat16* __restrict__ x, int64_t x_stride,
                                                          float* __restrict__ y, int64_t y_stride) {
  constexpr int U = pieces_in_flight<M>();
  const int lane = threadIdx.x % 32;
  const int64_t col = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (col >= n) return;  // before any memory access: safe under PDL
  const uint4* wrow = reinterpret_cast<const uint4*>(w + col * k);
  const int64_t pieces = k / 8;
  float acc[M];
#pragma unroll
  for (int r = 0; r < M; ++r) acc[r] = 0.0f;
  pdl_trigger();
  // The first window of weights is requested before waiting for the kernel that writes x (weights never change).
  uint4 wv[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = lane + 32 * u;
    wv[u] = i < pieces ? __ldcs(wrow + i) : make_uint4(0, 0, 0, 0);  // streamed: read once, keep out of L1
  }
  pdl_wait();
  for (int64_t base = lane; base < pieces; base += 32 * U) {
    if (base != lane) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + 32 * u;
        wv[u] = i < pieces ? __ldcs(wrow + i) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + 32 * u;
      if (i < pieces) {
#pragma unroll
        for (int r = 0; r < M; ++r)
          accumulate(wv[u], __ldg(reinterpret_cast<const uint4*>(x + r * x_stride) + i), acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < M; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) y[r * y_stride + col] = v;
  }
}

template <int M>
void launch(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t x_stride, float* y,
            int64_t y_stride) {
  const unsigned blocks = unsigned((n + kWarps - 1) / kWarps);
  launch_pdl(true, gemv_kernel<M>, blocks, kWarps * 32, 0, s, static_cast<const __nv_bfloat16*>(w), n, k,
             static_cast<const __nv_bfloat16*>(x), x_stride, y, y_stride);
}

}  // namespace

bool gemv_small_m_supported(int64_t m, int64_t k, int64_t x_stride, const void* w, const void* x) {
  return m >= 1 && m <= kGemvMaxRows && k % 8 == 0 && x_stride % 8 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

void gemv_small_m(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                  float* y, int64_t y_stride) {
  switch (m) {
    case 1: return launch<1>(s, w, n, k, x, x_stride, y, y_stride);
    case 2: return launch<2>(s, w, n, k, x, x_stride, y, y_stride);
    case 3: return launch<3>(s, w, n, k, x, x_stride, y, y_stride);
    case 4: return launch<4>(s, w, n, k, x, x_stride, y, y_stride);
    case 5: return launch<5>(s, w, n, k, x, x_stride, y, y_stride);
    case 6: return launch<6>(s, w, n, k, x, x_stride, y, y_stride);
    case 7: return launch<7>(s, w, n, k, x, x_stride, y, y_stride);
    case 8: return launch<8>(s, w, n, k, x, x_stride, y, y_stride);
    default: fail("gemv_small_m: {} rows (at most {})", m, kGemvMaxRows);
  }
}

}  // namespace mamba3::cuda
