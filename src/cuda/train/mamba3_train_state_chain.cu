// The chunk-state chain (mamba3_train_state_chain.h): one block per (sequence, head, slice of 32 or 64 rows of P; two
// warps per 16 rows) walks that sequence-head's chunks in order. Per chunk it forms its slice of A_cᵀ·B_c on bf16
// tensor cores (warp w: rows 16·(w % (slice / 16)) of the slice, columns (N / 2)·(w / (slice / 16)) onward), applies
// the scan's fused multiply-add to the running state held in the same fragment layout, and writes the state entering
// the chunk in bf16 — through a shared-memory slice and whole-row 16-byte stores: the fragment layout's stores (16
// bytes in each of 8 rows per warp instruction) had been more than half of the kernel's time (a probe on the H200:
// 118 µs per call with them, 52 without). The products do not depend on the state, so their operands stream through a
// ring of kStages shared-memory stages (cp.async) ahead of the chain: the sequential part per chunk is one multiply-add
// per state element. Traffic per chunk and slice: 64 rows of A's slice and of B (B read by the P / 32 slices of one
// sequence-head, adjacent blocks, so mostly from L2) and the slice of the bf16 state; nothing in f32. (A slice of 64
// reads B once per sequence-head, in half as many blocks.)
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/cuda_check.h"
#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/train/chunk_core_launch.cuh"
#include "cuda/train/chunk_ready.cuh"
#include "cuda/train/mamba3_train_math.cuh"
#include "cuda/train/mamba3_train_state_chain.h"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/train/qk_unrotated_columns.cuh"
#include "cuda/train/state_chain_step.cuh"

namespace mamba3::cuda::train_detail {

namespace {

using namespace mma_bf16;
constexpr int kRows = kCoreRows;
constexpr int kStages = 2;   // operand stages (the chunk computed and the next loading: a third was not faster)

// e^Λ ⊙ dy of a fragment register's two rows (dO and z pairs, e^Λ of each row), bf16: the output-stage backward's
// value (siso_gate_dy, then e^Λ·dy rounded).
__device__ __forceinline__ uint32_t dye_pair(uint32_t dO2, uint32_t z2, float e0, float e1) {
  const float2 o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&dO2));
  const float2 z = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&z2));
  const float d0 = siso_gate_dy(o.x, z.x, gate_sigmoid_f(z.x, true));
  const float d1 = siso_gate_dy(o.y, z.y, gate_sigmoid_f(z.y, true));
  const __nv_bfloat162 r = __floats2bfloat162_rn(__fmul_rn(e0, d0), __fmul_rn(e1, d1));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// kSlice rows of P per block (32 or 64), two warps per 16 of them (each on half of N's columns). kDye: the reverse
// chain forming A = e^Λ ⊙ dy from dO and z (a second A tile per stage).
template <int N, int kSlice, bool kDye = false>
struct ChainSmem {
  static constexpr int LDA = kSlice + 8, LDN = N + 8;  // 8 bf16 of padding per row: ldmatrix's rows in other banks
  // A's and B's rows, then (w_rows, or e^Λ with kDye) the chunk's 64 row scales in f32 (128 bf16 slots), then (kDye)
  // z's rows.
  static constexpr int stage_elems = kRows * (LDA + LDN) + 2 * kRows + (kDye ? kRows * LDA : 0);
  // The stages, then the bf16 state slice being written (kSlice rows at pitch LDN).
  static constexpr size_t bytes = (size_t(kStages) * stage_elems + size_t(kSlice) * LDN) * sizeof(bf16);
  static constexpr int threads = 32 * 2 * (kSlice / 16);
};

