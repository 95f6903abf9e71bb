#pragma once
// Warp-level bf16 tensor-core helpers of the training chunk kernels (mamba3_train_bwd_core.cu,
// mamba3_train_fwd_core.cu): ldmatrix fragment loads from row-major shared-memory tiles, the m16n8k16 product with
// f32 accumulation, cp.async tile copies and accumulator stores. Fragment layouts are PTX's for mma.m16n8k16 (g =
// lane / 4, q = lane % 4): A rows g and g + 8, columns 2q, 2q + 1 (+ 8); B columns g, rows 2q, 2q + 1 (+ 8); C rows
// g and g + 8, columns 2q, 2q + 1. Blocks of kCoreThreads threads.
#include <cuda_bf16.h>

#include <cstdint>

namespace mamba3::cuda::train_detail::mma_bf16 {

constexpr int kCoreWarps = 4, kCoreThreads = 32 * kCoreWarps;
using bf16 = __nv_bfloat16;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// ldmatrix x4 at a shared-memory address (smem_addr), for callers that form it once and step it.
__device__ __forceinline__ void ldsm_x4_at(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4(const void* p, uint32_t (&r)[4]) { ldsm_x4_at(smem_addr(p), r); }
__device__ __forceinline__ void ldsm_x4_trans(const void* p, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// A fragment register (a bf16 pair) scaled by (w0, w1) and rounded to nearest even: bf16(w·v) per element, as a kernel
// writing w ⊙ v from bf16 v rounds it.
__device__ __forceinline__ uint32_t scale_pair(uint32_t v, float w0, float w1) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  const __nv_bfloat162 r = __floats2bfloat162_rn(__fmul_rn(w0, f.x), __fmul_rn(w1, f.y));
  return *reinterpret_cast<const uint32_t*>(&r);
}
// c += a·b, one m16n8k16 tile (a: 4 registers of bf16 pairs, b: 2).
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Fragment loads (lane = threadIdx.x % 32). X is a row-major bf16 tile with row pitch ld (elements).
// A (16 × 16 at rows r0, columns k0) of a row-major X.
__device__ __forceinline__ void load_a(const bf16* X, int ld, int r0, int k0, uint32_t (&a)[4]) {
  const int lane = threadIdx.x % 32;
  ldsm_x4(X + (r0 + lane % 16) * ld + k0 + (lane / 16) * 8, a);
}
// A (16 × 16 at rows m0, columns k0) of Xᵀ, X stored (k, m).
__device__ __forceinline__ void load_a_t(const bf16* X, int ld, int k0, int m0, uint32_t (&a)[4]) {
  const int lane = threadIdx.x % 32;
  ldsm_x4_trans(X + (k0 + lane % 8 + (lane / 16) * 8) * ld + m0 + ((lane / 8) % 2) * 8, a);
}
// B of two n-tiles (columns n0 … n0 + 15, rows k0 … k0 + 15) where B[k][n] = X[n][k] (X stored (n, k)):
// b[0], b[1] for tile n0, b[2], b[3] for tile n0 + 8.
__device__ __forceinline__ void load_b_nk(const bf16* X, int ld, int n0, int k0, uint32_t (&b)[4]) {
  const int lane = threadIdx.x % 32;
  ldsm_x4(X + (n0 + lane % 8 + (lane / 16) * 8) * ld + k0 + ((lane / 8) % 2) * 8, b);
}
// The same where B[k][n] = X[k][n] (X stored (k, n)).
__device__ __forceinline__ void load_b_kn(const bf16* X, int ld, int k0, int n0, uint32_t (&b)[4]) {
  const int lane = threadIdx.x % 32;
  ldsm_x4_trans(X + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * ld + n0 + (lane / 16) * 8, b);
}

// ROWS × COLS bf16 (in global memory at row pitch src_ld, COLS a multiple of 8) into shared memory at pitch ld, 16
// bytes a copy, by a block of kThreads threads. A thread keeps one column piece and takes every (kThreads / pieces per
// row)-th row, so its copies are one address plus compile-time offsets: the loop over pieces with a division per copy
// that this replaced cost ~20 instructions per copy (about a sixth of the fused backward core's instructions).
// copy_tile_by: the same by a group of kThreads threads, `tid` the thread's index in the group.
template <int kThreads, int ROWS, int COLS>
__device__ __forceinline__ void copy_tile_by(int tid, bf16* dst, int ld, const bf16* src, int src_ld = COLS) {
  constexpr int per_row = COLS / 8, pieces = ROWS * per_row;
  static_assert(COLS % 8 == 0 && kThreads % per_row == 0, "a thread's pieces in one column");
  constexpr int step = kThreads / per_row;  // rows per pass of the block
  const int r = tid / per_row, c = tid % per_row * 8;
  dst += r * ld + c, src += r * src_ld + c;
  if constexpr (pieces % kThreads == 0) {
#pragma unroll
    for (int k = 0; k < ROWS / step; ++k)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst + k * step * ld)),
                   "l"(src + k * step * src_ld));
  } else {
    static_assert(pieces < kThreads, "a whole number of passes, or less than one");
    if (r < ROWS)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
  }
}
template <int kThreads, int ROWS, int COLS>
__device__ __forceinline__ void copy_tile(bf16* dst, int ld, const bf16* src, int src_ld = COLS) {
  copy_tile_by<kThreads, ROWS, COLS>(int(threadIdx.x), dst, ld, src, src_ld);
}

