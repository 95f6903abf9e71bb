#pragma once
// The chunk-state chain's per-chunk step on bf16 tensor cores, shared by the chain kernel (mamba3_train_state_chain.cu)
// and the kv chain (mamba3_train_kv_chain.cu) so that both keep the same fragments, k-steps and roundings (the same
// bits). A warp holds a 16 × 8·NT tile of the state in the mma accumulator layout (mma_bf16.cuh).
#include <cstdint>

#include "cuda/train/mma_bf16.cuh"

namespace mamba3::cuda::train_detail::chain_step {

using mma_bf16::bf16;

// An A fragment of k-step kb scaled row by row and rounded to bf16 (scale_pair): its rows t = 16·kb + 2q, + 1 (a[0],
// a[1]) and + 8, + 9 (a[2], a[3]), w_kb = the chunk's row scales from row 16·kb.
__device__ __forceinline__ void scale_rows(uint32_t (&a)[4], const float* w_kb) {
  const int q = threadIdx.x % 4;
  const float2 w0 = *reinterpret_cast<const float2*>(w_kb + 2 * q);
  const float2 w8 = *reinterpret_cast<const float2*>(w_kb + 2 * q + 8);
  a[0] = mma_bf16::scale_pair(a[0], w0.x, w0.y), a[1] = mma_bf16::scale_pair(a[1], w0.x, w0.y);
  a[2] = mma_bf16::scale_pair(a[2], w8.x, w8.y), a[3] = mma_bf16::scale_pair(a[3], w8.x, w8.y);
}

// acc += a·B over the NT n-tiles from column n0, B's rows k0 … k0 + 15 stored (k, n) at pitch ld.
template <int NT>
__device__ __forceinline__ void accumulate(float (&acc)[NT][4], const uint32_t (&a)[4], const bf16* B, int ld, int k0,
                                           int n0) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t b[4];
    mma_bf16::load_b_kn(B, ld, k0, n0 + 16 * np, b);
    mma_bf16::mma(acc[2 * np], a, b[0], b[1]), mma_bf16::mma(acc[2 * np + 1], a, b[2], b[3]);
  }
}

// The scan's step on the running state: S ← decay·S + Δ, one fused multiply-add per element.
template <int NT>
__device__ __forceinline__ void scan_update(float (&st)[NT][4], const float (&delta)[NT][4], float decay) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) st[nt][e] = __fmaf_rn(decay, st[nt][e], delta[nt][e]);
}

// One chunk's step with A = w ⊙ v formed in the fragments (scale_rows): acc = (w ⊙ v)ᵀ·B over the chunk's kRows rows
// for the warp's 16 × 8·NT tile (rows pr of P, columns n0), then st ← decay·st + acc. v stored (row, P) at pitch lda,
// B (row, N) at pitch ldb, w the chunk's row scales.
template <int kRows, int NT>
__device__ __forceinline__ void scaled_step(float (&st)[NT][4], const bf16* v, int lda, const float* w, const bf16* B,
                                            int ldb, int pr, int n0, float decay) {
  float acc[NT][4];
  mma_bf16::zero(acc);
#pragma unroll
  for (int kb = 0; kb < kRows / 16; ++kb) {
    uint32_t a[4];
    mma_bf16::load_a_t(v, lda, 16 * kb, pr, a);
    scale_rows(a, w + 16 * kb);
    accumulate(acc, a, B, ldb, 16 * kb, n0);
  }
  scan_update(st, acc, decay);
}

// The running state rounded to bf16 (pack: the chain's rounding) into a shared-memory (P, N) slice at pitch ld: the
// warp's rows pr + g and pr + g + 8, columns n0 + 8·nt + 2q.
template <int NT>
__device__ __forceinline__ void store_slice(const float (&st)[NT][4], bf16* slice, int ld, int pr, int n0) {
  const int lane = threadIdx.x % 32;
  uint32_t* so = reinterpret_cast<uint32_t*>(slice) + ((pr + lane / 4) * ld + n0) / 2 + lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    so[nt * 4] = mma_bf16::pack(st[nt][0], st[nt][1]);
    so[nt * 4 + 4 * ld] = mma_bf16::pack(st[nt][2], st[nt][3]);
  }
}

// ROWS × COLS bf16 from shared memory (pitch ld) to global memory (pitch COLS), 16 bytes per thread and piece, by a
// block of kThreads threads (the kv chain's v and state slice).
template <int kThreads, int ROWS, int COLS>
__device__ __forceinline__ void store_tile_16b(bf16* dst, const bf16* src, int ld) {
  constexpr int per_row = COLS / 8, pieces = ROWS * per_row;
  static_assert(pieces % kThreads == 0, "whole passes over the tile");
#pragma unroll
  for (int j = 0; j < pieces / kThreads; ++j) {
    const int k = int(threadIdx.x) + j * kThreads, r = k / per_row, c = k % per_row * 8;
    *reinterpret_cast<uint4*>(dst + r * COLS + c) = *reinterpret_cast<const uint4*>(src + r * ld + c);
  }
}

}  // namespace mamba3::cuda::train_detail::chain_step
