// The batched path's forward core (mamba3_train_fwd_core.h): one 128-thread block per (sequence, head, chunk) of 64
// rows; warp w takes rows t ∈ [16w, 16w + 16): S = q·kᵀ for its rows (64 columns s), W = S ⊙ coef rounded to bf16 as
// the mask kernel rounds it (kept as the A operand of WV = W·v), and Z = q·H_cᵀ. Operands once into shared memory
// (cp.async, rows padded by 16 bytes); results from the accumulator fragments as float2 stores.
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/chunk_core_launch.cuh"
#include "cuda/train/mamba3_train_fwd_core.h"
#include "cuda/train/mamba3_train_math.cuh"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/train/qk_unrotated_columns.cuh"

namespace mamba3::cuda::train_detail {

namespace {

constexpr int kRows = kCoreRows;
using namespace mma_bf16;

template <int N, int P>
struct FwdSmem {
  static constexpr int LDN = N + 8, LDP = P + 8;
  // The output stage's z rows (f32, pitch LDZ) go where k was once S is formed, when they fit there.
  static constexpr int LDZ = P + 4;
  static constexpr int LDZ16 = P + 8;  // (the bf16 z rows, zx16: half the bytes of the f32 ones, so they fit too)
  static constexpr bool kZInK = size_t(kRows) * LDZ * 4 <= size_t(kRows) * LDN * sizeof(bf16);
  // Tiles, then the chunk scalars Λ, scale, γ, e^Λ (T each) and the head's output-norm weights (P).
  static constexpr size_t bytes(int T) {
    return (size_t(2 * kRows + P) * LDN + size_t(kRows) * LDP) * sizeof(bf16) + size_t(4 * T + P) * 4;
  }
};

// Rows [0, rows) of P elements of T from src (row pitch `pitch`) into shared memory at pitch ld, 16 bytes per
// cp.async (both sides' rows 16-byte aligned); not committed.
template <int P, typename T>
__device__ __forceinline__ void copy_rows_16b(T* dst, int ld, const T* src, int64_t pitch, int rows) {
  constexpr int per_row = P * int(sizeof(T)) / 16, step = kCoreThreads / per_row, elems = 16 / int(sizeof(T));
  const int r = int(threadIdx.x) / per_row, c = int(threadIdx.x) % per_row * elems;
#pragma unroll 4
  for (int row = r; row < rows; row += step)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst + row * ld + c)),
                 "l"(src + row * pitch + c));
}

// The output stage's z rows of the chunk (zx's z columns of head h, f32, row pitch din) into shared memory at pitch
// ldz, rows [0, rows): 16-byte copies where zx's rows allow them, else 4-byte ones.
template <int P>
__device__ __forceinline__ void copy_z_rows(float* dst, int ldz, const float* src, int64_t din, int rows) {
  if (din % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    copy_rows_16b<P>(dst, ldz, src, din, rows);
  } else {
    constexpr int step = kCoreThreads / P;
    const int r = int(threadIdx.x) / P, c = int(threadIdx.x) % P;
    for (int row = r; row < rows; row += step)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst + row * ldz + c)),
                   "l"(src + row * din + c));
  }
  asm volatile("cp.async.commit_group;");
}