// Two accumulator values at o: as f32, or rounded to bf16 (nearest even; uint16_t holds the bits).
__device__ __forceinline__ void store_acc_pair(float* o, float a, float b) {
  *reinterpret_cast<float2*>(o) = make_float2(a, b);
}
__device__ __forceinline__ void store_acc_pair(uint16_t* o, float a, float b) {
  *reinterpret_cast<uint32_t*>(o) = pack(a, b);
}

// Accumulator tiles (16 rows × 8·NT columns) to a row-major f32 or bf16 matrix (row r0 of `out`, pitch ld, column
// c0), a pair per lane and row.
template <int NT, typename T>
__device__ __forceinline__ void store_tiles(const float (&acc)[NT][4], T* out, int ld, int r0, int c0) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    T* o = out + int64_t(r0 + g) * ld + c0 + nt * 8 + 2 * q;
    store_acc_pair(o, acc[nt][0], acc[nt][1]);
    store_acc_pair(o + 8 * ld, acc[nt][2], acc[nt][3]);
  }
}

// Bf16 results leave the fragments 16 bytes per lane: a lane's four bf16 pairs v[i] (n-tile i of a group of four:
// columns 8i + 2q, 8i + 2q + 1 of its row) are exchanged within the quad — a 4 × 4 transpose in two butterfly rounds —
// so that v[i] then holds columns 8q + 2i, 8q + 2i + 1, n-tile q's eight columns. Stores of 4 bytes per lane (16 bytes
// in each of 8 rows per warp instruction) ran at a quarter of the coalesced rate on the H200 (a probe: 1.0 against
// 3.8 TB/s; the state chain's took more than half of its time). Every lane of the warp takes part.
__device__ __forceinline__ void quad_transpose(uint32_t (&v)[4]) {
  const int q = threadIdx.x % 4;
  const bool hi = q & 2, odd = q & 1;
#pragma unroll
  for (int s = 0; s < 2; ++s) {  // elements whose index differs from q in bit 1, with lane q ^ 2
    const uint32_t r = __shfl_xor_sync(0xffffffffu, hi ? v[s] : v[2 + s], 2);
    if (hi) v[s] = r;
    else v[2 + s] = r;
  }
#pragma unroll
  for (int s = 0; s < 2; ++s) {  // then in bit 0, with lane q ^ 1
    const uint32_t r = __shfl_xor_sync(0xffffffffu, odd ? v[2 * s] : v[2 * s + 1], 1);
    if (odd) v[2 * s] = r;
    else v[2 * s + 1] = r;
  }
}

// p, stated 16-byte aligned, for the callers of store_row_pairs and store_tiles_bf16: where the compiler cannot prove
// a row's 16-byte alignment from its buffer's type and offset it splits each 16-byte store into four 4-byte ones
// (four times the store instructions and L2 requests). It takes the statement at a buffer's base pointer when the
// row's offset is a visible multiple of 8 elements (the forward walk's y16 rows), not inside the store functions.
template <typename T>
__device__ __forceinline__ T* aligned16(T* p) {
  return static_cast<T*>(__builtin_assume_aligned(p, 16));
}

// A row's bf16 pairs as the fragments hold them (w[nt]: columns 8·nt + 2q, 8·nt + 2q + 1 of the lane's row, NW a
// multiple of 4) stored 16 bytes per lane through quad_transpose at `row` (16-byte aligned). store false: the
// exchange only — every lane of the warp takes part in it, also those whose row is not stored.
template <int NW, typename T>
__device__ __forceinline__ void store_row_pairs(const uint32_t (&w)[NW], T* row, bool store) {
  static_assert(NW % 4 == 0 && sizeof(T) == 2, "groups of four n-tiles of 16-bit values");
  const int q = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < NW / 4; ++j) {
    uint32_t v[4] = {w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]};
    quad_transpose(v);  // lane q: n-tile 4j + q's eight columns
    if (store) *reinterpret_cast<uint4*>(row + (4 * j + q) * 8) = make_uint4(v[0], v[1], v[2], v[3]);
  }
}

// store_tiles for bf16 (pack's rounding, the same bits) through store_row_pairs: out's rows 16-byte aligned at column
// c0 (ld and c0 multiples of 8 elements), NT a multiple of 4.
template <int NT, typename T>
__device__ __forceinline__ void store_tiles_bf16(const float (&acc)[NT][4], T* out, int64_t ld, int r0, int c0) {
  const int g = threadIdx.x % 32 / 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint32_t w[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) w[nt] = pack(acc[nt][2 * half], acc[nt][2 * half + 1]);
    store_row_pairs(w, out + (r0 + g + 8 * half) * ld + c0, true);
  }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
}

// Sum over the four lanes of a quad (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace mamba3::cuda::train_detail::mma_bf16
