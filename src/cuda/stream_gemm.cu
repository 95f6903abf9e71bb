// The decode products on Hopper: TMA weight stream → wgmma (stream_gemm.h). Compiled for sm_90a only (wgmma).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <string>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_check.h"
#include "cuda/cuda_context.h"
#include "cuda/env_switch.h"
#include "cuda/gated_silu.cuh"
#include "cuda/pdl.h"
#include "cuda/stream_gemm.h"
#include "cuda/stream_gemm_layout.h"
#include "cuda/tensor_map.h"
#include "cuda/wgmma_bf16.cuh"

namespace mamba3::cuda {
namespace {

// A block: consumer warpgroups, each owning 64 of a tile's weight rows, and one producer warp issuing the copies.
// A unit of work is one k-block of the tile: `Boxes` 64-column boxes of W (128-byte pieces of each weight row back to
// back) and of x.
// The narrow forms (1–64 rows): two consumer warpgroups (128-row tiles), two boxes per k-block (one box per stage
// measured 4–10 % slower), in two variants: two blocks per SM (≤ 110 KB of shared memory, ≤ 112 registers) keep two
// weight streams per SM when the grid has more blocks than SMs (lm_head: ~1000 tiles) — one SM streams at most
// ~46 GB/s (H200), ~1.5× its share of the copy bandwidth — and pack split tiles' clusters; one block per SM with the
// whole shared memory for unsplit tiles that fit the SMs, so that at 32–64 rows (40–48 KB stages) four or five stages
// are in flight, not two.
// The wide class (65–128 rows): one box per k-block, one block per SM, in two tile heights. Every block reads the x
// columns of its k-blocks besides its W tile; at 128 rows a 128-row tile makes each block read as many x bytes as W
// bytes (the eighteenth and twenty-third sessions' forms, slower than cuBLAS), a 256-row tile (four consumer
// warpgroups, four 48 KB stages) halves that. 128-row tiles (two warpgroups, seven 32 KB stages) stay for small N,
// where 256-row tiles would leave half the SMs without a share of W (wide_grid chooses).
constexpr int kBox = 64;
constexpr int kMaxStages = 8, kMaxSplit = 8;

template <int NB_, int BlocksPerSm, int Warpgroups, int Boxes, bool RowEpilogue = false>
struct Form {
  static constexpr int NB = NB_, kBlocksPerSm = BlocksPerSm, kBoxes = Boxes;
  static constexpr int kTileRows = 64 * Warpgroups, kConsumers = 128 * Warpgroups, kThreads = kConsumers + 32;
  static constexpr int kKBlock = kBox * Boxes;
  static constexpr bool kWide = NB == 128;  // the wide class: folded norms; the row epilogue
  // The row epilogue (stores along weight rows; gated split tiles too): the wide class, and the narrow forms unless
  // MAMBA3_STREAM_GEMM_EPILOGUE=fragments (narrow_row_epilogue).
  static constexpr bool kRowEpilogue = kWide || RowEpilogue;
  static constexpr int kSmemLimit = BlocksPerSm == 2 ? 110 * 1024 : 224 * 1024;
  static constexpr int kWBoxBytes = kTileRows * kBox * 2;
  static constexpr int kXBoxBytes = NB * kBox * 2;  // NB rows of 128 bytes: whole 1024-byte swizzle atoms
  static constexpr int kStageBytes = kBoxes * (kWBoxBytes + kXBoxBytes);
  // The wide class keeps its folded norms' rstd per batch row after the barriers (read while the ring is busy), and
  // sizes its ring to the 227 KB a block may have.
  static constexpr int kScratchBytes = kWide ? 512 : 0;
  static constexpr int kRing =
      kWide ? (BlocksPerSm == 2 ? 112 * 1024 : 227 * 1024) - 1024 - 256 - kScratchBytes : kSmemLimit;
  static constexpr int kStages = kMaxStages < kRing / kStageBytes ? kMaxStages : kRing / kStageBytes;
  static constexpr size_t kSmemBytes =
      size_t(kStages) * kStageBytes + 1024 /* alignment */ + 256 /* barriers */ + kScratchBytes;
  static_assert(kStages >= 2, "at least two stages");
  static_assert(kSmemBytes <= 227 * 1024, "within the opt-in shared memory of one block");
  static_assert(kTileRows * NB * 4 <= kStages * kStageBytes,
                "the fragment epilogue's part reuses the stage ring (the row epilogue's, padded: in the kernel)");
};
template <int NB, int BlocksPerSm, bool RowEpilogue = false>
using Narrow = Form<NB, BlocksPerSm, 2, 2, RowEpilogue>;
using WideTall = Form<128, 1, 4, 1>;
using WideLow = Form<128, 1, 2, 1>;
// 64-row tiles, two blocks per SM (an A/B form, MAMBA3_STREAM_GEMM_WIDE_TILE=64): N / 64 blocks spread a product like
// the 1.5B in_proj (136 tiles) over every SM, each multiplying a quarter of what a 256-row tile does per x byte.
using WideShort = Form<128, 2, 1, 1>;
constexpr int kNarrowTileRows = Narrow<8, 1>::kTileRows, kNarrowKBlock = Narrow<8, 1>::kKBlock;
// RMSNorm folded into the wide class's products (stream_gemm.h; gemv_small_m.h folds it the same way at one row).
// kNormOut (out_proj, fc2): v = x·Wᵀ + residual goes back to residual, bf16(v ⊙ weight) to out16 (both rows ldy
// apart), and Σ v² over each tile's weight rows per batch row to partials_out[tile][kFoldRows]. kNormIn (in_proj, fc1):
// every output (and both values of a gated pair) is multiplied by its batch row's rstd = 1/√(Σ partials_in / d + eps),
// the sum over the producer's tiles in tile order.
enum : int { kNormNone = 0, kNormOut = 1, kNormIn = 2 };
// The kernel's A/B options (rotate_option, compiled_option). Compile-time (a wgmma wait under a run-time branch makes ptxas serialize
// every wgmma of the kernel): kDeepWgmma, a consumer keeps one stage's products in flight while it issues the next
// stage's. Run-time (the kernel's `options`): kRotate, every tile starts its k-blocks at its own offset.
enum : int { kDeepWgmma = 1 };
enum : int { kRotate = 1 };
constexpr int kFoldRows = int(kStreamGemmMaxRows);
struct FoldArgs {
  float* residual = nullptr;
  const float* weight = nullptr;
  __nv_bfloat16* out16 = nullptr;
  float* partials_out = nullptr;
  const float* partials_in = nullptr;
  int parts = 0, d = 0;
  float eps = 0.0f;
};

// The default route: from 2 rows up to kStreamGemmNarrowMaxRows. The decode step on an H200 (1.5B SISO, ms/step;
// docs/kernels/stream_gemm.md), against cuBLAS: b8 1.774 -> 1.443, b16 2.071 -> 1.795, b32 2.519 -> 2.291, b64
// 3.399 -> 3.314; against the matrix-vector kernel: b1 1.129 vs 1.232 (it stays there), b3 1.391 -> 1.337, b4 1.606
// -> 1.400; b2 1.305 -> 1.253 (MIMO 1.366 -> 1.279) once the GatedMLP's activation moved into this kernel's
// epilogue (twelfth session; 1.295 vs 1.296 before).
constexpr int kDefaultMinRows = 2;

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
// The float at the same shared-memory offset as `local` in the cluster's block `rank`.
__device__ __forceinline__ float load_peer(const float* local, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(local)), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}
// Four floats (16-byte aligned) at the same offset as `local` in the cluster's block `rank`.
__device__ __forceinline__ float4 load_peer4(const float* local, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(local)), "r"(rank));
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(remote)
               : "memory");
  return v;
}

