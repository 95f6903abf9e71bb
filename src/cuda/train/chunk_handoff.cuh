#pragma once
// The chunk-state chain inside a core (the forward core carrying the states entering each chunk, the fused backward
// core the dH entering each chunk): each block forms its chunk's own state product, then takes over the running state
// from the block of the previous chunk in chain order, applies the scan's multiply-add and hands the result on. The
// hand-over goes through L2: one f32 state per sequence-head (written and read by the same thread mapping, so each
// thread reads back what the matching thread of the previous block wrote) and a flag per sequence-head.
//
// Deadlock freedom: blocks take tickets (an atomic counter) mapped to chunks chunk-major over the B·H sequence-heads,
// in chain order, so the block a chunk waits for took an earlier ticket and is running or finished. Every word is
// zero between launches: the last ticket resets the counter, each sequence-head's last chunk its flag.
#include <cstdint>

#include "cuda/train/chunk_handoff_types.h"
#include "cuda/train/mma_bf16.cuh"

namespace mamba3::cuda::train_detail {

struct ChainPos {
  int64_t bh;   // sequence-head
  int c;        // chunk within it
  int step;     // position in chain order (c forward, nc − 1 − c reverse)
  bool first;   // the block's first chunk: the state comes from another block (flag, acquire)
  bool last;    // the block's last chunk: the state goes to another block (fence, release)
};

// A block's share of the chain: `chunks` consecutive steps of one sequence-head from step `step0`, taken by ticket
// (all threads get it; one barrier). Between a block's own chunks the state goes through the same f32 slot in program
// order (each thread reads back what it wrote): no flag, no fence.
struct ChainTicket {
  int64_t bh;
  int step0, chunks;
  __device__ ChainPos at(int j, int nc, bool reverse) const {
    const int step = step0 + j;
    return ChainPos{bh, reverse ? nc - 1 - step : step, step, j == 0, j == chunks - 1};
  }
};

// Tickets map to (step group, sequence-head) step-group-major, in chain order: the block a block waits for took an
// earlier ticket. per_block: chain steps per block (the grid is B·H · ⌈nc / per_block⌉ blocks).
__device__ __forceinline__ ChainTicket chain_take_ticket(uint32_t* words, int64_t BH, int nc, int per_block) {
  __shared__ uint32_t ticket;
  if (threadIdx.x == 0) {
    const uint32_t t = atomicAdd(words, 1u);
    if (t == gridDim.x - 1) atomicExch(words, 0u);  // every block has its ticket: zero for the next launch
    ticket = t;
  }
  __syncthreads();
  ChainTicket tk;
  tk.bh = int64_t(ticket % uint32_t(BH));
  tk.step0 = int(ticket / uint32_t(BH)) * per_block;
  tk.chunks = min(per_block, nc - tk.step0);
  return tk;
}

// The threads that run a chain step: kThreads consecutive threads from `base` (a whole block, or one phase's warps of
// a core), synchronised by barrier `id` (0: the block's own barrier, then kThreads must be the block).
template <int kThreads>
struct ChainGroup {
  int base, id;
  __device__ int rank() const { return int(threadIdx.x) - base; }
  __device__ void sync() const { asm volatile("bar.sync %0, %1;" ::"r"(id), "n"(kThreads) : "memory"); }
};

// The group's first thread waits until sequence-head bh has handed on `steps` chunks (acquire), then the group's
// barrier. A wait of seconds means a broken chain: trap rather than hang.
template <int kThreads>
__device__ __forceinline__ void chain_wait(const ChainGroup<kThreads>& grp, const uint32_t* words, int64_t bh,
                                           int steps) {
  if (grp.rank() == 0) {
    const uint32_t* flag = words + 1 + bh;
    uint32_t v;
    for (uint32_t spins = 0;; ++spins) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
      if (v == uint32_t(steps)) break;
      if (spins > (1u << 22)) __trap();  // (seconds: each spin is an L2 round trip)
      __nanosleep(32);
    }
  }
  grp.sync();
}

// After every thread of the group has stored its part of the state: sequence-head bh has handed on `steps` chunks
// (release).
// (The barrier orders the group's stores before the first thread's fence and release — cumulativity, as a
// cooperative-groups grid barrier relies on — so one thread fences, not every thread.)
template <int kThreads>
__device__ __forceinline__ void chain_publish(const ChainGroup<kThreads>& grp, uint32_t* words, int64_t bh, int steps) {
  grp.sync();
  if (grp.rank() == 0) {
    __threadfence();
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(words + 1 + bh), "r"(uint32_t(steps)) : "memory");
  }
}

