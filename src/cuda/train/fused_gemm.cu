// bf16 training products with the GatedMLP's element-wise halves in their epilogues (fused_gemm.h). sm_90a only.
//
// A block per SM walks the output tiles (128 rows × 256 columns) in order tile = blockIdx.x + i·gridDim.x, the
// columns of a row band fastest (its A rows stay in L2 while the band's tiles run). Warps 4–11 are two consumer
// warpgroups (rows 64·wg … + 63 of the tile, wgmma m64n128k16 twice per k-step: the tile's two 128-column halves);
// warp 0's lane 0 is the producer (warps 1–3 only give their registers away). Per 64-column k-block a stage holds A's
// 128 × 64 box and B's two 128 × 64 boxes
// (48 KB, 128-byte swizzled), four stages in a ring with full/empty mbarriers; the producer runs ahead across tiles,
// so the next tile's first stages load while the consumers store this one's epilogue. The consumers keep one k-block's
// products in flight (wgmma.wait_group 1) and release a stage once the products after it are issued.
//
// The two halves of B's tile are separate boxes so that the gated forward can take fc1's value rows j0 … j0 + 127 and
// its gate rows d_ff + j0 … together: each consumer thread then holds a and g of the same (row, column) in its two
// accumulators, and the epilogue forms o = a ⊙ silu(g) in registers.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <string>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_check.h"
#include "cuda/cuda_context.h"
#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/train/fused_gemm.h"
#include "cuda/train/gated_silu_math.cuh"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/wgmma_bf16.cuh"

