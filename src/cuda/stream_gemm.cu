// The decode products on Hopper: TMA weight stream → wgmma (stream_gemm.h). Compiled for sm_90a only (wgmma).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <string>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_check.h"
#include "cuda/cuda_context.h"
#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/stream_gemm.h"
#include "cuda/wgmma_bf16.cuh"

namespace mamba3::cuda {
namespace {

// A block: two consumer warpgroups, each owning 64 of a tile's 128 weight rows, and one producer warp issuing the
// copies. A unit of work is one k-block of one tile: 128 columns of K as two 64-column boxes (two 128-byte pieces of
// each weight row back to back; one 64-column box per stage measured 4–10 % slower), 32 KB of W.
constexpr int kTileRows = 128, kBox = 64, kBoxes = 2, kKBlock = kBox * kBoxes;
constexpr int kConsumers = 256, kThreads = kConsumers + 32;
constexpr int kMaxStages = 8, kSmemLimit = 212 * 1024;
constexpr int kDefaultMinRows = 5;

template <int NB>
struct Shape {
  static constexpr int kWBoxBytes = kTileRows * kBox * 2;
  static constexpr int kXBoxBytes = NB * kBox * 2;  // NB rows of 128 bytes: whole 1024-byte swizzle atoms
  static constexpr int kStageBytes = kBoxes * (kWBoxBytes + kXBoxBytes);
  static constexpr int kStages = kMaxStages < kSmemLimit / kStageBytes ? kMaxStages : kSmemLimit / kStageBytes;
  static constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 1024 /* alignment */ + 256 /* barriers */;
  static constexpr int kPartialFloats = kTileRows * NB;  // one tile's partial sums (a slot)
};

__device__ __forceinline__ void mbar_init_count(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// A 2-D box of the tensor map at coordinates (c0 = column, c1 = row) into shared memory, completing on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                            uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(smem_addr(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ uint64_t l2_policy_evict_last() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}
// Shared-memory matrix descriptor of a K-major operand in 128-byte swizzled rows (8-row atoms 1024 bytes apart).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t a = smem_addr(p);
  return ((a & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Units [begin(g), begin(g + 1)) belong to block g.
__device__ __forceinline__ int64_t unit_begin(int64_t units, int g, int grid) { return units * g / grid; }

// Thread t's accumulator value i (fragment of wgmma m64nNBk16, consumer warpgroup t / 128) is weight row
// row_of(t) + 8·((i / 2) % 2) of the tile and batch row col_of(t) + 8·(i / 4) + i % 2.
__device__ __forceinline__ int row_of(int t) { return (t / 128) * 64 + ((t / 32) % 4) * 16 + (t % 32) / 4; }
__device__ __forceinline__ int col_of(int t) { return 2 * (t % 4); }

template <int NB>
__device__ __forceinline__ void store_tile(const float (&acc)[NB / 2], float* y, int64_t ldy, int m, int n,
                                           int64_t tile) {
  const int64_t row0 = tile * kTileRows + row_of(threadIdx.x);
  const int col0 = col_of(threadIdx.x);
#pragma unroll
  for (int i = 0; i < NB / 2; ++i) {
    const int64_t row = row0 + 8 * ((i / 2) % 2);
    const int col = 8 * (i / 4) + col0 + i % 2;
    if (row < n && col < m) y[col * ldy + row] = acc[i];
  }
}

template <int NB>
__global__ void __launch_bounds__(kThreads, 1)
    stream_gemm_kernel(const __grid_constant__ CUtensorMap wmap, const __grid_constant__ CUtensorMap xmap, float* y,
                       int64_t ldy, int m, int n, int kblocks, int64_t units, float* partials) {
  using S = Shape<NB>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S::kStages * S::kStageBytes);
  uint64_t* empty = full + S::kStages;
  auto stage_w = [&](int s, int b) { return smem + s * S::kStageBytes + b * S::kWBoxBytes; };
  auto stage_x = [&](int s, int b) { return smem + s * S::kStageBytes + kBoxes * S::kWBoxBytes + b * S::kXBoxBytes; };

  const int g = blockIdx.x, grid = gridDim.x;
  const int64_t u_begin = unit_begin(units, g, grid), u_end = unit_begin(units, g + 1, grid);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init_count(&full[s], 1);
      mbar_init_count(&empty[s], kConsumers / 32);  // every consumer warp releases the stage
    }
    mbar_init_fence();
  }
  __syncthreads();
  pdl_trigger();

  if (warp == kConsumers / 32) {  // producer
    if (lane != 0) return;
    asm volatile("prefetch.tensormap [%0];" ::"l"(&wmap) : "memory");
    asm volatile("prefetch.tensormap [%0];" ::"l"(&xmap) : "memory");
    const uint64_t stream_out = l2_policy_evict_first(), keep = l2_policy_evict_last();
    auto load_w = [&](int s, int64_t u) {
      for (int b = 0; b < kBoxes; ++b)
        tma_load_2d(stage_w(s, b), &wmap, int(u % kblocks) * kKBlock + b * kBox, int(u / kblocks) * kTileRows,
                    &full[s], stream_out);
    };
    auto load_x = [&](int s, int64_t u) {
      for (int b = 0; b < kBoxes; ++b)
        tma_load_2d(stage_x(s, b), &xmap, int(u % kblocks) * kKBlock + b * kBox, 0, &full[s], keep);
    };
    const int64_t count = u_end - u_begin;
    // The first stages' weights before waiting for the kernel that writes x (weights never change): under PDL they
    // stream while the previous kernel finishes.
    const int64_t early = count < S::kStages ? count : S::kStages;
    for (int64_t i = 0; i < early; ++i) {
      expect_bytes(&full[i], S::kStageBytes);
      load_w(int(i), u_begin + i);
    }
    pdl_wait();
    for (int64_t i = 0; i < early; ++i) load_x(int(i), u_begin + i);
    for (int64_t i = early; i < count; ++i) {
      const int s = int(i % S::kStages);
      mbar_wait(&empty[s], unsigned((i / S::kStages - 1) & 1));
      expect_bytes(&full[s], S::kStageBytes);
      load_w(s, u_begin + i);
      load_x(s, u_begin + i);
    }
    return;
  }

  // Consumers: warpgroup wg multiplies W rows 64·wg … + 63 of the stage with x (the batch as wgmma's N).
  pdl_wait();
  const int wg = warp / 4;
  float acc[NB / 2];
  int64_t it = 0;
  for (int64_t u = u_begin; u < u_end;) {
    const int64_t tile = u / kblocks, tile_lo = tile * kblocks, tile_hi = tile_lo + kblocks;
    const int64_t seg_end = u_end < tile_hi ? u_end : tile_hi;
    for (int64_t v = u; v < seg_end; ++v, ++it) {
      const int s = int(it % S::kStages);
      mbar_wait(&full[s], unsigned((it / S::kStages) & 1));
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {
        const uint8_t* w_rows = stage_w(s, b) + wg * 64 * 128;
#pragma unroll
        for (int kk = 0; kk < kBox / 16; ++kk)
          wgmma::Mma<NB>::run(acc, smem_desc(w_rows + kk * 32), smem_desc(stage_x(s, b) + kk * 32),
                              v > u || b > 0 || kk > 0);
      }
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      if (lane == 0) mbar_arrive(&empty[s]);
    }
    if (u == tile_lo && seg_end == tile_hi) {
      store_tile<NB>(acc, y, ldy, m, n, tile);
    } else {
      // Split tile: this block's part goes to its slot (0: the block's first segment, 1: its last); the fix-up
      // kernel adds the parts in block order once the grid is done. (Doing it here — the last block to finish a
      // tile takes a ticket and adds the parts — put ~4 µs of fences, atomics and L2 round trips at the end of
      // every product; the fix-up kernel is launched under PDL.)
      float* mine = partials + size_t(2 * g + (u == u_begin ? 0 : 1)) * S::kPartialFloats;
#pragma unroll
      for (int i = 0; i < NB / 2; ++i) __stcg(mine + i * kConsumers + threadIdx.x, acc[i]);
    }
    u = seg_end;
  }
}

// The split tiles' sums: block g adds the parts of the tile that starts inside its range and ends beyond it (at most
// one per block) in block order and stores it. Thread t holds the values of consumer thread t.
template <int NB>
__global__ void __launch_bounds__(kConsumers) stream_gemm_fixup_kernel(float* y, int64_t ldy, int m, int n,
                                                                        int kblocks, int64_t units, int grid,
                                                                        const float* partials) {
  using S = Shape<NB>;
  pdl_trigger();
  const int g = blockIdx.x;
  const int64_t u_begin = unit_begin(units, g, grid), u_end = unit_begin(units, g + 1, grid);
  const int64_t tile = (u_end - 1) / kblocks, tile_lo = tile * kblocks, tile_hi = tile_lo + kblocks;
  if (tile_lo < u_begin || tile_hi <= u_end) return;  // no tile starts here, or it ends here (stored whole)
  pdl_wait();
  float acc[NB / 2];
  for (int gp = g; gp < grid && unit_begin(units, gp, grid) < tile_hi; ++gp) {
    const int slot = gp == g && u_begin != tile_lo ? 1 : 0;  // block g: its last segment; later blocks: their first
    const float* part = partials + size_t(2 * gp + slot) * S::kPartialFloats;
#pragma unroll
    for (int i = 0; i < NB / 2; ++i) {
      const float p = __ldcg(part + i * kConsumers + threadIdx.x);
      acc[i] = gp == g ? p : acc[i] + p;
    }
  }
  store_tile<NB>(acc, y, ldy, m, n, tile);
}

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
    MAMBA3_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status));
    MAMBA3_CHECK(status == cudaDriverEntryPointSuccess && p, "stream_gemm: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A (rows × cols) bf16 matrix with rows `stride` elements apart, read in boxes of box_rows × 64 columns, 128-byte
// swizzled; out-of-range rows and columns read as zeros.
CUtensorMap tensor_map(const void* base, int64_t rows, int64_t cols, int64_t stride, int box_rows) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(stride) * 2};
  const cuuint32_t box[2] = {cuuint32_t(kBox), cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides,
                                    box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MAMBA3_CHECK(r == CUDA_SUCCESS, "stream_gemm: cuTensorMapEncodeTiled failed ({}) for a {}×{} matrix", int(r), rows,
               cols);
  return map;
}

