// The SISO mixer's forward from the chunk scalars on as one walk per sequence-head (launch_fwd_walk,
// mamba3_train_state_chain.h): the kv chain (mamba3_train_kv_chain.cu) and the forward core (mamba3_train_fwd_core.cu)
// in one kernel. Per chunk the block forms k from the group's B rows (the build's rotated_pair), stores k, v and the
// state entering the chunk for the backward, runs the chain's step, forms q from C's rows (again rotated_pair), and
// then runs the forward core's products and output stage with q, k and the state from shared memory — so the forward
// core's reads of q, k, v and the states (≈ 350 MB per 125M layer) and the build's launch go away. The same bits: every
// value is formed by the expression, fragments and k-steps of the kernels it replaces.
//
// Shared memory is what sets the form (two blocks per SM at 8 warps): one 33 KB buffer takes B's rows, then C's rows
// of the same chunk (each warp copies its own rows as soon as it has formed their k, and waits for them alone: C's
// copy in flight during the chain's step; the next chunk's B during the output stage), then q over C's rows (a warp
// forms its own rows' q and overwrites them). q had first been formed in each warp's A fragments
// per k-step, twice per row block (once per slice of P): on an H200 that walk took 495 µs per 125M layer against 389
// for the three kernels, 52 % of its 164 M instructions in that loop (fifty-eighth session). Warps: the chain's (16
// rows of P × N/2 columns each); in the core's part warp w takes rows 16·(w % 4) of the chunk and 32 columns of P from
// 32·(w / 4) (S is formed by both warps of a row block).
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/chunk_core_launch.cuh"
#include "cuda/train/chunk_ready.cuh"
#include "cuda/train/mamba3_train_batched_common.cuh"
#include "cuda/train/mamba3_train_fwd_core.h"
#include "cuda/train/mamba3_train_math.cuh"
#include "cuda/train/mamba3_train_state_chain.h"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/train/state_chain_step.cuh"

