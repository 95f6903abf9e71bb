// out_proj beside the forward walk (out_proj_beside.h). One 128-thread block per 64 × 128 tile of the result (64
// rows: one chunk of one sequence), four warps of 32 rows × 64 columns on m16n8k16 bf16 mma with f32 accumulation,
// the operands streaming through three cp.async stages of 64 columns of K. The blocks are small on purpose: 83 KB of
// shared memory and 128 threads at ≤ 128 registers fit beside one walk block (106.5 KB, 256 threads at 128 registers)
// on an SM, where the product's usual tiles (cuBLAS's or fused_gemm's, ~200 KB and 384 threads) do not.
#include <cuda_bf16.h>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/chunk_ready.cuh"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/train/out_proj_beside.h"

namespace mamba3::cuda::train_detail {

namespace {

using namespace mma_bf16;
constexpr int kTileM = 64, kTileN = 128, kTileK = 64, kStages = 3, kThreads = 128;
constexpr int kLd = kTileK + 8;  // 8 bf16 of padding per row: ldmatrix's eight row addresses in different banks
constexpr int kStageElems = (kTileM + kTileN) * kLd;
constexpr size_t kSmemBytes = size_t(kStages) * kStageElems * sizeof(bf16);

template <bool kF32Out>
__global__ void __launch_bounds__(kThreads) out_proj_beside_kernel(const OutProjBesideParams p) {
  pdl_beside();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* stages = reinterpret_cast<bf16*>(smem_raw);
  // Tiles chunk by chunk (the order the walk finishes them in), then sequence, then column tile.
  const int col_tiles = p.D / kTileN;
  const int64_t per_chunk = p.B * col_tiles, i = blockIdx.x;
  const int c = int(i / per_chunk);
  const int64_t b = i % per_chunk / col_tiles;
  const int n0 = int(i % col_tiles) * kTileN;
  const int64_t row0 = b * p.L + int64_t(c) * kTileM;
  const bf16* A = reinterpret_cast<const bf16*>(p.o16) + row0 * p.K;
  const bf16* W = reinterpret_cast<const bf16*>(p.w16) + int64_t(n0) * p.K;
  const int nk = p.K / kTileK;
  const auto issue_w = [&](int kb) {
    copy_tile<kThreads, kTileN, kTileK>(stages + (kb % kStages) * kStageElems + kTileM * kLd, kLd, W + kb * kTileK,
                                        p.K);
  };
  const auto issue_a = [&](int kb) {
    copy_tile<kThreads, kTileM, kTileK>(stages + (kb % kStages) * kStageElems, kLd, A + kb * kTileK, p.K);
  };
  // The weight's first two stages (complete before any kernel of the step) while thread 0 waits for the chunk's
  // rows; the barrier then orders every thread's copies of them after its acquire.
  issue_w(0);
  if (nk > 1) issue_w(1);
  if (threadIdx.x == 0) chunk_ready_wait(p.ready + b * p.nc + c, p.target);
  __syncthreads();
  issue_a(0);
  asm volatile("cp.async.commit_group;");  // stage 0 (and the weight's stage 1)
  if (nk > 1) issue_a(1);
  asm volatile("cp.async.commit_group;");  // stage 1

  const int warp = threadIdx.x / 32, wm = 32 * (warp / 2), wn = 64 * (warp % 2);
  float acc[2][8][4];
  zero(acc[0]), zero(acc[1]);
  for (int kb = 0; kb < nk; ++kb) {
    asm volatile("cp.async.wait_group 1;" ::: "memory");  // stage kb's group is complete
    __syncthreads();  // ... for every thread; every warp is done with stage kb − 1, whose buffer kb + 2 takes
    if (kb + 2 < nk) issue_w(kb + 2), issue_a(kb + 2);
    asm volatile("cp.async.commit_group;");  // (empty past the end: one group per step)
    const bf16* sA = stages + (kb % kStages) * kStageElems;
    const bf16* sW = sA + kTileM * kLd;
#pragma unroll
    for (int ks = 0; ks < kTileK / 16; ++ks) {
      uint32_t a[2][4];
      load_a(sA, kLd, wm, 16 * ks, a[0]);
      load_a(sA, kLd, wm + 16, 16 * ks, a[1]);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bq[4];
        load_b_nk(sW, kLd, wn + 16 * np, 16 * ks, bq);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          mma(acc[mt][2 * np], a[mt], bq[0], bq[1]), mma(acc[mt][2 * np + 1], a[mt], bq[2], bq[3]);
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    if constexpr (kF32Out)
      store_tiles(acc[mt], p.out + row0 * p.D, p.D, wm + 16 * mt, n0 + wn);
    else
      store_tiles_bf16(acc[mt], p.out16 + row0 * p.D, p.D, wm + 16 * mt, n0 + wn);
  }
  pdl_wait();
}

}  // namespace

bool out_proj_beside_supported(int64_t L, int64_t K, int64_t D, const void* o16, const void* w16, const void* out) {
  const auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  return L > 0 && L % kTileM == 0 && K > 0 && K % kTileK == 0 && K <= (1 << 30) && D > 0 && D % kTileN == 0 && o16 &&
         w16 && out && aligned(o16) && aligned(w16) && aligned(out);
}

void launch_out_proj_beside(cudaStream_t s, const OutProjBesideParams& p) {
  MAMBA3_CHECK(
      out_proj_beside_supported(p.L, p.K, p.D, p.o16, p.w16, p.out16 ? static_cast<const void*>(p.out16) : p.out),
      "out_proj beside the walk: unsupported shape (L {}, K {}, D {}) or an unaligned or null matrix", p.L, p.K, p.D);
  MAMBA3_CHECK(p.ready && p.nc == p.L / kTileM, "out_proj beside the walk: no counters, or {} chunks for L {}", p.nc,
               p.L);
  const int64_t blocks = p.B * p.nc * (p.D / kTileN);
  if (blocks == 0) return;
  MAMBA3_CHECK(blocks <= 0x7fffffff, "out_proj beside the walk: {} blocks exceed the grid", blocks);
  static const cudaError_t opted[2] = {
      // (once per process)
      cudaFuncSetAttribute(out_proj_beside_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes)),
      cudaFuncSetAttribute(out_proj_beside_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes))};
  MAMBA3_CUDA_CHECK(opted[0]);
  MAMBA3_CUDA_CHECK(opted[1]);
  launch_train(p.out16 ? out_proj_beside_kernel<false> : out_proj_beside_kernel<true>, unsigned(blocks), kThreads,
               kSmemBytes, s, p);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda::train_detail