// kDye (reverse, p.core_output): A = e^Λ ⊙ dy formed in the fragments from dO's and z's rows (token-major, the head's
// columns) and e^Λ (w_rows = p.eL), with the output-stage backward's expressions (siso_gate_dy): launch_output_dye's
// bits, without its kernel (dO and z read here instead of e^Λ ⊙ dy written and read back).
// kQk: B's operand (k forward, q in reverse) stored in its rotated half (p.qk_rotated_only), the rest formed here.
template <int N, int P, int kSlice, bool kDye, bool kQk>
__device__ __forceinline__ void state_chain_body(const BatchedParams& p, const bf16* A, const bf16* Bm, bool reverse,
                                                 void* out16, const float* w_rows) {
  using Smem = ChainSmem<N, kSlice, kDye>;
  constexpr int kLdA = Smem::LDA, LDN = Smem::LDN, SE = Smem::stage_elems, NT = N / 16, slices = P / kSlice;
  constexpr int kThreads = Smem::threads, kRowWarps = kSlice / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* stages = reinterpret_cast<bf16*>(smem_raw);
  bf16* sOut = stages + kStages * SE;
  const int64_t bh = blockIdx.x / slices;
  const int pb = int(blockIdx.x % slices) * kSlice, nc = p.nc;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int pr = 16 * (warp % kRowWarps), n0 = (N / 2) * (warp / kRowWarps);  // the warp's first row and column
  const auto chunk_at = [&](int i) { return bh * nc + (reverse ? nc - 1 - i : i); };
  // p.qk_rotated_only (SISO): B's rotated columns (k's forward, q's in reverse) from Bm at row pitch N/2, the others
  // formed from bc_unrot (registers loaded with the stage's copies, stored into the stage after the chunk before it).
  constexpr bool qk_half = kQk;
  static_assert(kStages == 2, "the formed columns of one stage ahead in registers");
  [[maybe_unused]] UnrotatedColumns<N, kThreads, 1> unrot;
  // Step i's operands into stage i % kStages (an empty group past the last chunk keeps the group count uniform), by
  // copy_tile's fixed-offset copies (the loop with a division per copy it replaced, run once per chunk, had been two
  // thirds of this kernel's instructions: ncu, 125M, 30.6 → 11.0 M per call, 142 → 124 µs).
  const auto issue = [&](int i) {
    if (i < nc) {
      const int64_t chunk = chunk_at(i);
      bf16* sA = stages + (i % kStages) * SE;
      if constexpr (kDye) {  // dO's and z's rows of the chunk's tokens, the slice's columns of the head
        const MixerDims& d = p.d;
        const int64_t tok0 = bh / d.H * d.L + chunk % nc * p.T, col = bh % d.H * P + pb;
        copy_tile<kThreads, kRows, kSlice>(sA, kLdA, reinterpret_cast<const bf16*>(p.dO16) + tok0 * d.d_inner + col,
                                           int(d.d_inner));
        copy_tile<kThreads, kRows, kSlice>(sA + kRows * (kLdA + LDN) + 2 * kRows, kLdA,
                                           reinterpret_cast<const bf16*>(p.zx16) + tok0 * 2 * d.d_inner + col,
                                           int(2 * d.d_inner));
      } else {
        copy_tile<kThreads, kRows, kSlice>(sA, kLdA, A + chunk * kRows * P + pb, P);
      }
      if (qk_half) {
        copy_tile<kThreads, kRows, N / 2>(sA + kRows * kLdA, LDN, Bm + chunk * kRows * (N / 2));
        unrot.issue(p, chunk, {reverse});
      } else {
        copy_tile<kThreads, kRows, N>(sA + kRows * kLdA, LDN, Bm + chunk * kRows * N);
      }
      if (w_rows && threadIdx.x < kRows / 4)  // (16-byte pieces of the chunk's row scales)
        asm volatile(
            "cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(sA + kRows * (kLdA + LDN) + 8 * threadIdx.x)),
            "l"(w_rows + chunk * kRows + 4 * threadIdx.x));
    }
    asm volatile("cp.async.commit_group;");
  };
  // (B's formed columns of step i into its stage)
  const auto store_formed = [&](int i) {
    if (qk_half && i < nc) unrot.store({stages + (i % kStages) * SE + kRows * kLdA}, LDN);
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  store_formed(0);

  float st[NT][4];
  zero(st);
  for (int i = 0; i < nc; ++i) {
    const int64_t chunk = chunk_at(i);
    const float dc = p.decay[chunk];
    // The state entering this chunk, rounded as the scan rounds it (bf16 pairs: rows g and g + 8 of the warp's 16),
    // into the shared slice; after the barrier the block writes it out row by row, 16 bytes per thread.
    // (cvt.rn.bf16x2: bf16_bits_rn's bits for every non-NaN value, in one instruction per pair)
    uint32_t* so = reinterpret_cast<uint32_t*>(sOut) + ((pr + g) * LDN + n0) / 2 + q;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      so[nt * 4] = pack(st[nt][0], st[nt][1]);
      so[nt * 4 + 4 * LDN] = pack(st[nt][2], st[nt][3]);
    }
    __syncthreads();  // the slice is whole; every warp is done with the stage step i + kStages − 1 loads into
    // (the previous chunk's dH for the fused core beside this chain: its stores, a step old, are behind this barrier,
    // so the release's fence has little left to wait for)
    if (p.chain_ready && i > 0 && threadIdx.x == 0) chunk_ready_publish(p.chain_ready + chunk_at(i - 1));
    issue(i + kStages - 1);
    {
      constexpr int per_row = N / 8, pieces = kSlice * per_row;  // 16-byte pieces of the slice
      static_assert(pieces % kThreads == 0, "whole passes over the slice");
      bf16* og = reinterpret_cast<bf16*>(out16) + (chunk * P + pb) * N;
#pragma unroll
      for (int j = 0; j < pieces / kThreads; ++j) {
        const int k = int(threadIdx.x) + j * kThreads, r = k / per_row, c = k % per_row * 8;
        *reinterpret_cast<uint4*>(og + r * N + c) = *reinterpret_cast<const uint4*>(sOut + r * LDN + c);
      }
    }
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1) : "memory");
    __syncthreads();  // (also: the slice's reads are done before the next step writes it)
    const bf16 *sA = stages + (i % kStages) * SE, *sB = sA + kRows * kLdA;
    const float* sW = reinterpret_cast<const float*>(sB + kRows * LDN);
    // A_cᵀ·B_c for the warp's 16 × N/2 tile, k-steps in the backward core's order (its G: the same tiles, same bits).
    float acc[NT][4];
    zero(acc);