namespace mamba3::cuda {
namespace {

constexpr int kTileM = 128, kHalfN = 128, kTileN = 2 * kHalfN, kKBlock = 64;
constexpr int kStages = 4;
constexpr int kABytes = kTileM * kKBlock * 2, kBHalfBytes = kHalfN * kKBlock * 2;
constexpr int kStageBytes = kABytes + 2 * kBHalfBytes;  // 48 KB
// A producer warpgroup (one thread of it issues the copies) and two consumer warpgroups. The producer's registers go
// to the consumers (setmaxnreg): the register file is split among the SM's four schedulers, a warp to each in turn, so
// a ninth warp (a lone producer warp) made one scheduler hold three warps at the consumers' count, and the launch
// failed at 222 registers per thread. 40 + 2 · 232 registers per thread in each scheduler's share of 16 Ki: 16,128.
constexpr int kConsumerThreads = 256, kThreads = kConsumerThreads + 128;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + 2 * kStages * sizeof(uint64_t) + 1024;  // (+ alignment)

enum Epilogue : int { kPlain = 0, kGatedForward = 1, kGatedBackward = 2 };

struct Args {
  int64_t M, K;
  int tiles_n;        // column tiles per row band
  int b_second;       // B's row of the second half, relative to the first half's (128, or d_ff for the gated forward)
  int64_t n_valid;    // plain: output columns (a multiple of 8)
  uint16_t* out;      // plain: D; gated forward: h; gated backward: dh
  int64_t ldo;        // its row pitch (elements)
  uint16_t* out2;     // gated forward: o (M, d_ff)
  const uint16_t* h;  // gated backward: h (M, 2·d_ff)
  int64_t d_ff;
};

// K-major operand rows of 128 bytes, 128-byte swizzled (8-row atoms 1024 bytes apart): wgmma's matrix descriptor.
__device__ __forceinline__ uint64_t desc_of(const void* p) {
  const uint64_t a = smem_addr(p);
  return ((a & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// Consumer thread t of warpgroup wg: its accumulator pair (d[4j + 2e], d[4j + 2e + 1]) of m64n128k16 is row
// 16·(t/32 % 4) + (t % 32)/4 + 8e of the warpgroup's 64, columns 8j + 2(t % 4) and the next.
template <int Epi>
__device__ __forceinline__ void epilogue(const float (&a0)[64], const float (&a1)[64], int64_t row_base, int64_t col0,
                                         const Args& p) {
  const int t = threadIdx.x % 128, lane = t % 32;
  const int64_t r0 = row_base + 16 * (t / 32) + lane / 4;
  const int c = 2 * (lane % 4);
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int64_t row = r0 + 8 * e;
    const bool in_rows = row < p.M;  // (every lane takes part in the quad exchanges, also those past M)
    if constexpr (Epi == kPlain) {
      if (!in_rows) continue;
      uint16_t* dst = p.out + row * p.ldo;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int64_t col = col0 + 8 * j + c;
        if (col < p.n_valid)
          *reinterpret_cast<uint32_t*>(dst + col) = pack_bf16(a0[4 * j + 2 * e], a0[4 * j + 2 * e + 1]);
        if (col + kHalfN < p.n_valid)
          *reinterpret_cast<uint32_t*>(dst + col + kHalfN) = pack_bf16(a1[4 * j + 2 * e], a1[4 * j + 2 * e + 1]);
      }
    } else if constexpr (Epi == kGatedForward) {
      // 16 bytes per lane through the quad exchange (train_detail::mma_bf16::store_row_pairs): a quarter of the store
      // instructions
      uint32_t hv[16], gv[16], ov[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        hv[j] = pack_bf16(a0[4 * j + 2 * e], a0[4 * j + 2 * e + 1]);
        gv[j] = pack_bf16(a1[4 * j + 2 * e], a1[4 * j + 2 * e + 1]);
        const float2 a = unpack_bf16(hv[j]), g = unpack_bf16(gv[j]);
        ov[j] = pack_bf16(gated_silu::forward(a.x, g.x), gated_silu::forward(a.y, g.y));
      }
      uint16_t* h = p.out + row * p.ldo + col0;
      train_detail::mma_bf16::store_row_pairs(hv, h, in_rows);
      train_detail::mma_bf16::store_row_pairs(gv, h + p.d_ff, in_rows);
      train_detail::mma_bf16::store_row_pairs(ov, p.out2 + row * p.d_ff + col0, in_rows);
    } else {
      const uint16_t* h = p.h + row * 2 * p.d_ff;
      uint16_t* dh = p.out + row * 2 * p.d_ff;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float(&acc)[64] = half == 0 ? a0 : a1;
        // do rounded to bf16 (the product's bf16 output that the element-wise kernel reads), then exchanged in each
        // quad so that lane q holds the eight columns of n-tile 4·jg + q: 16-byte loads of a and g, 16-byte stores
        uint32_t d[4][4];
        uint4 av[4], gv[4];
#pragma unroll
        for (int jg = 0; jg < 4; ++jg) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int j = 4 * jg + k;
            d[jg][k] = pack_bf16(acc[4 * j + 2 * e], acc[4 * j + 2 * e + 1]);
          }
          train_detail::mma_bf16::quad_transpose(d[jg]);
          const int64_t col = col0 + half * kHalfN + (4 * jg + lane % 4) * 8;
          if (in_rows) {
            av[jg] = __ldg(reinterpret_cast<const uint4*>(h + col));
            gv[jg] = __ldg(reinterpret_cast<const uint4*>(h + p.d_ff + col));
          }
        }
#pragma unroll
        for (int jg = 0; jg < 4; ++jg) {
          const int64_t col = col0 + half * kHalfN + (4 * jg + lane % 4) * 8;
          const uint32_t a4[4] = {av[jg].x, av[jg].y, av[jg].z, av[jg].w};
          const uint32_t g4[4] = {gv[jg].x, gv[jg].y, gv[jg].z, gv[jg].w};
          uint32_t da4[4], dg4[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 dd = unpack_bf16(d[jg][k]), a = unpack_bf16(a4[k]), g = unpack_bf16(g4[k]);
            float da0, dg0, da1, dg1;
            gated_silu::backward(dd.x, a.x, g.x, da0, dg0);
            gated_silu::backward(dd.y, a.y, g.y, da1, dg1);
            da4[k] = pack_bf16(da0, da1), dg4[k] = pack_bf16(dg0, dg1);
          }
          if (in_rows) {
            *reinterpret_cast<uint4*>(dh + col) = make_uint4(da4[0], da4[1], da4[2], da4[3]);
            *reinterpret_cast<uint4*>(dh + p.d_ff + col) = make_uint4(dg4[0], dg4[1], dg4[2], dg4[3]);
          }
        }
      }
    }
  }
}