// Consumer thread t's accumulator value i (fragment of wgmma m64nNBk16, warpgroup t / 128) is weight row
// weight_row(i, t) of the tile and batch row batch_row(i, t) (stream_gemm_layout.h, with the row epilogue's index
// arithmetic).
using stream_layout::batch_row;
using stream_layout::weight_row;
template <int TileRows>
__device__ __forceinline__ void store_value(float v, int i, int t, float* y, int64_t ldy, int m, int n, int64_t tile) {
  const int64_t row = tile * TileRows + weight_row(i, t);
  const int col = batch_row(i, t);
  if (row < n && col < m) y[col * ldy + row] = v;
}

// W's rows (value, gate) pairs: act (M, n/2) bf16 = value ⊙ silu(gate) instead of y. Unsplit tiles of the fragment
// epilogue: thread t's value i and thread (t ^ 4)'s value i are the pair's rows 2j, 2j + 1 (weight_row: t with bit 2
// clear holds the even row), lanes 4 apart of one warp, so one shuffle brings the gate to the value's lane.
template <int TileRows>
__device__ __forceinline__ void store_gated(float v, int i, int t, __nv_bfloat16* act, int m, int n, int64_t tile) {
  const float partner = __shfl_xor_sync(0xffffffffu, v, 4);
  const int64_t row = tile * TileRows + weight_row(i, t);
  const int col = batch_row(i, t);
  if (t % 8 < 4 && row < n && col < m)
    act[col * (int64_t(n) / 2) + row / 2] = __float2bfloat16(gated_silu_value(v, partner));
}

// The row epilogue's stores: four consecutive weight rows row … row + 3 (row a multiple of 4) of batch row c, as one
// 16-byte access where the whole quad is inside the n outputs and the buffers allow it, else element by element. The
// stored values are the same bits either way; the kNormOut quad's Σ v² may round differently (the compiler may contract
// the vector path's sum), which changes only the partials' last bits, not which rows take which path.
struct RowOut {
  float* y;
  int64_t ldy;
  bool y_vec;  // ldy a multiple of 4, y 16-byte aligned
  __nv_bfloat16* act;
  bool act_vec;   // n / 2 even, act 4-byte aligned
  bool fold_vec;  // residual rows a multiple of 4 apart and 16-byte aligned, out16 8-byte, weight 16-byte aligned
  int n;
};
__device__ __forceinline__ void store_row_y(const float4& v, int c, int64_t row, const RowOut& o) {
  float* dst = o.y + c * o.ldy + row;
  if (o.y_vec && row + 3 < o.n) {
    *reinterpret_cast<float4*>(dst) = v;
    return;
  }
  const float e[4] = {v.x, v.y, v.z, v.w};
  for (int q = 0; q < 4; ++q)
    if (row + q < o.n) dst[q] = e[q];
}
__device__ __forceinline__ void store_row_gated(const float4& v, int c, int64_t row, const RowOut& o) {
  const int64_t f = o.n / 2;
  __nv_bfloat16* dst = o.act + c * f + row / 2;
  const __nv_bfloat16 a = __float2bfloat16(gated_silu_value(v.x, v.y)),
                      b = __float2bfloat16(gated_silu_value(v.z, v.w));
  if (o.act_vec && row + 3 < o.n) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __halves2bfloat162(a, b);
    return;
  }
  if (row < o.n) dst[0] = a;  // n is even: a pair is whole or absent
  if (row + 2 < o.n) dst[1] = b;
}
// kNormOut: v += residual; v → residual, bf16(v ⊙ weight) → out16 (rows ldy apart); returns Σ v² of the quad's rows
// inside n.
__device__ __forceinline__ float store_row_residual_norm(float4 v, int c, int64_t row, const FoldArgs& fold,
                                                         const RowOut& o) {
  float* res = fold.residual + c * o.ldy + row;
  __nv_bfloat16* out = fold.out16 + c * o.ldy + row;
  if (o.fold_vec && row + 3 < o.n) {
    const float4 r = *reinterpret_cast<const float4*>(res), g = *reinterpret_cast<const float4*>(fold.weight + row);
    v.x += r.x, v.y += r.y, v.z += r.z, v.w += r.w;
    *reinterpret_cast<float4*>(res) = v;
    __nv_bfloat162 lo = __halves2bfloat162(__float2bfloat16(v.x * g.x), __float2bfloat16(v.y * g.y));
    __nv_bfloat162 hi = __halves2bfloat162(__float2bfloat16(v.z * g.z), __float2bfloat16(v.w * g.w));
    uint2 packed;
    packed.x = *reinterpret_cast<uint32_t*>(&lo);
    packed.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out) = packed;
    return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  float e[4] = {v.x, v.y, v.z, v.w}, sq = 0.0f;
  for (int q = 0; q < 4; ++q)
    if (row + q < o.n) {
      e[q] += res[q];
      res[q] = e[q];
      out[q] = __float2bfloat16(e[q] * fold.weight[row + q]);
      sq += e[q] * e[q];
    }
  return sq;
}