// fuse_output: also the SISO output stage (o16), in place of the output kernel. kR: the rank when fixed at compile
// time (1, 2, 4), else 0 (read from p; see chunk_coef).
// kQk: q and k stored in their rotated half (p.qk_rotated_only; SISO), the rest formed here (an instance of its own,
// so that the others' code is as it was).
template <int N, int P, int kR, bool kQk = false>
__global__ void __launch_bounds__(kCoreThreads)
    forward_core_kernel(const BatchedParams p, const bf16* Hc16, bool fuse_output) {
  pdl_wait();
  using Smem = FwdSmem<N, P>;
  constexpr int LDN = Smem::LDN, LDP = Smem::LDP, LDZ = Smem::LDZ, LDZ16 = Smem::LDZ16, NS = kRows / 8;
  constexpr bool kZInK = Smem::kZInK;
  // The output stage is SISO's (forward_core_writes_output): MIMO's instances (kR 2, 4) compile without it — its early
  // bookkeeping, live through the products, had made them slower (ncu, 125M R = 4: 638 → 683 µs).
  constexpr bool kOutput = kR == 1 || kR == 0;
  if (!kOutput) fuse_output = false;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16 *sK = sQ + kRows * LDN, *sH = sK + kRows * LDN, *sV = sH + P * LDN;
  const int T = p.T, R = p.d.R;
  float* Lam = reinterpret_cast<float*>(sV + kRows * LDP);
  float *scale = Lam + T, *gam = scale + T, *eLs = gam + T, *nws = eLs + T;
  // (p.qk_rotated_only: a chunk's heads in consecutive blocks, which read the same bc_unrot rows)
  const int64_t chunk = kQk && p.qk_head_order ? head_fastest_chunk(p) : int64_t(blockIdx.x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  // The output stage's operands (fuse_output): its scalars now, its z rows into k's tile once S no longer needs it
  // (kZInK), so that their loads are in flight during the products instead of after them.
  const MixerDims& d = p.d;
  const int64_t bh = chunk / p.nc;
  const int b = int(bh / d.H), h = int(bh % d.H), c0 = int(chunk % p.nc) * T;
  const int out_rows = min(kRows, d.L - c0);  // rows past the sequence's end have no output
  const float* zsrc = p.zx + (int64_t(b) * d.L + c0) * d.din + int64_t(h) * P;
  // (the in_proj's bf16 z where it wrote one: then zx's z columns are empty)
  const int64_t zpitch16 = 2 * int64_t(d.d_inner);
  const bf16* zsrc16 =
      p.zx16 ? reinterpret_cast<const bf16*>(p.zx16) + (int64_t(b) * d.L + c0) * zpitch16 + int64_t(h) * P : nullptr;
  float Dh = 0.0f;

  // (p.qk_rotated_only, SISO: q's and k's rotated columns from Q and K, the others formed from bc_unrot)
  static_assert(!kQk || kR == 1, "q and k in part only for SISO");
  constexpr bool qk_half = kQk;
  [[maybe_unused]] UnrotatedColumns<N, kCoreThreads, 2> unrot;
  if (qk_half) unrot.issue(p, chunk, {true, false});  // (first: its loads ahead of the copies in the memory pipe)
  copy_qk_tiles<kCoreThreads, N, qk_half>(sQ, sK, LDN, p, chunk);
  copy_tile<kCoreThreads, P, N>(sH, LDN, Hc16 + chunk * P * N);
  copy_tile<kCoreThreads, kRows, P>(sV, LDP, static_cast<const bf16*>(p.V) + chunk * kRows * P);
  asm volatile("cp.async.commit_group;");
  for (int tl = threadIdx.x; tl < T; tl += kCoreThreads) {
    const int64_t i = chunk * T + tl;
    Lam[tl] = p.Lam[i], scale[tl] = p.scale[i], gam[tl] = p.gam[i];
    if (fuse_output) eLs[tl] = p.eL[i];
  }
  if (fuse_output) {
    Dh = p.D[h];
    for (int c = threadIdx.x; c < P; c += kCoreThreads) nws[c] = d.outnorm ? p.norm[int64_t(h) * P + c] : 1.0f;
  }
  if (qk_half) unrot.store({sQ, sK}, LDN);
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  __syncthreads();

  const int t0 = 16 * warp;
  // The 16-column blocks of s after the warp's rows (np > warp) have coef 0: their S, W and W·v terms are skipped
  // (they would add exact zeros). SISO only: MIMO's instance ran slower with them (ncu, 125M R = 4: 638 → 666 µs), a
  // measurement taken while it still carried the output stage's bookkeeping (kOutput); not measured since.
  constexpr bool kSkip = kR == 1;
  const auto above = [&](int np) { return kSkip && np > warp; };
  uint32_t w[NS / 2][4];  // W = S ⊙ coef as A fragments, one per 16 columns s
  {
    float s[NS][4];
    zero(s);
#pragma unroll
    for (int kb = 0; kb < N / 16; ++kb) {
      uint32_t a[4];
      load_a(sQ, LDN, t0, 16 * kb, a);
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        if (above(np)) continue;
        uint32_t b[4];
        load_b_nk(sK, LDN, 16 * np, 16 * kb, b);
        mma(s[2 * np], a, b[0], b[1]), mma(s[2 * np + 1], a, b[2], b[3]);
      }
    }
    if (kOutput && kZInK && fuse_output) {  // every warp is done with k: its tile takes the z rows
      __syncthreads();
      if (zsrc16) {  // (the in_proj's bf16 z: its rows are 16-byte aligned, d_inner = H·P with P a multiple of 32)
        copy_rows_16b<P>(sK, LDZ16, zsrc16, zpitch16, out_rows);
        asm volatile("cp.async.commit_group;");
      } else {
        copy_z_rows<P>(reinterpret_cast<float*>(sK), LDZ, zsrc, d.din, out_rows);
      }
    }
    if constexpr (kR == 1) {  // (chunk_coef<1>'s values from registers, no per-element branches)
      const SisoCoefRowsT rows(Lam, gam, t0, g);
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) {
        if (above(nt / 2)) continue;  // (s stays 0)
        float cf[4], ex[4];
        rows.tile(Lam, scale, nt * 8 + 2 * q, cf, ex);
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= cf[e];
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float ex;
          s[nt][e] *= chunk_coef<kR>(Lam, scale, gam, R, t0 + g + 8 * (e / 2), nt * 8 + 2 * q + e % 2, ex);
        }
    }
#pragma unroll
    for (int kb = 0; kb < NS / 2; ++kb) {
      w[kb][0] = pack(s[2 * kb][0], s[2 * kb][1]), w[kb][1] = pack(s[2 * kb][2], s[2 * kb][3]);
      w[kb][2] = pack(s[2 * kb + 1][0], s[2 * kb + 1][1]), w[kb][3] = pack(s[2 * kb + 1][2], s[2 * kb + 1][3]);
    }
  }
  float z[P / 8][4], wv[P / 8][4];
  zero(z), zero(wv);