template <int NB>
void launch(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
            float* y, int64_t y_stride) {
  using S = Shape<NB>;
  static std::once_flag attr_once;
  std::call_once(attr_once, [] {
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(stream_gemm_kernel<NB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(S::kSmemBytes)));
  });
  const CUtensorMap wmap = tensor_map(w, n, k, k, kTileRows);
  const CUtensorMap xmap = tensor_map(x, m, k, x_stride, NB);
  const int kblocks = int((k + kKBlock - 1) / kKBlock);
  const int64_t tiles = (n + kTileRows - 1) / kTileRows, units = tiles * kblocks;
  // One block per SM, whatever M: a row's sums then split the same way at every batch size (batch-invariant rows).
  // (Two blocks per SM streamed 10 % faster at M ≤ 32 without the split fix-up, which dominates either way.)
  const int grid = int(std::min<int64_t>(units, ctx.info().sm_count));
  float* partials = ctx.stream_gemm_partials();
  launch_pdl(true, stream_gemm_kernel<NB>, dim3(grid), dim3(kThreads), S::kSmemBytes, ctx.stream(), wmap, xmap, y,
             y_stride, int(m), int(n), kblocks, units, partials);
  if (units % grid != 0 || (units / grid) % kblocks != 0)  // some block's range is not whole tiles
    launch_pdl(true, stream_gemm_fixup_kernel<NB>, dim3(grid), dim3(kConsumers), 0, ctx.stream(), y, y_stride,
               int(m), int(n), kblocks, units, grid, static_cast<const float*>(partials));
}

}  // namespace