// Block b computes row tile b / split over k-blocks [K·r/split, K·(r+1)/split), r = b % split; the `split` blocks
// of a tile form a thread-block cluster and add their parts through distributed shared memory, each block summing a
// slice of the tile over the cluster's blocks in rank order (deterministic; no global traffic, no atomics).
// Two epilogues. The fragment epilogue (the narrow forms under MAMBA3_STREAM_GEMM_EPILOGUE=fragments): unsplit tiles
// store from the accumulators, split tiles go through the ring as [value i][consumer thread t] and each block adds an
// element slice; act (the gated epilogue) on unsplit tiles only. The row epilogue (the default: the wide class, and
// the narrow forms): the block's part goes to the ring as [batch row][weight row], then whole batch
// rows are added over the cluster (block `rank`: rows [NB·rank/split, NB·(rank+1)/split)) and stored along the weight
// rows — y, the gated activations, or (Norm, the wide class) the folded RMSNorm halves above.
template <class F, int Norm, int Opt>
__global__ void __launch_bounds__(F::kThreads, F::kBlocksPerSm)
    stream_gemm_kernel(const __grid_constant__ CUtensorMap wmap, const __grid_constant__ CUtensorMap xmap, float* y,
                       int64_t ldy, int m, int n, int kblocks, int split, __nv_bfloat16* act, const FoldArgs fold,
                       int options) {
  const bool rotate = options & kRotate;
  constexpr int NB = F::NB, kConsumers = F::kConsumers, kBoxes = F::kBoxes;
  static_assert(Norm == kNormNone || F::kWide, "folded norms: the wide class only");
  static_assert(!F::kWide || F::kRowEpilogue, "the wide class ends in the row epilogue");
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + F::kStages * F::kStageBytes);
  uint64_t* empty = full + F::kStages;
  float* rstd_s = reinterpret_cast<float*>(smem + F::kStages * F::kStageBytes + 256);  // kNormIn: per batch row
  auto stage_w = [&](int s, int b) { return smem + s * F::kStageBytes + b * F::kWBoxBytes; };
  auto stage_x = [&](int s, int b) { return smem + s * F::kStageBytes + kBoxes * F::kWBoxBytes + b * F::kXBoxBytes; };

  // %cluster_ctarank = blockIdx.x % split: clusters are the split consecutive blocks of a tile.
  const int64_t tile = blockIdx.x / split;
  const int rank = int(blockIdx.x % split);
  const int kb_begin = int(int64_t(kblocks) * rank / split), kb_end = int(int64_t(kblocks) * (rank + 1) / split);
  const int count = kb_end - kb_begin;  // ≥ 1: split ≤ kblocks
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < F::kStages; ++s) {
      mbar_init_count(&full[s], 1);
      mbar_init_count(&empty[s], kConsumers / 32);  // every consumer warp releases it
    }
    mbar_init_fence();
  }
  __syncthreads();
  pdl_trigger();

  float acc[NB / 2];
  if (warp == kConsumers / 32) {  // producer (lane 0); the warp stays for the cluster's reduction
    if (lane == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(&wmap) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(&xmap) : "memory");
      const uint64_t stream_out = l2_policy_evict_first(), keep = l2_policy_evict_last();
      const int row0 = int(tile) * F::kTileRows;
      auto load_w = [&](int s, int kb) {
        for (int b = 0; b < kBoxes; ++b)
          tma_load_2d(stage_w(s, b), &wmap, kb * F::kKBlock + b * kBox, row0, &full[s], stream_out);
      };
      auto load_x = [&](int s, int kb) {
        for (int b = 0; b < kBoxes; ++b)
          tma_load_2d(stage_x(s, b), &xmap, kb * F::kKBlock + b * kBox, 0, &full[s], keep);
      };
      // The i-th k-block this block takes: in order, or (rotate, an A/B option) starting at (tile index) % count, so
      // that the clusters of a grid do not all request the same x columns at once (the sum order changes per tile,
      // not per row count: rows stay batch-invariant).
      const int k_start = rotate ? int(blockIdx.x / split % count) : 0;
      auto k_of = [&](int i) { return kb_begin + (i + k_start) % count; };
      // The first stages' weights before waiting for the kernel that writes x (weights never change): under PDL
      // they stream while the previous kernel finishes.
      const int early = count < F::kStages ? count : F::kStages;
      for (int i = 0; i < early; ++i) {
        expect_bytes(&full[i], F::kStageBytes);
        load_w(i, k_of(i));
      }
      pdl_wait();
      for (int i = 0; i < early; ++i) load_x(i, k_of(i));
      for (int i = early; i < count; ++i) {
        const int s = i % F::kStages;
        mbar_wait(&empty[s], unsigned((i / F::kStages - 1) & 1));
        expect_bytes(&full[s], F::kStageBytes);
        load_w(s, k_of(i));
        load_x(s, k_of(i));
      }
    }
    pdl_wait();  // every lane: the epilogue below writes the outputs
    __syncwarp();
  } else {
    // Consumers: warpgroup wg multiplies W rows 64·wg … + 63 of each stage with x (the batch as wgmma's N).
    pdl_wait();
    // kNormIn: the batch rows' rstd while the first stages stream in (read after the epilogue's first barrier).
    if constexpr (Norm == kNormIn) {
      if (threadIdx.x < kFoldRows) {
        float total = 0.0f;
        for (int p = 0; p < fold.parts; ++p) total += fold.partials_in[int64_t(p) * kFoldRows + threadIdx.x];
        rstd_s[threadIdx.x] = rsqrtf(total / float(fold.d) + fold.eps);
      }
    }
    const int wg = warp / 4;
    // A stage's release: this warp's arrival on the stage's barrier.
    auto release = [&](uint64_t* bar) {
      if (lane == 0) mbar_arrive(bar);
    };
    for (int i = 0; i < count; ++i) {
      const int s = i % F::kStages;
      mbar_wait(&full[s], unsigned((i / F::kStages) & 1));
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {
        const uint8_t* w_rows = stage_w(s, b) + wg * 64 * 128;
#pragma unroll
        for (int kk = 0; kk < kBox / 16; ++kk)
          wgmma::Mma<NB>::run(acc, sw128_desc(w_rows + kk * 32), sw128_desc(stage_x(s, b) + kk * 32),
                              i > 0 || b > 0 || kk > 0);
      }
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      if constexpr (Opt & kDeepWgmma) {  // this stage's products stay in flight; the stage before is released
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        if (i > 0) release(&empty[(i - 1) % F::kStages]);
      } else {
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        release(&empty[s]);
      }
    }
    // The last stage's products (its buffers are never reloaded, so it is not released).
    if constexpr (Opt & kDeepWgmma) asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    if constexpr (!F::kRowEpilogue) {
      if (split == 1) {
        if (act) {
#pragma unroll
          for (int i = 0; i < NB / 2; ++i) store_gated<F::kTileRows>(acc[i], i, threadIdx.x, act, m, n, tile);
        } else {
#pragma unroll
          for (int i = 0; i < NB / 2; ++i) store_value<F::kTileRows>(acc[i], i, threadIdx.x, y, ldy, m, n, tile);
        }
        return;
      }
    }
  }

  if constexpr (F::kRowEpilogue) {
    constexpr int kPitch = stream_layout::row_pitch(F::kTileRows), kWarps = F::kThreads / 32;
    static_assert(NB * kPitch * 4 <= F::kStages * F::kStageBytes, "the tile's part fits the ring");
    __syncthreads();  // every warpgroup's last products have read the ring (each waited only for its own); rstd_s
    float* part = reinterpret_cast<float*>(smem);
    if (warp < kConsumers / 32) {
#pragma unroll
      for (int i = 0; i < NB / 2; ++i)
        part[stream_layout::row_part_index(batch_row(i, threadIdx.x), weight_row(i, threadIdx.x), F::kTileRows)] =
            acc[i];
    }
    if (split > 1) {
      cluster_sync();
    } else {
      __syncthreads();
    }
    RowOut o;
    o.y = y;
    o.ldy = ldy;
    o.y_vec = y && ldy % 4 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;
    o.act = act;
    o.act_vec = act && (n / 2) % 2 == 0 && reinterpret_cast<uintptr_t>(act) % 4 == 0;
    o.fold_vec = Norm == kNormOut && ldy % 4 == 0 && reinterpret_cast<uintptr_t>(fold.residual) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(fold.out16) % 8 == 0 && reinterpret_cast<uintptr_t>(fold.weight) % 16 == 0;
    o.n = n;
    const int64_t row0 = tile * F::kTileRows;
    const stream_layout::RowRange rows = stream_layout::epilogue_rows(rank, split, NB);
    // A warp per batch row, a lane per 4 consecutive weight rows (stream_layout: 128 rows a step); every peer's float4
    // requested before any is added.
    for (int c = rows.begin + warp; c < rows.end; c += kWarps) {
      float sq = 0.0f;
      if (c < m) {
        for (int r = stream_layout::lane_first_row(lane); r < F::kTileRows; r += stream_layout::kLaneRowStep) {
          const float* at = part + stream_layout::row_part_index(c, r, F::kTileRows);
          float4 v;
          if (split == 1) {
            v = *reinterpret_cast<const float4*>(at);
          } else {
            float4 peer[kMaxSplit];
#pragma unroll
            for (int q = 0; q < kMaxSplit; ++q)
              if (q < split) peer[q] = load_peer4(at, q);
            v = peer[0];
#pragma unroll
            for (int q = 1; q < kMaxSplit; ++q)
              if (q < split) v.x += peer[q].x, v.y += peer[q].y, v.z += peer[q].z, v.w += peer[q].w;
          }
          if constexpr (Norm == kNormIn) {
            const float s = rstd_s[c];
            v.x *= s, v.y *= s, v.z *= s, v.w *= s;
          }
          if (row0 + r >= n) continue;  // a partial tile's missing rows (uniform per lane, not per warp: no shuffle)
          if constexpr (Norm == kNormOut) {
            sq += store_row_residual_norm(v, c, row0 + r, fold, o);
          } else if (act) {
            store_row_gated(v, c, row0 + r, o);
          } else {
            store_row_y(v, c, row0 + r, o);
          }
        }
      }
      if constexpr (Norm == kNormOut) {  // the tile's Σ v² of batch row c, lanes in a fixed order
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
        if (lane == 0 && tile * F::kTileRows < n) fold.partials_out[tile * kFoldRows + c] = sq;  // not a padding tile
      }
    }
    __syncwarp();  // lanes reconverged after their stores (the barrier below is .aligned)
    // No block leaves while its peers may still read its part.
    if (split > 1) cluster_sync();
    return;
  }

  if (split == 1) return;  // the producer warp (fragment epilogue)
  // The fragment epilogue's split tiles: each block's part into its stage ring as [value i][consumer thread t]; after
  // the cluster barrier block `rank` adds elements [E·rank/split, E·(rank+1)/split) over the blocks in rank order.
  __syncthreads();  // both warpgroups' last products have read the ring (each waited only for its own)
  float* part = reinterpret_cast<float*>(smem);
  if (warp < kConsumers / 32) {
#pragma unroll
    for (int i = 0; i < NB / 2; ++i) part[i * kConsumers + threadIdx.x] = acc[i];
  }
  cluster_sync();
  constexpr int kElems = F::kTileRows * NB;
  const int e_end = int(int64_t(kElems) * (rank + 1) / split);
  for (int e = int(int64_t(kElems) * rank / split) + threadIdx.x; e < e_end; e += F::kThreads) {
    float sum = load_peer(part + e, 0);
    for (int q = 1; q < split; ++q) sum += load_peer(part + e, q);
    store_value<F::kTileRows>(sum, e / kConsumers, e % kConsumers, y, ldy, m, n, tile);
  }
  cluster_sync();  // no block leaves while its peers may still read its part
}