namespace mamba3::cuda::train_detail {

namespace {

using namespace mma_bf16;
constexpr int kRows = kCoreRows;
constexpr int kSlice = 32;  // columns of P per warp in the core's part

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
}

// Byte offsets into the block's shared memory: the rows buffer (B's, then C's rows of a chunk, f32, then q over C's
// rows: a row pitch of N + 4 floats puts ldmatrix's eight q rows in different banks), the angle codes (up to N/2 per
// row), two stages of x (bf16: v) and of the chunk scalars (w, Λ, scale, γ, e^Λ: 5 × 64 floats), k, the state
// entering the chunk (P × N, the Z product's operand) and z (bf16, one stage).
template <int N, int P>
struct WalkSmem {
  static constexpr int threads = 4 * P;  // the chain's warps: two per 16 rows of P
  static constexpr int LDA = P + 8, LDN = N + 8, LDZ = P + 8, LDW = kRows + 8;
  static constexpr int LDR = N + 4, LDC = N / 2;  // (floats of a B/C row, codes of a row: 16-byte multiples)
  static constexpr int kScalars = 5;
  static constexpr size_t rows = 0;
  static constexpr size_t codes = rows + size_t(kRows) * LDR * 4;
  static constexpr size_t a = codes + size_t(kRows) * LDC * 2;
  static constexpr size_t scal = a + 2 * size_t(kRows) * LDA * 2;
  static constexpr size_t k = scal + 2 * size_t(kScalars) * kRows * 4;
  static constexpr size_t h = k + size_t(kRows) * (LDN > LDW ? LDN : LDW) * 2;  // (k's tile, then W's)
  static constexpr size_t z = h + size_t(P) * LDN * 2;
  static constexpr size_t dec = z + size_t(kRows) * LDZ * 2;  // (the chunk's decay, one float per stage)
  static constexpr size_t bytes = dec + 2 * 4;
};

// Two blocks per SM on sm_90: 228 KB of shared memory less 1 KB reserved per block, halved.
constexpr size_t kTwoBlocksSmem = (228 * 1024 - 2 * 1024) / 2;

template <int N, int P>
__global__ void __launch_bounds__(WalkSmem<N, P>::threads, 2) fwd_walk_kernel(const BatchedParams p, void* out16) {
  pdl_wait();
  if (p.walk_ready) pdl_trigger();  // (out_proj beside it: every block of this grid resident or done first)
  using Sm = WalkSmem<N, P>;
  static_assert(Sm::bytes <= kTwoBlocksSmem, "two blocks per SM");
  constexpr int kThreads = Sm::threads, LDA = Sm::LDA, LDN = Sm::LDN, LDZ = Sm::LDZ, NT = N / 16;
  constexpr int LDR = Sm::LDR, LDC = Sm::LDC;
  constexpr int kRowWarps = P / 16, NS = kRows / 8, ZT = kSlice / 8, LDW = Sm::LDW;
  constexpr int kSlices = P / kSlice, kNp = NS / 2 / kSlices;  // slices of P; S's 16-column blocks per slice
  // Forming k and q: warp w owns rows [w·kRowsPerWarp, (w + 1)·kRowsPerWarp) — so q can replace C's rows in place —
  // kTpr lanes per row (kRpp rows per pass), a lane on the pairs pl + kTpr·j (j < kPpt): at N 128 pairs l and l + 32,
  // one rotating and one not where S = N/4, so every lane and warp does the same work.
  constexpr int kPairs = N / 2, kWarps = kThreads / 32, kRowsPerWarp = kRows / kWarps;
  constexpr int kTpr = kPairs < 32 ? kPairs : 32, kRpp = 32 / kTpr, kPpt = kPairs / kTpr;
  constexpr int kPasses = kRowsPerWarp / kRpp, kGroup = kPasses < 4 ? kPasses : 4;
  static_assert(kRows % kWarps == 0 && kRowsPerWarp % kRpp == 0 && kPasses % kGroup == 0, "whole rows per warp");
  constexpr int LDQ = 2 * LDR;  // (q in place over C's rows: a row of q in the first half of its C row's floats)
  static_assert(P % kSlice == 0 && kThreads / 32 == 4 * (P / kSlice), "four row blocks × the slices of P");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sRows = reinterpret_cast<float*>(smem_raw + Sm::rows);
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw + Sm::rows);  // (q over C's rows, row r at r·LDQ)
  uint16_t* sCode = reinterpret_cast<uint16_t*>(smem_raw + Sm::codes);
  bf16* sA0 = reinterpret_cast<bf16*>(smem_raw + Sm::a);
  float* sScal0 = reinterpret_cast<float*>(smem_raw + Sm::scal);
  bf16* sK = reinterpret_cast<bf16*>(smem_raw + Sm::k);
  bf16* sWt = sK;  // (W once S is formed: k is not read again in the chunk)
  bf16* sH = reinterpret_cast<bf16*>(smem_raw + Sm::h);
  bf16* sZ = reinterpret_cast<bf16*>(smem_raw + Sm::z);
  float* sDec = reinterpret_cast<float*>(smem_raw + Sm::dec);
  const MixerDims& d = p.d;
  const int64_t bh = blockIdx.x;
  const int b = int(bh / d.H), h = int(bh % d.H), g = h / (d.H / d.G), nc = p.nc, S = d.S;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gr = lane / 4, q = lane % 4;
  const int pr = 16 * (warp % kRowWarps), n0 = (N / 2) * (warp / kRowWarps);  // the warp's chain tile
  const int t0 = 16 * (warp % 4), c0 = kSlice * (warp / 4);                   // its rows and P columns in the core
  const int pl = lane % kTpr, rl = lane / kTpr;                               // the lane's first pair, row in a pass
  const int x_pitch = 2 * d.d_inner;
  const float Dh = p.D[h];