#pragma unroll
  for (int kb = 0; kb < N / 16; ++kb) {  // Z = q·H_cᵀ (B[n][p] = H_c[p][n])
    uint32_t a[4];
    load_a(sQ, LDN, t0, 16 * kb, a);
#pragma unroll
    for (int np = 0; np < P / 16; ++np) {
      uint32_t b[4];
      load_b_nk(sH, LDN, 16 * np, 16 * kb, b);
      mma(z[2 * np], a, b[0], b[1]), mma(z[2 * np + 1], a, b[2], b[3]);
    }
  }
  const bool zy16 = kOutput && fuse_output && p.zy16;  // (Z and y in bf16: y stored by the output stage below)
  // (p.z_unread: the backward's fused core forms Λ's state-read term without Z)
  if (zy16) {
    if (!p.z_unread) store_tiles_bf16(z, reinterpret_cast<bf16*>(p.Z) + chunk * kRows * P, P, t0, 0);
  } else {
    store_tiles(z, p.Z + chunk * kRows * P, P, t0, 0);
  }
#pragma unroll
  for (int kb = 0; kb < NS / 2; ++kb) {  // WV = W·v
    if (above(kb)) continue;
#pragma unroll
    for (int np = 0; np < P / 16; ++np) {
      uint32_t b[4];
      load_b_kn(sV, LDP, 16 * kb, 16 * np, b);
      mma(wv[2 * np], w[kb], b[0], b[1]), mma(wv[2 * np + 1], w[kb], b[2], b[3]);
    }
  }
  if (p.wv_holds_y) {  // MIMO: y = (e^Λ·Z + D·v) + W·v in WV (chunk_row_y), the output stage's only read
    const float Dy = p.D[h];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = t0 + g + 8 * half;
      const float e = p.eL[chunk * T + j / R];
#pragma unroll
      for (int nt = 0; nt < P / 8; ++nt) {
        const float2 vv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sV + j * LDP + nt * 8 + 2 * q));
        wv[nt][2 * half] = chunk_row_y(e, z[nt][2 * half], Dy, vv.x, wv[nt][2 * half]);
        wv[nt][2 * half + 1] = chunk_row_y(e, z[nt][2 * half + 1], Dy, vv.y, wv[nt][2 * half + 1]);
      }
    }
  }
  if (!zy16) store_tiles(wv, p.WV + chunk * kRows * P, P, t0, 0);
  if (!kOutput || !fuse_output) return;
  // The SISO output stage from the registers (the output kernel's arithmetic, its row sums over a quad instead of a
  // warp): y = (e^Λ·Z + D·v) + WV, the optional RMSNorm over the head's P channels, the gate y·silu(z) → o16.
  if constexpr (kZInK) {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
  }
  const float* sZ = reinterpret_cast<const float*>(sK);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int tl = t0 + g + 8 * half;  // SISO: row = token
    const float e = eLs[min(tl, T - 1)];
    float y[P / 8][2], ss = 0.0f;
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt)
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int col = nt * 8 + 2 * q + k;
        const float vv = __bfloat162float(sV[tl * LDP + col]);
        y[nt][k] = (e * z[nt][2 * half + k] + Dh * vv) + wv[nt][2 * half + k];
        ss += y[nt][k] * y[nt][k];
      }
    if (zy16) {  // y of the row in bf16 (every row of the chunk, as Z)
      uint32_t y16[P / 8];
#pragma unroll
      for (int nt = 0; nt < P / 8; ++nt) y16[nt] = pack(y[nt][0], y[nt][1]);
      store_row_pairs(y16, reinterpret_cast<bf16*>(p.WV) + (chunk * kRows + tl) * P, true);
    }
    const float rstd = d.outnorm ? 1.0f / sqrtf(quad_sum(ss) / float(P) + kEps) : 1.0f;
    const bool real = tl < out_rows;  // (padding rows: no loads or stores; the quad exchange takes every lane)
    const int64_t tok = int64_t(b) * d.L + c0 + tl;
    __nv_bfloat16* orow = static_cast<__nv_bfloat16*>(p.o16) + tok * d.d_inner + int64_t(h) * P;
    // Every load of the row before its first store (a global load after a store through a pointer the compiler
    // cannot tell apart waits for it). zx rows are din floats: an odd din leaves them 4-byte aligned only.
    float zz[P / 8][2];
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      const int col = nt * 8 + 2 * q;
      if constexpr (kZInK) {
        const float2 z2 = zsrc16 ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(sK + tl * LDZ16 + col))
                                 : *reinterpret_cast<const float2*>(sZ + tl * LDZ + col);
        zz[nt][0] = z2.x, zz[nt][1] = z2.y;
      } else if (zsrc16) {
        const float2 z2 = real ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(zsrc16 + tl * zpitch16 + col))
                               : make_float2(0.0f, 0.0f);
        zz[nt][0] = z2.x, zz[nt][1] = z2.y;
      } else {
        zz[nt][0] = real ? zsrc[tl * d.din + col] : 0.0f, zz[nt][1] = real ? zsrc[tl * d.din + col + 1] : 0.0f;
      }
    }
    uint32_t o16[P / 8];
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      float o[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const float zv = zz[nt][k], yv = y[nt][k];
        const float yn = d.outnorm ? yv * rstd * nws[nt * 8 + 2 * q + k] : yv;
        o[k] = yn * (zv * gate_sigmoid_f(zv, true));  // (bf16 mode only)
      }
      o16[nt] = pack(o[0], o[1]);
    }
    // 16 bytes per lane (o16's rows are d_inner = H·P bf16, P a multiple of 32).
    store_row_pairs(o16, orow, real);
  }
}

}  // namespace