// A (rows × cols) bf16 matrix with rows `stride` elements apart, read in boxes of box_rows × 64 columns.
CUtensorMap tensor_map(const void* base, int64_t rows, int64_t cols, int64_t stride, int box_rows) {
  return bf16_tensor_map(base, rows, cols, stride, box_rows, kBox, "stream_gemm");
}

// Blocks per tile of the narrow forms, a function of (N, K, SM count) only, so rows are batch-invariant. A block
// streams up to ~48 GB/s (H200), and splitting a tile costs its cluster's reduction: one block per tile as soon as the
// tiles occupy 45 % of the SMs (measured: 1.5B in_proj, 68 tiles, and fc1, 64 tiles, were 0.5–4 µs faster unsplit
// than split 2–4), else about one block per SM (out_proj, 16 tiles: 8 per tile was the fastest of 1–8), at most 8
// (the portable cluster size) and at most one per k-block. MAMBA3_STREAM_GEMM_SPLIT = 1–8 forces the split (tuning
// sweeps; the wide form too).
int forced_split() {
  static const int forced = int(env_integer("MAMBA3_STREAM_GEMM_SPLIT", 0, 0, kMaxSplit));
  return forced;
}
int split_for(int64_t tiles, int kblocks, int sm_count) {
  if (forced_split() > 0) return std::min(forced_split(), kblocks);
  if (tiles * 20 >= int64_t(sm_count) * 9) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>({kMaxSplit, kblocks, sm_count / tiles})));
}