// A group of kWarps warps forms its chunk's P × N state product A_cᵀ·B_c (A: the chunk's rows × P, B: rows × N, bf16
// tiles in shared memory) in kRB × kCP warp tiles — the group's warp w on rows 16·(w % kRB) of P and columns
// NW·(w / kRB) of N, in passes of kNTH n-tiles (fewer live registers) — with the k-steps in the state chain
// kernel's order (mamba3_train_state_chain.cu), so the products and the multiply-add below give its bits. Warps past
// kRB·kCP idle (P 32, N 32 at 8 warps).
template <int N, int P, int kWarps, int kNTH>
struct ChainTile {
  static constexpr int kRB = P / 16, kCP = kWarps / kRB < N / 16 ? kWarps / kRB : N / 16;
  static constexpr int NW = N / kCP, NTW = NW / 8, kActive = 32 * kRB * kCP;
  static constexpr int NTH = NTW < kNTH ? NTW : kNTH, kNH = NTW / NTH;  // n-tiles per pass, passes
  static_assert(kWarps % kRB == 0 && NW % 16 == 0 && NTH % 2 == 0 && NTW % NTH == 0, "whole warp tiles");
};

// The group's step of the chain: the state entering this chunk (zero at the first step, else the previous chunk's,
// from another block or this one) → out16 (this chunk's P × N slot in global memory) and the shared tile s16 (pitch lds), both in bf16;
// then, unless this is the last step, state·dc + A_cᵀ·B_c handed on. Ends with the group's barrier (s16 complete).
template <int N, int P, int kWarps, int kNTH>
__device__ __forceinline__ void chain_step(const ChainGroup<32 * kWarps>& grp, const ChainHandoff& h,
                                           const ChainPos& pos, int nc, float dc, const mma_bf16::bf16* sA, int lda,
                                           const mma_bf16::bf16* sB, int ldb, mma_bf16::bf16* out16,
                                           mma_bf16::bf16* s16, int lds) {
  using namespace mma_bf16;
  using Tile = ChainTile<N, P, kWarps, kNTH>;
  constexpr int NTH = Tile::NTH;
  const int r = grp.rank(), warp = r / 32, lane = r % 32, g = lane / 4, q = lane % 4;
  const int p0 = 16 * (warp % Tile::kRB), n0 = Tile::NW * (warp / Tile::kRB);
  const bool active = r < Tile::kActive, hand_on = pos.step < nc - 1;
  float4* mine = reinterpret_cast<float4*>(h.states + pos.bh * int64_t(P) * N) + r;
  float acc[NTH][4];
  const auto product = [&](int nh) {  // acc = the pass's columns of A_cᵀ·B_c
    zero(acc);
    if (!active || !hand_on) return;
#pragma unroll
    for (int kb = 0; kb < 64 / 16; ++kb) {  // (the cores' 64 chunk rows)
      uint32_t a[4];
      load_a_t(sA, lda, 16 * kb, p0, a);
#pragma unroll
      for (int np = 0; np < NTH / 2; ++np) {
        uint32_t b[4];
        load_b_kn(sB, ldb, 16 * kb, nh + 16 * np, b);
        mma(acc[2 * np], a, b[0], b[1]), mma(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  };
  product(n0);  // the first pass's product while the first thread polls the flag
  if (pos.step > 0 && pos.first) chain_wait(grp, h.words, pos.bh, pos.step);
#pragma unroll
  for (int half = 0; half < Tile::kNH; ++half) {
    const int nh = n0 + half * NTH * 8;
    float st[NTH][4];
    zero(st);
    if (active && pos.step > 0) {
#pragma unroll
      for (int nt = 0; nt < NTH; ++nt) {
        const float4 v = __ldcg(mine + (half * NTH + nt) * Tile::kActive);
        st[nt][0] = v.x, st[nt][1] = v.y, st[nt][2] = v.z, st[nt][3] = v.w;
      }
    }
    if (half > 0) product(nh);
    if (active) {
#pragma unroll
      for (int nt = 0; nt < NTH; ++nt) {
        const int col = nh + nt * 8 + 2 * q;
        const uint32_t lo = pack(st[nt][0], st[nt][1]), hi = pack(st[nt][2], st[nt][3]);
        *reinterpret_cast<uint32_t*>(out16 + (p0 + g) * N + col) = lo;
        *reinterpret_cast<uint32_t*>(out16 + (p0 + g + 8) * N + col) = hi;
        *reinterpret_cast<uint32_t*>(s16 + (p0 + g) * lds + col) = lo;
        *reinterpret_cast<uint32_t*>(s16 + (p0 + g + 8) * lds + col) = hi;
      }
      if (hand_on) {
#pragma unroll
        for (int nt = 0; nt < NTH; ++nt) {
          float4 v;
          v.x = __fmaf_rn(dc, st[nt][0], acc[nt][0]), v.y = __fmaf_rn(dc, st[nt][1], acc[nt][1]);
          v.z = __fmaf_rn(dc, st[nt][2], acc[nt][2]), v.w = __fmaf_rn(dc, st[nt][3], acc[nt][3]);
          __stcg(mine + (half * NTH + nt) * Tile::kActive, v);
        }
      }
    }
  }
  if (hand_on && pos.last) {
    chain_publish(grp, h.words, pos.bh, pos.step + 1);  // (its barrier also completes s16)
  } else if (hand_on) {
    grp.sync();  // (this block's next chunk reads the slot back: program order)
  } else {
    if (pos.step > 0 && r == 0) h.words[1 + pos.bh] = 0u;  // the last step: the flag back to zero for the next launch
    grp.sync();
  }
}

}  // namespace mamba3::cuda::train_detail