bool forward_core_supported(const BatchedParams& p) { return core_shape_supported(p); }

bool forward_core_writes_output(const BatchedParams& p) { return !p.d.mimo && p.o16 && !p.o; }

void launch_batched_forward_core(cudaStream_t s, const BatchedParams& p, const void* Hc16) {
  MAMBA3_CHECK(forward_core_supported(p), "forward core: unsupported chunk (bf16 {}, rows {}, N {}, P {})", p.bf16,
               p.rows, p.d.N, p.d.P);
  MAMBA3_CHECK(!p.qk_rotated_only || p.d.R == 1, "forward core: q and k stored in part only for SISO");
  const bool out = forward_core_writes_output(p);
  dispatch_core_shape(p, [&](auto n, auto pp) {
    constexpr int N = decltype(n)::value, P = decltype(pp)::value;
    const auto run = [&](auto kernel) {
      launch_core(kernel, "forward core", s, p, FwdSmem<N, P>::bytes(p.T), p, static_cast<const bf16*>(Hc16), out);
    };
    if (p.d.R == 1 && p.qk_rotated_only)
      run(forward_core_kernel<N, P, 1, true>);
    else if (p.d.R == 1)
      run(forward_core_kernel<N, P, 1>);
    else if (p.d.R == 2) run(forward_core_kernel<N, P, 2>);
    else if (p.d.R == 4) run(forward_core_kernel<N, P, 4>);
    else run(forward_core_kernel<N, P, 0>);
  });
}

}  // namespace mamba3::cuda::train_detail