// The kernel's A/B options, read once: MAMBA3_STREAM_GEMM_ROTATE = 1 (kRotate) and MAMBA3_STREAM_GEMM_WGMMA_DEPTH = 1
// (kDeepWgmma: wgmma.wait_group 1, each stage released after the next stage's products are issued, instead of 0).
int rotate_option() {
  static const int on = env_choice("MAMBA3_STREAM_GEMM_ROTATE", {"0", "1"}) == "1" ? kRotate : 0;
  return on;
}
int compiled_option() {
  static const int on = env_choice("MAMBA3_STREAM_GEMM_WGMMA_DEPTH", {"0", "1"}) == "1" ? kDeepWgmma : 0;
  return on;
}

template <class F, int Norm = kNormNone, int Opt = 0>
void set_attributes_once() {
  static std::once_flag attr_once;
  std::call_once(attr_once, [] {
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(stream_gemm_kernel<F, Norm, Opt>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(F::kSmemBytes)));
    // Every form needs the largest shared-memory carve-out.
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(stream_gemm_kernel<F, Norm, Opt>,
                                           cudaFuncAttributePreferredSharedMemoryCarveout,
                                           int(cudaSharedmemCarveoutMaxShared)));
  });
}

template <class F, int Norm, int Opt>
void launch_kernel(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                   float* y, int64_t y_stride, int kblocks, int64_t tiles, int split, void* act, const FoldArgs& fold) {
  set_attributes_once<F, Norm, Opt>();
  const CUtensorMap wmap = tensor_map(w, n, k, k, F::kTileRows);
  const CUtensorMap xmap = tensor_map(x, m, k, x_stride, F::NB);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(tiles * split));
  config.blockDim = dim3(F::kThreads);
  config.dynamicSmemBytes = F::kSmemBytes;
  config.stream = ctx.stream();
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = unsigned(split);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  attribute[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[1].val.programmaticStreamSerializationAllowed = pdl_enabled() ? 1 : 0;
  config.attrs = attribute;
  config.numAttrs = 2;
  MAMBA3_CUDA_CHECK(cudaLaunchKernelEx(&config, stream_gemm_kernel<F, Norm, Opt>, wmap, xmap, y, y_stride, int(m),
                                       int(n), kblocks, split, static_cast<__nv_bfloat16*>(act), fold,
                                       rotate_option()));
}
template <class F, int Norm = kNormNone>
void launch(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
            float* y, int64_t y_stride, int kblocks, int64_t tiles, int split, void* act,
            const FoldArgs& fold = FoldArgs{}) {
  if (compiled_option() == kDeepWgmma)
    return launch_kernel<F, Norm, kDeepWgmma>(ctx, w, n, k, x, m, x_stride, y, y_stride, kblocks, tiles, split, act,
                                              fold);
  launch_kernel<F, Norm, 0>(ctx, w, n, k, x, m, x_stride, y, y_stride, kblocks, tiles, split, act, fold);
}