template <int Epi>
__global__ void __launch_bounds__(kThreads, 1)
    fused_gemm_kernel(const __grid_constant__ CUtensorMap amap, const __grid_constant__ CUtensorMap bmap,
                      const Args p) {
  pdl_wait();
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tiles = ((p.M + kTileM - 1) / kTileM) * p.tiles_n;
  const int kblocks = int((p.K + kKBlock - 1) / kKBlock);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init_count(&full[s], 1), mbar_init_count(&empty[s], kConsumerThreads / 32);
    mbar_init_fence();
  }
  __syncthreads();
  auto stage_a = [&](int s) { return smem + s * kStageBytes; };
  auto stage_b = [&](int s, int half) { return smem + s * kStageBytes + kABytes + half * kBHalfBytes; };

  if (warp < 4) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (warp == 0 && lane == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(&amap) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(&bmap) : "memory");
      int it = 0;
      for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int m0 = int(tile / p.tiles_n) * kTileM;
        const int b0 = int(tile % p.tiles_n) * (Epi == kGatedForward ? kHalfN : kTileN);
        for (int kb = 0; kb < kblocks; ++kb, ++it) {
          const int s = it % kStages;
          if (it >= kStages) mbar_wait(&empty[s], unsigned((it / kStages - 1) & 1));
          expect_bytes(&full[s], kStageBytes);
          tma_load_2d(stage_a(s), &amap, kb * kKBlock, m0, &full[s]);
          tma_load_2d(stage_b(s, 0), &bmap, kb * kKBlock, b0, &full[s]);
          tma_load_2d(stage_b(s, 1), &bmap, kb * kKBlock, b0 + p.b_second, &full[s]);
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
  const int wg = warp / 4 - 1;  // the consumer warpgroup: rows 64·wg … of the tile
  int it = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    float acc0[64], acc1[64];
    for (int kb = 0; kb < kblocks; ++kb, ++it) {
      const int s = it % kStages;
      mbar_wait(&full[s], unsigned((it / kStages) & 1));
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      const unsigned char* a = stage_a(s) + wg * 64 * 128;
#pragma unroll
      for (int kk = 0; kk < kKBlock / 16; ++kk) {
        const uint64_t da = desc_of(a + kk * 32);
        wgmma::Mma<kHalfN>::run(acc0, da, desc_of(stage_b(s, 0) + kk * 32), kb > 0 || kk > 0);
        wgmma::Mma<kHalfN>::run(acc1, da, desc_of(stage_b(s, 1) + kk * 32), kb > 0 || kk > 0);
      }
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");  // the previous k-block's products are done
      if (kb > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % kStages]);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    if (lane == 0) mbar_arrive(&empty[(it - 1) % kStages]);
    const int64_t row_base = (tile / p.tiles_n) * kTileM + 64 * wg;
    const int64_t col0 = (tile % p.tiles_n) * (Epi == kGatedForward ? kHalfN : kTileN);
    epilogue<Epi>(acc0, acc1, row_base, col0, p);
  }
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
    MAMBA3_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status));
    MAMBA3_CHECK(status == cudaDriverEntryPointSuccess && f, "fused_gemm: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// (rows × cols) bf16, rows `ld` elements apart, in boxes of 128 rows × 64 columns, 128-byte swizzled; reads outside
// the matrix give zeros (the last row band's missing rows, K's last partial k-block).
CUtensorMap operand_map(const void* base, int64_t rows, int64_t cols, int64_t ld) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(ld) * 2};
  const cuuint32_t box[2] = {cuuint32_t(kKBlock), cuuint32_t(kHalfN)};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
                                 unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MAMBA3_CHECK(r == CUDA_SUCCESS, "fused_gemm: cuTensorMapEncodeTiled failed ({}) for a {}×{} operand", int(r), rows,
               cols);
  return map;
}

bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
bool operand_ok(const void* p, int64_t ld, int64_t K) { return p && aligned(p) && ld % 8 == 0 && ld >= K; }

template <int Epi>
void launch(cudaStream_t s, const CUtensorMap& amap, const CUtensorMap& bmap, const Args& p) {
  if (p.M <= 0) return;
  static const cudaError_t opted =
      cudaFuncSetAttribute(fused_gemm_kernel<Epi>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes));
  MAMBA3_CUDA_CHECK(opted);
  static const int sms = device_info().sm_count;
  const int64_t tiles = ((p.M + kTileM - 1) / kTileM) * p.tiles_n;
  const unsigned grid = unsigned(tiles < sms ? tiles : sms);
  launch_train(fused_gemm_kernel<Epi>, grid, kThreads, kSmemBytes, s, amap, bmap, p);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace

// Off until measured on an H100 (the sixtieth session's device starts all failed): MAMBA3_TRAIN_FUSED_GEMM=1 opts in.
constexpr bool kFusedGemmDefault = false;