#pragma unroll
    for (int kb = 0; kb < kRows / 16; ++kb) {
      uint32_t a[4];
      load_a_t(sA, kLdA, 16 * kb, pr, a);
      if constexpr (kDye) {  // A = e^Λ ⊙ dy from dO's (a) and z's fragments, rows t as below
        uint32_t zf[4];
        load_a_t(sB + kRows * LDN + 2 * kRows, kLdA, 16 * kb, pr, zf);
        const float2 e0 = *reinterpret_cast<const float2*>(sW + 16 * kb + 2 * q);
        const float2 e8 = *reinterpret_cast<const float2*>(sW + 16 * kb + 2 * q + 8);
        a[0] = dye_pair(a[0], zf[0], e0.x, e0.y), a[1] = dye_pair(a[1], zf[1], e0.x, e0.y);
        a[2] = dye_pair(a[2], zf[2], e8.x, e8.y), a[3] = dye_pair(a[3], zf[3], e8.x, e8.y);
      } else if (w_rows) {  // A = w ⊙ v formed from v's fragment
        chain_step::scale_rows(a, sW + 16 * kb);
      }
      chain_step::accumulate(acc, a, sB, LDN, 16 * kb, n0);
    }
    chain_step::scan_update(st, acc, dc);  // the scan's e·S + Δ
    store_formed(i + 1);  // (the next step's barrier orders it before that step's reads)
  }
  if (p.chain_ready && nc > 0) {  // the last chunk's dH
    __syncthreads();
    if (threadIdx.x == 0) chunk_ready_publish(p.chain_ready + chunk_at(nc - 1));
  }
}

template <int N, int P, int kSlice, bool kDye = false>
__global__ void __launch_bounds__(ChainSmem<N, kSlice, kDye>::threads)
    state_chain_kernel(const BatchedParams p, const bf16* A, const bf16* Bm, bool reverse, void* out16,
                       const float* w_rows) {
  pdl_wait();
  if (p.chain_ready) pdl_trigger();  // (the fused core beside it: every block of this grid resident or done first)
  state_chain_body<N, P, kSlice, kDye, false>(p, A, Bm, reverse, out16, w_rows);
}