// The narrow forms' variant for a grid: one block per SM with the whole shared memory for unsplit tiles when they fit
// the SMs (1.5B in_proj/fc1 at 32–64 rows: 13.7 → 11.6, 13.1 → 10.7 µs), else two: clusters of 8 blocks of the big
// variant measured slower (out_proj 7.4 → 10.0 µs at 8 rows; fewer such clusters fit a GPC at once).
// MAMBA3_STREAM_GEMM_BLOCKS_PER_SM = 1 or 2 forces one (A/B runs).
// MAMBA3_STREAM_GEMM_EPILOGUE = rows (default) | fragments: how the narrow forms end. The row epilogue (which also
// takes the gated epilogue on split tiles) measured faster in the whole decode step on an H100 (thirty-eighth
// session, 1.5B SISO, two alternating rounds, ms: b16 2.057 / 2.060 → 2.034 / 2.035, b32 2.734 / 2.733 → 2.689 /
// 2.694, b64 4.057 / 4.050 → 3.985 / 3.993); fragments keeps the eleventh session's epilogue. Read once.
bool narrow_row_epilogue() {
  static const bool on = env_choice("MAMBA3_STREAM_GEMM_EPILOGUE", {"rows", "fragments"}) != "fragments";
  return on;
}

template <int NB, bool Rows>
void launch_narrow(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                   float* y, int64_t y_stride, void* act) {
  static const int forced = int(env_integer("MAMBA3_STREAM_GEMM_BLOCKS_PER_SM", 0, 0, 2));
  const int kblocks = int((k + kNarrowKBlock - 1) / kNarrowKBlock);
  const int64_t tiles = (n + kNarrowTileRows - 1) / kNarrowTileRows;
  const int split = split_for(tiles, kblocks, ctx.info().sm_count);
  const bool one = forced ? forced == 1 : split == 1 && tiles <= ctx.info().sm_count;
  MAMBA3_CHECK(!act || split == 1 || Rows, "stream_gemm: the gated epilogue needs unsplit tiles (split {})", split);
  if (one) return launch<Narrow<NB, 1, Rows>>(ctx, w, n, k, x, m, x_stride, y, y_stride, kblocks, tiles, split, act);
  launch<Narrow<NB, 2, Rows>>(ctx, w, n, k, x, m, x_stride, y, y_stride, kblocks, tiles, split, act);
}
template <int NB>
void launch_narrow(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                   float* y, int64_t y_stride, void* act) {
  if (narrow_row_epilogue()) return launch_narrow<NB, true>(ctx, w, n, k, x, m, x_stride, y, y_stride, act);
  launch_narrow<NB, false>(ctx, w, n, k, x, m, x_stride, y, y_stride, act);
}

// How many clusters of `split` blocks of form F the device runs at once (a cluster's blocks share a GPC, so this is
// not simply SMs / split; 0 if none fits). Asked once per (form, split).
template <class F>
int clusters_at_once(int split) {
  static std::mutex mutex;
  static std::array<int, kMaxSplit + 1> known = [] {
    std::array<int, kMaxSplit + 1> unknown;
    unknown.fill(-1);
    return unknown;
  }();
  std::lock_guard<std::mutex> lock(mutex);
  if (known[split] < 0) {
    set_attributes_once<F>();
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(unsigned(split));
    config.blockDim = dim3(F::kThreads);
    config.dynamicSmemBytes = F::kSmemBytes;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = unsigned(split);
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int clusters = 0;
    MAMBA3_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, stream_gemm_kernel<F, kNormNone, 0>, &config));
    known[split] = clusters;
  }
  return known[split];
}

// A wide-class grid: the tile height (256 or 128 weight rows), tiles, k-blocks, blocks per tile, and its cost.
struct WideGrid {
  int tile_rows = 0, kblocks = 0, split = 1;
  int64_t tiles = 0;
  double cost = 0;
};