bool fused_gemm_device_supported() {
  static const bool ok = [] {
    const DeviceInfo d = device_info();
    return d.available && d.cc_major == 9 && d.cc_minor == 0;
  }();
  return ok;
}

bool fused_gemm_enabled() {
  static const bool on = [] {
    const std::string v = env_choice("MAMBA3_TRAIN_FUSED_GEMM", {"1", "0"});
    return fused_gemm_device_supported() && (v.empty() ? kFusedGemmDefault : v == "1");
  }();
  return on;
}

bool fused_gemm_plain_supported(const void* A, int64_t lda, const void* B, int64_t ldb, int64_t N, int64_t K,
                                const void* D, int64_t ldd) {
  return K >= 1 && K % 8 == 0 && N >= 1 && N % 8 == 0 && operand_ok(A, lda, K) && operand_ok(B, ldb, K) && D &&
         aligned(D) && ldd % 8 == 0 && ldd >= N;
}
bool fused_gemm_gated_forward_supported(const void* x, int64_t ldx, const void* w1, int64_t K, int64_t d_ff,
                                        const void* h, const void* o) {
  return K >= 1 && K % 8 == 0 && d_ff >= kHalfN && d_ff % kHalfN == 0 && operand_ok(x, ldx, K) &&
         operand_ok(w1, K, K) && h && o && aligned(h) && aligned(o);
}
bool fused_gemm_gated_backward_supported(const void* dy, int64_t ldy, const void* w2t, int64_t K, int64_t d_ff,
                                         const void* h, const void* dh) {
  return K >= 1 && K % 8 == 0 && d_ff >= kTileN && d_ff % kTileN == 0 && operand_ok(dy, ldy, K) &&
         operand_ok(w2t, K, K) && h && dh && aligned(h) && aligned(dh);
}

void fused_gemm_plain(cudaStream_t s, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t M,
                      int64_t N, int64_t K, uint16_t* D, int64_t ldd) {
  MAMBA3_CHECK(fused_gemm_plain_supported(A, lda, B, ldb, N, K, D, ldd),
               "fused_gemm_plain: unsupported operands (N {} K {} lda {} ldb {} ldd {}: 16-byte aligned rows, K and "
               "N multiples of 8)",
               N, K, lda, ldb, ldd);
  Args p{};
  p.M = M, p.K = K, p.tiles_n = int((N + kTileN - 1) / kTileN), p.b_second = kHalfN, p.n_valid = N, p.out = D,
  p.ldo = ldd;
  launch<kPlain>(s, operand_map(A, M, K, lda), operand_map(B, N, K, ldb), p);
}

void fused_gemm_gated_forward(cudaStream_t s, const uint16_t* x, int64_t ldx, const uint16_t* w1, int64_t M, int64_t K,
                              int64_t d_ff, uint16_t* h, uint16_t* o) {
  MAMBA3_CHECK(fused_gemm_gated_forward_supported(x, ldx, w1, K, d_ff, h, o),
               "fused_gemm_gated_forward: unsupported operands (K {} d_ff {} ldx {})", K, d_ff, ldx);
  Args p{};
  p.M = M, p.K = K, p.tiles_n = int(d_ff / kHalfN), p.b_second = int(d_ff), p.out = h, p.ldo = 2 * d_ff, p.out2 = o,
  p.d_ff = d_ff;
  launch<kGatedForward>(s, operand_map(x, M, K, ldx), operand_map(w1, 2 * d_ff, K, K), p);
}

void fused_gemm_gated_backward(cudaStream_t s, const uint16_t* dy, int64_t ldy, const uint16_t* w2t, int64_t M,
                               int64_t K, int64_t d_ff, const uint16_t* h, uint16_t* dh) {
  MAMBA3_CHECK(fused_gemm_gated_backward_supported(dy, ldy, w2t, K, d_ff, h, dh),
               "fused_gemm_gated_backward: unsupported operands (K {} d_ff {} ldy {})", K, d_ff, ldy);
  Args p{};
  p.M = M, p.K = K, p.tiles_n = int(d_ff / kTileN), p.b_second = kHalfN, p.out = dh, p.ldo = 2 * d_ff, p.h = h,
  p.d_ff = d_ff;
  launch<kGatedBackward>(s, operand_map(dy, M, K, ldy), operand_map(w2t, d_ff, K, K), p);
}

}  // namespace mamba3::cuda