// The instances that form B's unrotated half, asked for 512 threads per SM (≤ 128 registers): the formed columns'
// registers had taken the 125M ones to 154 and 166 registers, one block per SM, and a 125M chain's 192 blocks into
// two waves.
template <int N, int P, int kSlice, bool kDye = false>
__global__ void __launch_bounds__(ChainSmem<N, kSlice, kDye>::threads, 512 / ChainSmem<N, kSlice, kDye>::threads)
    state_chain_qk_kernel(const BatchedParams p, const bf16* A, const bf16* Bm, bool reverse, void* out16,
                          const float* w_rows) {
  pdl_wait();
  state_chain_body<N, P, kSlice, kDye, true>(p, A, Bm, reverse, out16, w_rows);
}
// Rows of P per chain block: set_state_chain_slice, else MAMBA3_TRAIN_CHAIN_SLICE (read once), 64 (the default where P
// allows; since the forty-ninth session: the reverse chain forming e^Λ ⊙ dy forms each fragment once per block row of
// warps instead of twice, 125M step −0.2 ms on an H100) or 32.
int g_chain_slice = 0;
int chain_slice() {
  if (g_chain_slice == 0) g_chain_slice = env_choice("MAMBA3_TRAIN_CHAIN_SLICE", {"32", "64"}) == "32" ? 32 : 64;
  return g_chain_slice;
}

}  // namespace

bool state_chain_supported(const BatchedParams& p) { return core_shape_supported(p); }

void set_state_chain_slice(int rows) {
  MAMBA3_CHECK(rows == 32 || rows == 64, "set_state_chain_slice: {} rows (32 or 64)", rows);
  g_chain_slice = rows;
}

int state_chain_blocks_per_head(const BatchedParams& p) {
  return p.d.P % 64 == 0 && chain_slice() == 64 ? p.d.P / 64 : p.d.P / 32;
}

void launch_state_chain(cudaStream_t s, const BatchedParams& p, const void* A, const void* Bop, bool reverse,
                        void* out16, const float* w_rows, bool form_dye) {
  MAMBA3_CHECK(state_chain_supported(p), "state chain: unsupported chunk (bf16 {}, rows {}, N {}, P {})", p.bf16,
               p.rows, p.d.N, p.d.P);
  MAMBA3_CHECK((A || form_dye) && Bop && out16 && p.decay, "state chain: an operand, the decays or the output is null");
  MAMBA3_CHECK(
      !form_dye || (reverse && p.dO16 && p.zx16 && p.eL && p.T == kRows && p.d.L % p.T == 0 && p.d.d_inner % 8 == 0),
      "state chain: e^Λ ⊙ dy formed from dO and z needs the reverse chain, bf16 dO and z, whole chunks");
  if (p.nc == 0) return;
  const auto launch = [&](auto kernel, size_t bytes, int threads, int slice) {
    const int64_t blocks = int64_t(p.d.B) * p.d.H * (p.d.P / slice);
    MAMBA3_CHECK(blocks <= 0x7fffffff, "state chain: {} blocks exceed the grid", blocks);
    launch_train(kernel, unsigned(blocks), threads, bytes, s, p, static_cast<const bf16*>(A),
                 static_cast<const bf16*>(Bop), reverse, out16, form_dye ? p.eL : w_rows);
    MAMBA3_LAUNCH_CHECK();
  };
  const bool wide = chain_slice() == 64;
  dispatch_core_shape(p, [&](auto n, auto pp) {
    constexpr int N = decltype(n)::value, P = decltype(pp)::value;
    const auto one = [&](auto slice) {
      constexpr int S = decltype(slice)::value;
      const auto go = [&](auto dye) {
        constexpr bool kDye = decltype(dye)::value;
        using Smem = ChainSmem<N, S, kDye>;
        auto* plain = state_chain_kernel<N, P, S, kDye>;
        auto* qk = state_chain_qk_kernel<N, P, S, kDye>;  // (p.qk_rotated_only)
        if (Smem::bytes > 48 * 1024) {  // once per instance (a host call per layer's launch otherwise)
          static const cudaError_t opted =
              cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Smem::bytes));
          static const cudaError_t opted_qk =
              cudaFuncSetAttribute(qk, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Smem::bytes));
          MAMBA3_CUDA_CHECK(opted);
          MAMBA3_CUDA_CHECK(opted_qk);
        }
        launch(p.qk_rotated_only ? qk : plain, Smem::bytes, Smem::threads, S);
      };
      if (form_dye)
        go(std::true_type{});
      else
        go(std::false_type{});
    };
    if constexpr (P % 64 == 0) {  // (no 64-row instance for P = 32)
      if (wide) return one(std::integral_constant<int, 64>{});
    }
    one(std::integral_constant<int, 32>{});
  });
}

}  // namespace mamba3::cuda::train_detail