// The wide-class grid of form F for an N × K product (a function of N, K and the device only: rows batch-invariant).
// Every block moves its W rows and the 128 x rows over its k-blocks, plus, when split, its part of the tile through
// distributed shared memory; the SMs stream in parallel, so a grid costs about (waves) × (one block's bytes). A split
// tile's part counts kSplitPartWeight times its bytes: fitted to the H100 (thirty-eighth session, 1.5B at 128 rows,
// µs per product with the split forced: in_proj unsplit on 128-row tiles 18.9 against 21.7 on 256-row tiles split 3;
// out_proj split 4 / 6 13.0 / 13.1, unsplit 25.9; fc1 unsplit 18.2, split 2 18.5) — the cluster barrier, the part's
// round trip through shared memory and the DSMEM reads cost about four times their bytes at the stream's rate. Splits
// whose clusters do not all fit at once are not taken (a second wave would double the time). The split with the
// lowest cost wins (the smaller on ties); MAMBA3_STREAM_GEMM_SPLIT forces one (≤ the k-blocks; if its clusters do not
// fit at once they run in waves).
constexpr double kSplitPartWeight = 4.0;
template <class F>
WideGrid wide_grid_of(int64_t n, int64_t k, int sm_count) {
  WideGrid best;
  best.tile_rows = F::kTileRows;
  best.kblocks = int((k + F::kKBlock - 1) / F::kKBlock);
  best.tiles = (n + F::kTileRows - 1) / F::kTileRows;
  const double row_bytes = double(F::kKBlock) * 2;
  const double part_bytes = kSplitPartWeight * F::NB * stream_layout::row_pitch(F::kTileRows) * 4;
  auto cost = [&](int s, int64_t waves) {
    const double kb = double((best.kblocks + s - 1) / s);
    return double(waves) * ((F::kTileRows + F::NB) * kb * row_bytes + (s > 1 ? part_bytes : 0.0));
  };
  const int max_split = std::min(kMaxSplit, best.kblocks);
  if (forced_split() > 0) {
    best.split = std::min(forced_split(), max_split);
    best.cost = cost(best.split, 1);
    return best;
  }
  best.split = 1;
  best.cost = cost(1, (best.tiles + sm_count - 1) / sm_count);
  for (int s = 2; s <= max_split; ++s) {
    if (best.tiles > clusters_at_once<F>(s)) continue;
    if (const double c = cost(s, 1); c < best.cost) best.split = s, best.cost = c;
  }
  return best;
}

// The tile height of the wide class: 256 rows (half the x bytes per W byte) unless 128-row tiles cost less — small N,
// where 256-row tiles leave SMs idle (1.5B out_proj/fc2, N 2048: 8 tiles × 8 blocks on 64 SMs, or 16 × 8 on 128).
// MAMBA3_STREAM_GEMM_WIDE_TILE = 128 or 256 forces one, 64 the WideShort form (A/B runs). Kept per (N, K): the engine
// uses one device.
WideGrid wide_grid(const Context& ctx, int64_t n, int64_t k) {
  static const std::string forced = env_choice("MAMBA3_STREAM_GEMM_WIDE_TILE", {"auto", "64", "128", "256"});
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int64_t>, WideGrid> known;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = known.find({n, k}); it != known.end()) return it->second;
  }
  if (forced == "64") {
    const WideGrid g = wide_grid_of<WideShort>(n, k, 2 * ctx.info().sm_count);
    std::lock_guard<std::mutex> lock(mutex);
    return known[{n, k}] = g;
  }
  WideGrid g = wide_grid_of<WideTall>(n, k, ctx.info().sm_count);
  if (forced != "256") {
    const WideGrid low = wide_grid_of<WideLow>(n, k, ctx.info().sm_count);
    if (forced == "128" || low.cost < g.cost) g = low;
  }
  std::lock_guard<std::mutex> lock(mutex);
  known[{n, k}] = g;
  return g;
}

template <int Norm>
void launch_wide(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                 float* y, int64_t y_stride, void* act, const FoldArgs& fold = FoldArgs{}) {
  const WideGrid g = wide_grid(ctx, n, k);
  if (g.tile_rows == WideShort::kTileRows)
    return launch<WideShort, Norm>(ctx, w, n, k, x, m, x_stride, y, y_stride, g.kblocks, g.tiles, g.split, act, fold);
  if (g.tile_rows == WideTall::kTileRows)
    return launch<WideTall, Norm>(ctx, w, n, k, x, m, x_stride, y, y_stride, g.kblocks, g.tiles, g.split, act, fold);
  launch<WideLow, Norm>(ctx, w, n, k, x, m, x_stride, y, y_stride, g.kblocks, g.tiles, g.split, act, fold);
}

void dispatch(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
              float* y, int64_t y_stride, void* act) {
  if (m <= 8) return launch_narrow<8>(ctx, w, n, k, x, m, x_stride, y, y_stride, act);
  if (m <= 16) return launch_narrow<16>(ctx, w, n, k, x, m, x_stride, y, y_stride, act);
  if (m <= 32) return launch_narrow<32>(ctx, w, n, k, x, m, x_stride, y, y_stride, act);
  if (m <= kStreamGemmNarrowMaxRows) return launch_narrow<64>(ctx, w, n, k, x, m, x_stride, y, y_stride, act);
  launch_wide<kNormNone>(ctx, w, n, k, x, m, x_stride, y, y_stride, act);
}

FoldArgs fold_in(const GemvRowScale& in) {
  MAMBA3_CHECK(in.partials && in.parts > 0 && in.parts <= (int64_t(1) << 30) && in.d > 0,
               "stream_gemm (folded norm): partials, their count and the norm's width are required");
  FoldArgs f;
  f.partials_in = in.partials;
  f.parts = int(in.parts);
  f.d = int(in.d);
  f.eps = in.eps;
  return f;
}

void check_folds(const char* what, const Context& ctx, int64_t m, int64_t n, int64_t k, int64_t x_stride, const void* w,
                 const void* x) {
  MAMBA3_CHECK(stream_gemm_folds_norms(ctx, m, n, k) && stream_gemm_supported(ctx, m, n, k, x_stride, w, x),
               "{}: unsupported product (M {}, N {}, K {}, x stride {}; device cc {}.{}; folded norms take 65–{} "
               "rows)",
               what, m, n, k, x_stride, ctx.info().cc_major, ctx.info().cc_minor, kStreamGemmMaxRows);
}

}  // namespace