  // The group's rows of B or C (zx's columns from `off`) of the 64 tokens from tok0 into sRows.
  const auto copy_rows = [&](int64_t tok0, int off) {
    constexpr int per_row = N / 4, pieces = kRows * per_row, step = kThreads / per_row;
    static_assert(pieces % kThreads == 0 && kThreads % per_row == 0, "whole passes over the rows");
    // (a running source pointer: per-piece offsets held across the walk had cost the 125M instance spills)
    const int r = int(threadIdx.x) / per_row, c = int(threadIdx.x) % per_row * 4;
    const float* src = p.zx + (tok0 + r) * d.din + off + int64_t(g) * N + c;
    const int64_t stride = int64_t(step) * d.din;
#pragma unroll
    for (int j = 0; j < pieces / kThreads; ++j, src += stride) cp_async16(sRows + (r + j * step) * LDR + c, src);
  };
  const auto tok_of = [&](int i) { return int64_t(b) * d.L + int64_t(i) * kRows; };
  // Chunk i's B rows and angle codes (the rows buffer and the codes are free once chunk i - 1's q is formed).
  const auto issue_b = [&](int i) {
    if (i < nc) {
      copy_rows(tok_of(i), d.off_B);
      const uint16_t* src = p.phi_code + (bh * d.L + int64_t(i) * kRows) * S;
      constexpr int kPieces = N / 16;  // (16 bytes of codes each, at most per row: a thread's (row, piece) fixed)
#pragma unroll
      for (int k = threadIdx.x; k < kRows * kPieces; k += kThreads) {
        const int r = k / kPieces, j = k % kPieces;
        if (8 * j < S) cp_async16(sCode + r * LDC + 8 * j, src + r * S + 8 * j);
      }
    }
    asm volatile("cp.async.commit_group;");
  };
  // Chunk i's x rows and scalars into stage i % 2 (free once chunk i - 2 is done).
  const auto issue_x = [&](int i) {
    if (i < nc) {
      const int64_t chunk = bh * nc + i;
      const bf16* x16 = reinterpret_cast<const bf16*>(p.zx16) + tok_of(i) * x_pitch + d.off_x + int64_t(h) * P;
      copy_tile<kThreads, kRows, P>(sA0 + (i % 2) * kRows * LDA, LDA, x16, x_pitch);
      static_assert(kThreads >= Sm::kScalars * kRows / 4, "one piece of the scalars per thread at most");
      if (threadIdx.x < Sm::kScalars * kRows / 4) {  // (a select, not an indexed array: no local memory)
        const int which = int(threadIdx.x) / (kRows / 4), j = int(threadIdx.x) % (kRows / 4);
        const float* src = which == 0 ? p.wv : which == 1 ? p.Lam : which == 2 ? p.scale : which == 3 ? p.gam : p.eL;
        cp_async16(sScal0 + ((i % 2) * Sm::kScalars + which) * kRows + 4 * j, src + chunk * kRows + 4 * j);
      }
      // (the decay staged with them: loaded from global memory in the chunk itself, its first use in the chain's step
      // had waited on it — 3 % of the walk's stall samples, ncu on an H100)
      if (threadIdx.x == kThreads - 1)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(sDec + i % 2)), "l"(p.decay + chunk));
    }
  };
  // Chunk i's C rows of this warp's own rows (those it forms k and q of): issued as soon as the warp's k is formed
  // and waited for by the warp alone, so that no block barrier waits on them — the block-wide copy after k's barrier
  // had left a quarter of the walk's stall samples at the barrier after it (fifty-ninth session, ncu on an H100).
  const auto issue_c_own = [&](int i) {
    constexpr int per_row = N / 4, rows_per_pass = 32 / per_row;
    static_assert(32 % per_row == 0 && kRowsPerWarp % rows_per_pass == 0, "whole warp passes over the warp's rows");
    const int r = warp * kRowsPerWarp + lane / per_row, c = lane % per_row * 4;
    const float* src = p.zx + (tok_of(i) + r) * d.din + d.off_C + int64_t(g) * N + c;  // (a running pointer)
#pragma unroll
    for (int j = 0; j < kRowsPerWarp / rows_per_pass; ++j, src += rows_per_pass * d.din)
      cp_async16(sRows + (r + j * rows_per_pass) * LDR + c, src);
  };
  // Chunk i's z (bf16, zx16's z columns).
  const auto issue_z = [&](int i) {
    const bf16* z16 = reinterpret_cast<const bf16*>(p.zx16) + tok_of(i) * x_pitch + int64_t(h) * P;
    copy_tile<kThreads, kRows, P>(sZ, LDZ, z16, x_pitch);
  };

  // Rot(rows + bias, φ) rounded to bf16 (the build's rotated_pair) for the warp's rows of the rows buffer, to `dst` at
  // pitch ld and to the chunk's global rows `glob` (pitch N). kGroup rows at a time: their loads and products first,
  // then (in_place: after the warp's reads of those rows, which the stores overwrite) their stores.
  const auto form_rows = [&](const float* bias, bf16* dst, int ld, bf16* glob, bool in_place) {
    const auto row_of = [&](int pass) { return warp * kRowsPerWarp + pass * kRpp + rl; };
    float2 bb[kPpt];
#pragma unroll
    for (int j = 0; j < kPpt; ++j) {
      const int64_t bi = int64_t(h) * N + 2 * (pl + kTpr * j);
      bb[j] = make_float2(__ldg(bias + bi), __ldg(bias + bi + 1));
    }
#pragma unroll 1
    for (int g0 = 0; g0 < kPasses; g0 += kGroup) {
      __nv_bfloat162 o[kGroup][kPpt];
      // (whether a pair rotates is the lane's for all its rows: one branch per pair index, not per row — a select
      // per row had merged the rotating and plain paths, costing branches and the negations' moves)
#pragma unroll
      for (int j = 0; j < kPpt; ++j) {
        const int uu = pl + kTpr * j;
        if (uu < S) {
#pragma unroll
          for (int ps = 0; ps < kGroup; ++ps) {
            const int r = row_of(g0 + ps);
            const float2 cs = rotary_cos_sin(angle_from_code(sCode[r * LDC + uu]));
            const float2 v = *reinterpret_cast<const float2*>(sRows + r * LDR + 2 * uu);
            o[ps][j] = batched::rotated_pair(v.x, v.y, bb[j].x, bb[j].y, cs.x, cs.y, true);
          }
        } else {
#pragma unroll
          for (int ps = 0; ps < kGroup; ++ps) {
            const int r = row_of(g0 + ps);
            const float2 v = *reinterpret_cast<const float2*>(sRows + r * LDR + 2 * uu);
            o[ps][j] = batched::rotated_pair(v.x, v.y, bb[j].x, bb[j].y, 1.0f, 0.0f, false);
          }
        }
      }
      if (in_place) __syncwarp();
#pragma unroll
      for (int ps = 0; ps < kGroup; ++ps) {
        const int r = row_of(g0 + ps);
#pragma unroll
        for (int j = 0; j < kPpt; ++j) {
          const int uu = pl + kTpr * j;
          *reinterpret_cast<__nv_bfloat162*>(dst + r * ld + 2 * uu) = o[ps][j];
          *reinterpret_cast<__nv_bfloat162*>(glob + r * N + 2 * uu) = o[ps][j];
        }
      }
    }
  };

  issue_x(0);
  issue_b(0);  // (one group: x, the scalars, B's rows and the codes of chunk 0)
  float st[NT][4];
  zero(st);
  for (int i = 0; i < nc; ++i) {
    const int64_t chunk = bh * nc + i;
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();  // chunk i's B rows, codes, x and scalars are in; chunk i - 1's reads of k, the state, z are done
    // (chunk i − 1's o16 rows, stored before this barrier, for out_proj beside the walk: out_proj_beside.h)
    if (p.walk_ready && i > 0 && threadIdx.x == 0) chunk_ready_publish(p.walk_ready + int64_t(b) * nc + (i - 1));
    const bf16* sA = sA0 + (i % 2) * kRows * LDA;
    const float dc = sDec[i % 2];
    const float* sScal = sScal0 + (i % 2) * Sm::kScalars * kRows;
    const float *sW = sScal, *Lam = sScal + kRows, *scale = sScal + 2 * kRows, *gam = sScal + 3 * kRows,
                *eL = sScal + 4 * kRows;
    // k = Rot(B + bias, φ) rounded to bf16 (the build's rotated_pair) to K and to the chain's tile; then the warp's
    // rows of B are free and take its rows of C (cp.async groups in order: C, z, x of chunk i + 1)
    form_rows(p.B_bias, sK, LDN, static_cast<bf16*>(p.K) + chunk * kRows * N, false);
    __syncwarp();
    issue_c_own(i);
    asm volatile("cp.async.commit_group;");
    chain_step::store_slice(st, sH, LDN, pr, n0);  // the state entering chunk i, rounded as the chain rounds it
    __syncthreads();                               // k and the state whole
    issue_z(i);
    asm volatile("cp.async.commit_group;");
    issue_x(i + 1);
    asm volatile("cp.async.commit_group;");
    // the state to out16 and v = x to V; the chain's step on w ⊙ v and k (state_chain_step.cuh)
    chain_step::store_tile_16b<kThreads, P, N>(static_cast<bf16*>(out16) + chunk * P * N, sH, LDN);
    chain_step::store_tile_16b<kThreads, kRows, P>(static_cast<bf16*>(p.V) + chunk * kRows * P, sA, LDA);
    chain_step::scaled_step<kRows>(st, sA, LDA, sW, sK, LDN, pr, n0, dc);
    asm volatile("cp.async.wait_group 2;" ::: "memory");
    __syncwarp();  // the warp's C rows are in (its lanes' copies, each waited for by its lane)

    // q = Rot(C + bias, φ) to Q and over the warp's C rows in place.
    form_rows(p.C_bias, sQ, LDQ, static_cast<bf16*>(p.Q) + chunk * kRows * N, true);
    __syncthreads();  // q whole

    // The forward core's part for rows t0 … t0 + 15 (forward_core_kernel's products, mask and output stage): S = q·kᵀ
    // and Z = q·H_cᵀ over the same k-steps, q's A fragments from q's rows.
    // S's 16-column blocks are split between a row block's warps (the slices): kNp each, those above the causal
    // diagonal skipped (coef 0, as the forward core skips them); W = S ⊙ coef goes through shared memory to both.
    float s[2 * kNp][4], z[ZT][4];
    zero(s), zero(z);
    const auto s_block = [&](int j) { return kNp * (c0 / kSlice) + j; };  // the warp's j-th 16 columns of s
    {
      // (load_a's and load_b_nk's lane addresses at k-step 0, formed once: inside the causal skip's branches the
      // compiler formed them again per k-step and block)
      const uint32_t a0 = smem_addr(sQ + (t0 + lane % 16) * LDQ + (lane / 16) * 8);
      const int brow = lane % 8 + (lane / 16) * 8, bcol = ((lane / 8) % 2) * 8;
      uint32_t k0[kNp], h0[ZT / 2];
#pragma unroll
      for (int j = 0; j < kNp; ++j) k0[j] = smem_addr(sK + (16 * s_block(j) + brow) * LDN + bcol);
#pragma unroll
      for (int np = 0; np < ZT / 2; ++np) h0[np] = smem_addr(sH + (c0 + 16 * np + brow) * LDN + bcol);
#pragma unroll
      for (int kb = 0; kb < N / 16; ++kb) {
        uint32_t a[4];
        ldsm_x4_at(a0 + 32 * kb, a);  // (16 bf16 per k-step)
#pragma unroll
        for (int j = 0; j < kNp; ++j) {
          if (s_block(j) > t0 / 16) continue;
          uint32_t bb[4];
          ldsm_x4_at(k0[j] + 32 * kb, bb);
          mma(s[2 * j], a, bb[0], bb[1]), mma(s[2 * j + 1], a, bb[2], bb[3]);
        }
#pragma unroll
        for (int np = 0; np < ZT / 2; ++np) {  // Z = q·H_cᵀ (B[n][p] = H_c[p][n]) for the warp's columns
          uint32_t bb[4];
          ldsm_x4_at(h0[np] + 32 * kb, bb);
          mma(z[2 * np], a, bb[0], bb[1]), mma(z[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
    {  // W = S ⊙ coef (the forward core's siso_coef tiles)
      const SisoCoefRowsT rows(Lam, gam, t0, gr);
#pragma unroll
      for (int j = 0; j < kNp; ++j) {
        if (s_block(j) > t0 / 16) continue;
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          float cf[4], ex[4];
          rows.tile(Lam, scale, (2 * s_block(j) + e2) * 8 + 2 * q, cf, ex);
#pragma unroll
          for (int e = 0; e < 4; ++e) s[2 * j + e2][e] *= cf[e];
        }
      }
    }
    asm volatile("cp.async.wait_group 1;" ::: "memory");  // (z, for the output stage)
    __syncthreads();  // every warp has formed its q and read k: the rows buffer and the codes take chunk i + 1's,
    issue_b(i + 1);   // and k's tile takes W; z is in
    {
      uint32_t* wo = reinterpret_cast<uint32_t*>(sWt) + ((t0 + gr) * LDW) / 2 + q;
#pragma unroll
      for (int j = 0; j < kNp; ++j) {
        if (s_block(j) > t0 / 16) continue;
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int col = (2 * s_block(j) + e2) * 8;
          wo[col / 2] = pack(s[2 * j + e2][0], s[2 * j + e2][1]);
          wo[col / 2 + 4 * LDW] = pack(s[2 * j + e2][2], s[2 * j + e2][3]);
        }
      }
    }
    if constexpr (kSlices > 1)  // the row block's warps (named barrier 1 + row block)
      asm volatile("bar.sync %0, %1;" ::"r"(1 + t0 / 16), "r"(32 * kSlices) : "memory");
    else
      __syncwarp();
    float wv[ZT][4];
    zero(wv);
#pragma unroll
    for (int kb = 0; kb < NS / 2; ++kb) {  // WV = W·v for the warp's columns
      if (kb > t0 / 16) continue;
      uint32_t a[4];
      load_a(sWt, LDW, t0, 16 * kb, a);
#pragma unroll
      for (int np = 0; np < ZT / 2; ++np) {
        uint32_t bb[4];
        load_b_kn(sA, LDA, 16 * kb, c0 + 16 * np, bb);
        mma(wv[2 * np], a, bb[0], bb[1]), mma(wv[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    // The output stage (the forward core's, no output norm): y = (e^Λ·Z + D·v) + WV to y16 (p.WV), y·silu(z) to o16.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int tl = t0 + gr + 8 * half;
      const float e = eL[tl];
      const int64_t tok = tok_of(i) + tl;
      uint32_t y16[ZT], o16[ZT];
#pragma unroll
      for (int nt = 0; nt < ZT; ++nt) {
        const int col = c0 + nt * 8 + 2 * q;
        const float2 vv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sA + tl * LDA + col));
        const float2 zz = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sZ + tl * LDZ + col));
        const float y0 = (e * z[nt][2 * half] + Dh * vv.x) + wv[nt][2 * half];
        const float y1 = (e * z[nt][2 * half + 1] + Dh * vv.y) + wv[nt][2 * half + 1];
        y16[nt] = pack(y0, y1);
        o16[nt] = pack(y0 * (zz.x * gate_sigmoid_f(zz.x, true)), y1 * (zz.y * gate_sigmoid_f(zz.y, true)));
      }
      store_row_pairs(y16, reinterpret_cast<bf16*>(aligned16(p.WV)) + (chunk * kRows + tl) * P + c0, true);
      store_row_pairs(o16, static_cast<bf16*>(p.o16) + tok * d.d_inner + int64_t(h) * P + c0, true);
    }
  }
  if (p.walk_ready && nc > 0) {  // the last chunk's o16 rows
    __syncthreads();
    if (threadIdx.x == 0) chunk_ready_publish(p.walk_ready + int64_t(b) * nc + (nc - 1));
  }
}

}  // namespace