size_t stream_gemm_scratch_bytes(int sm_count) { return size_t(sm_count) * 2 * Shape<128>::kPartialFloats * 4; }

bool stream_gemm_supported(const Context& ctx, int64_t m, int64_t n, int64_t k, int64_t x_stride, const void* w,
                           const void* x) {
  return ctx.stream_gemm_partials() != nullptr && m >= 1 && m <= kStreamGemmMaxRows && n >= 1 &&
         n < (int64_t(1) << 31) && k >= 8 && k % 8 == 0 && x_stride % 8 == 0 && k < (int64_t(1) << 31) &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

void stream_gemm(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                 int64_t x_stride, float* y, int64_t y_stride) {
  MAMBA3_CHECK(stream_gemm_supported(ctx, m, n, k, x_stride, w, x),
               "stream_gemm: unsupported product (M {}, N {}, K {}, x stride {}; device cc {}.{})", m, n, k, x_stride,
               ctx.info().cc_major, ctx.info().cc_minor);
  if (m <= 8) return launch<8>(ctx, w, n, k, x, m, x_stride, y, y_stride);
  if (m <= 16) return launch<16>(ctx, w, n, k, x, m, x_stride, y, y_stride);
  if (m <= 32) return launch<32>(ctx, w, n, k, x, m, x_stride, y, y_stride);
  if (m <= 64) return launch<64>(ctx, w, n, k, x, m, x_stride, y, y_stride);
  return launch<128>(ctx, w, n, k, x, m, x_stride, y, y_stride);
}

bool stream_gemm_preferred(int64_t m) {
  static const std::string mode = env_choice("MAMBA3_STREAM_GEMM", {"0", "1", "all"});
  if (mode == "1") return m >= kDefaultMinRows;
  return mode == "all";
}

}  // namespace mamba3::cuda