bool stream_gemm_supported(const Context& ctx, int64_t m, int64_t n, int64_t k, int64_t x_stride, const void* w,
                           const void* x) {
  return ctx.info().cc_major == 9 && ctx.info().cc_minor == 0 && m >= 1 && m <= kStreamGemmMaxRows && n >= 1 &&
         n < (int64_t(1) << 31) && k >= 8 && k % 8 == 0 && x_stride % 8 == 0 && k < (int64_t(1) << 31) &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

void stream_gemm(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                 int64_t x_stride, float* y, int64_t y_stride) {
  MAMBA3_CHECK(stream_gemm_supported(ctx, m, n, k, x_stride, w, x),
               "stream_gemm: unsupported product (M {}, N {}, K {}, x stride {}; device cc {}.{})", m, n, k, x_stride,
               ctx.info().cc_major, ctx.info().cc_minor);
  dispatch(ctx, w, n, k, x, m, x_stride, y, y_stride, nullptr);
}

bool stream_gemm_gated_pairs_supported(const Context& ctx, int64_t m, int64_t n, int64_t k, int64_t x_stride,
                                       const void* w, const void* x) {
  if (!stream_gemm_supported(ctx, m, n, k, x_stride, w, x) || n % 2 != 0) return false;
  if (stream_gemm_row_epilogue(m)) return true;  // it adds whole rows, so (value, gate) pairs stay together
  const int kblocks = int((k + kNarrowKBlock - 1) / kNarrowKBlock);
  return split_for((n + kNarrowTileRows - 1) / kNarrowTileRows, kblocks, ctx.info().sm_count) == 1;
}

void stream_gemm_gated_pairs(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                             int64_t x_stride, void* act) {
  MAMBA3_CHECK(stream_gemm_gated_pairs_supported(ctx, m, n, k, x_stride, w, x),
               "stream_gemm_gated_pairs: unsupported product (M {}, N {}, K {}, x stride {}; device cc {}.{})", m, n,
               k, x_stride, ctx.info().cc_major, ctx.info().cc_minor);
  dispatch(ctx, w, n, k, x, m, x_stride, nullptr, 0, act);
}

bool stream_gemm_folds_norms(const Context& ctx, int64_t m, int64_t n, int64_t k) {
  return ctx.info().cc_major == 9 && ctx.info().cc_minor == 0 && m > kStreamGemmNarrowMaxRows &&
         m <= kStreamGemmMaxRows && n >= 1 && n < (int64_t(1) << 31) && k >= 8 && k % 8 == 0 && k < (int64_t(1) << 31);
}

int64_t stream_gemm_norm_parts(const Context& ctx, int64_t n, int64_t k) {
  return wide_grid(ctx, n, k).tiles;
}

void stream_gemm_residual_norm(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                               int64_t x_stride, const GemvResidualNorm& out) {
  check_folds("stream_gemm_residual_norm", ctx, m, n, k, x_stride, w, x);
  MAMBA3_CHECK(out.residual && out.weight && out.out16 && out.partials,
               "stream_gemm_residual_norm: residual, weight, out16 and partials are required");
  FoldArgs f;
  f.residual = out.residual;
  f.weight = out.weight;
  f.out16 = static_cast<__nv_bfloat16*>(out.out16);
  f.partials_out = out.partials;
  launch_wide<kNormOut>(ctx, w, n, k, x, m, x_stride, nullptr, n, nullptr, f);
}

void stream_gemm_scaled(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                        int64_t x_stride, float* y, int64_t y_stride, const GemvRowScale& in) {
  check_folds("stream_gemm_scaled", ctx, m, n, k, x_stride, w, x);
  launch_wide<kNormIn>(ctx, w, n, k, x, m, x_stride, y, y_stride, nullptr, fold_in(in));
}

void stream_gemm_gated_pairs_scaled(const Context& ctx, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                                    int64_t x_stride, void* act, const GemvRowScale& in) {
  check_folds("stream_gemm_gated_pairs_scaled", ctx, m, n, k, x_stride, w, x);
  MAMBA3_CHECK(n % 2 == 0, "stream_gemm_gated_pairs_scaled: {} output rows are not (value, gate) pairs", n);
  launch_wide<kNormIn>(ctx, w, n, k, x, m, x_stride, nullptr, 0, act, fold_in(in));
}

bool stream_gemm_row_epilogue(int64_t m) { return m > kStreamGemmNarrowMaxRows || narrow_row_epilogue(); }

StreamGemmWideGrid stream_gemm_wide_grid(const Context& ctx, int64_t n, int64_t k) {
  const WideGrid g = wide_grid(ctx, n, k);
  return {g.tile_rows, g.split};
}

namespace {
const std::string& route_mode() {
  static const std::string mode = env_choice("MAMBA3_STREAM_GEMM", {"auto", "0", "all"});
  return mode;
}
}  // namespace

bool stream_gemm_preferred(int64_t m) {
  if (route_mode() == "0") return false;
  if (route_mode() == "all") return true;
  return m >= kDefaultMinRows && m <= kStreamGemmNarrowMaxRows;  // "auto" or unset: 2–64 rows
}

bool stream_gemm_folds_preferred(int64_t m) {
  return route_mode() != "0" && m > kStreamGemmNarrowMaxRows && m <= kStreamGemmMaxRows;
}

}  // namespace mamba3::cuda