bool fwd_walk_supported(const BatchedParams& p) {
  // The kv chain's shapes, with the forward core's SISO output stage in bf16 (y in bf16 and Z not read: w ⊙ v left to
  // the fused core, which forms Λ's term without Z; no output norm).
  return kv_chain_supported(p) && forward_core_writes_output(p) && p.zy16 && p.z_unread && !p.d.outnorm &&
         p.d.P % kSlice == 0 && p.Q && p.K && p.V && p.WV && p.o16 && p.D && p.C_bias && p.B_bias;
}

void launch_fwd_walk(cudaStream_t s, const BatchedParams& p, void* out16) {
  MAMBA3_CHECK(fwd_walk_supported(p),
               "forward walk: unsupported layer (the kv chain's shapes, bf16 Z and y, the output stage without "
               "the output norm)");
  MAMBA3_CHECK(p.decay && out16, "forward walk: the decays or the state output is null");
  if (p.nc == 0) return;
  const int64_t blocks = int64_t(p.d.B) * p.d.H;
  MAMBA3_CHECK(blocks <= 0x7fffffff, "forward walk: {} blocks exceed the grid", blocks);
  dispatch_core_shape(p, [&](auto n, auto pp) {
    constexpr int N = decltype(n)::value, P = decltype(pp)::value;
    using Sm = WalkSmem<N, P>;
    static const cudaError_t opted = cudaFuncSetAttribute(  // (once per instance)
        fwd_walk_kernel<N, P>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Sm::bytes));
    MAMBA3_CUDA_CHECK(opted);
    launch_train(fwd_walk_kernel<N, P>, unsigned(blocks), Sm::threads, Sm::bytes, s, p, out16);
    MAMBA3_LAUNCH_CHECK();
  });
}

}  // namespace mamba3::cuda::train_detail
