// The chunk kernels of the Mamba-3 mixer's GPU training pass: the chunked form of spec §5.3 on one (sequence, head)
// per thread block, walking its chunks with shared-memory tiles. A port of src/ops/mamba3_scan_backward.cpp (whose
// comment block gives the math): the forward pass (o; for the backward also H at chunk starts, dy, dz and the
// output stage's parameter partials), then the reverse pass carrying dH.
//
// Tiles (f32, rows = T·R ≤ 64 chunk rows, row strides padded by one float so that column walks miss bank
// conflicts): forward P·N state + 2 rows·N (q, k) + 2–3 rows·P (v, y, dyn) + rows² (scores); reverse P·N (H_c, dH)
// ×2 + 4 rows·N + 5 rows·P + 3 rows². The host picks T so that the tiles fit (mamba3_train_gpu.cpp).
// Every sum runs in a fixed order owned by one thread (or a butterfly warp sum): bit-reproducible, no atomics.
//
// Two schedules (ChunkParams::parallel, MAMBA3_TRAIN_SCAN): "sequential", one block per (sequence, head) walking its
// chunks and carrying H / dH in shared memory; "parallel" (the SSD chunk decomposition), where the same kernels run
// one block per (sequence, head, chunk) and read their chunk-start H (forward) or incoming dH (reverse) from global
// scratch filled by an elementwise scan over chunks (chunk_scan_kernel) of per-chunk contributions computed from a
// zero start (chunk_state_kernel: ΔH_c = (w ⊙ v)ᵀ·k; the backward's forward pass: (e^Λ ⊙ dy)ᵀ·q). In the f32 path the
// scan adds exactly the terms the sequential kernels add, in the same order and form (e·S + Δ), so the states, and
// with them every per-token output, are bit-identical between the schedules; only the per-(b, h) parameter
// partials, which become per-(b, h, chunk) partials summed later, round differently.
#ifndef MAMBA3_CHUNK_HOST_EMULATION
#include "cuda/cuda_check.h"
#endif
#include <cstdint>

#include "cuda/pdl.h"
#include "cuda/train/mamba3_train_chunk_tc.cuh"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_math.cuh"

namespace mamba3::cuda::train_detail {

namespace {

constexpr int kWarps = kChunkThreads / 32;
static_assert(tc::kWarps == kWarps, "the tensor-core products deal their tiles to the chunk block's warps");
// Register micro-tiles: a thread owns kTile consecutive rows × kTile columns (strided by the column-tile count in the
// row-by-column products, consecutive in the square score tiles), loading kTile + kTile shared operands per k-step for
// kTile² FMAs. Every output still sums its terms in the plain loop's order (rows past the end are clamped for the
// loads and never stored).
constexpr int kTile = 4;

// dst[r·ld + c] = src[r·src_ld + c] for r < rows, c < cols, by the whole block. Each thread issues kLoadsAhead loads
// (float4 where cols, src_ld and src allow) before it stores any: with one load in flight per thread, the copies of a
// chunk's tiles waited on global memory's latency once per element (≈ 8 µs per P·N state at one block per SM).
constexpr int kLoadsAhead = 4;
// build_chunk computes fewer elements ahead: 4 pushed the tensor-core pass 1 to 128 registers with spills.
constexpr int kBuildAhead = 2;
__device__ __forceinline__ void load_tile(float* dst, int ld, const float* src, int64_t src_ld, int rows, int cols) {
  if (cols % 4 == 0 && src_ld % 4 == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    const int c4 = cols / 4, total = rows * c4;
    for (int e0 = threadIdx.x; e0 < total; e0 += kChunkThreads * kLoadsAhead) {
      float4 v[kLoadsAhead];
#pragma unroll
      for (int u = 0; u < kLoadsAhead; ++u) {
        const int e = min(e0 + u * kChunkThreads, total - 1);
        v[u] = *reinterpret_cast<const float4*>(src + (e / c4) * src_ld + (e % c4) * 4);
      }
#pragma unroll
      for (int u = 0; u < kLoadsAhead; ++u) {
        const int e = e0 + u * kChunkThreads;
        if (e >= total) break;
        float* o = dst + (e / c4) * ld + (e % c4) * 4;
        o[0] = v[u].x, o[1] = v[u].y, o[2] = v[u].z, o[3] = v[u].w;
      }
    }
    return;
  }
  const int total = rows * cols;
  for (int e0 = threadIdx.x; e0 < total; e0 += kChunkThreads * kLoadsAhead) {
    float v[kLoadsAhead];
#pragma unroll
    for (int u = 0; u < kLoadsAhead; ++u) {
      const int e = min(e0 + u * kChunkThreads, total - 1);
      v[u] = src[(e / cols) * src_ld + e % cols];
    }
#pragma unroll
    for (int u = 0; u < kLoadsAhead; ++u) {
      const int e = e0 + u * kChunkThreads;
      if (e >= total) break;
      dst[(e / cols) * ld + e % cols] = v[u];
    }
  }
}

// Float offsets of the forward kernel's shared-memory tiles. In the parallel schedule k and v are dead once y is
// formed (no state update), so the backward's dyn/dy tile (rows·ldP) reuses their contiguous rows·(ldN + ldP)
// (at N 128, P 64 and 42 rows: 107 KB instead of 118 KB, two blocks per H200 SM).
struct FwdLayout {
  int ldN, ldP, ldR, H, Q, K, V, Y, W, vec, DYN, gz, go, gn, total;
  __host__ __device__ FwdLayout(const MixerDims& d, int T, bool bwd, bool par) {
    const int rows = T * d.R;
    ldN = d.N + 1, ldP = d.P + 1, ldR = rows + 1;
    int o = 0;
    H = o, o += d.P * ldN;
    Q = o, o += rows * ldN;
    K = o, o += rows * ldN;
    V = o, o += rows * ldP;
    Y = o, o += rows * ldP;
    W = o, o += rows * ldR;
    vec = o, o += 5 * T + 2 * rows;  // Λ, scale, γ, e^Λ, w | rstd, mean
    DYN = par ? K : o, o += bwd && !par ? rows * ldP : 0;  // parallel: over k and v (V = K + rows·ldN)
    gz = o, o += bwd ? d.R * d.P : 0;
    go = o, o += bwd ? d.R * d.P : 0;
    gn = o, o += bwd ? d.P : 0;
    total = o;
  }
};

// Float offsets of the reverse kernel's shared-memory tiles.
struct RevLayout {
  int ldN, ldP, ldR, Q, K, dQ, dK, V, dY, dV, T1, T2, Sm, dW, E, Hc, dH, vec, red, gB, gC, gX, total;
  __host__ __device__ RevLayout(const MixerDims& d, int T) {
    const int rows = T * d.R;
    ldN = d.N + 1, ldP = d.P + 1, ldR = rows + 1;
    int o = 0;
    Q = o, o += rows * ldN;
    K = o, o += rows * ldN;
    dQ = o, o += rows * ldN;
    dK = o, o += rows * ldN;
    V = o, o += rows * ldP;
    dY = o, o += rows * ldP;
    dV = o, o += rows * ldP;
    T1 = o, o += rows * ldP;
    T2 = o, o += rows * ldP;
    Sm = o, o += rows * ldR;
    dW = o, o += rows * ldR;
    E = o, o += rows * ldR;
    Hc = o, o += d.P * ldN;
    dH = o, o += d.P * ldN;
    vec = o, o += 6 * T + 2 * rows;  // Λ, scale, γ, e^Λ, e^{Λ_last−Λ}, dΛ | dΛ from H_c, dw
    red = o, o += kWarps + 1;        // warp partials of Σ dH ⊙ H_c, then the sum
    gB = o, o += d.R * d.N;
    gC = o, o += d.R * d.N;
    gX = o, o += d.R * d.P;
    total = o;
  }
};

// q (rotated, biased C; skipped when sQ is null), k (the same from B) and v (mimo_x ⊙ x) of tokens [c0, c0 + Tc)
// into the tiles.
__device__ __forceinline__ void build_chunk(const ChunkParams& p, int64_t bh, int b, int h, int c0, int Tc, float* sQ, float* sK,
                            float* sV, int ldN, int ldP) {
  const MixerDims& d = p.d;
  const int rows = Tc * d.R, g = h / (d.H / d.G), totalN = rows * d.N, totalP = rows * d.P;
  // kBuildAhead elements per thread computed (their global loads in flight together) before any is stored.
  for (int e0 = threadIdx.x; e0 < totalN; e0 += kChunkThreads * kBuildAhead) {
    float vq[kBuildAhead], vk[kBuildAhead];
#pragma unroll
    for (int u = 0; u < kBuildAhead; ++u) {
      const int e = min(e0 + u * kChunkThreads, totalN - 1);
      const int j = e / d.N, n = e % d.N, tl = j / d.R, r = j % d.R;
      const int64_t t = c0 + tl, st = bh * d.L + t;
      const float* z = p.zx + (int64_t(b) * d.L + t) * d.din;
      const float* phi = p.phi + st * d.S;
      const int64_t bias = (int64_t(h) * d.R + r) * d.N, grp = int64_t(r * d.G + g) * d.N;
      vq[u] = sQ ? bias_rotate_at(z + d.off_C + grp, p.C_bias + bias, phi, n, d.N, d.S, d.mimo) : 0.0f;
      vk[u] = bias_rotate_at(z + d.off_B + grp, p.B_bias + bias, phi, n, d.N, d.S, d.mimo);
    }
#pragma unroll
    for (int u = 0; u < kBuildAhead; ++u) {
      const int e = e0 + u * kChunkThreads;
      if (e >= totalN) break;
      const int j = e / d.N, n = e % d.N;
      if (sQ) sQ[j * ldN + n] = vq[u];
      sK[j * ldN + n] = vk[u];
    }
  }
  for (int e0 = threadIdx.x; e0 < totalP; e0 += kChunkThreads * kBuildAhead) {
    float vv[kBuildAhead];
#pragma unroll
    for (int u = 0; u < kBuildAhead; ++u) {
      const int e = min(e0 + u * kChunkThreads, totalP - 1);
      const int j = e / d.P, q = e % d.P, tl = j / d.R, r = j % d.R;
      const float x = p.zx[(int64_t(b) * d.L + c0 + tl) * d.din + d.off_x + int64_t(h) * d.P + q];
      vv[u] = d.mimo ? p.mimo_x[(int64_t(h) * d.R + r) * d.P + q] * x : x;
    }
#pragma unroll
    for (int u = 0; u < kBuildAhead; ++u) {
      const int e = e0 + u * kChunkThreads;
      if (e >= totalP) break;
      sV[(e / d.P) * ldP + e % d.P] = vv[u];
    }
  }
}

// Called by the whole block (it holds two barriers): the chunk-local decay prefix Λ (summed in token order by one
// thread as the CPU does, from A and Δ staged in Λ and e^Λ by one thread per token), e^Λ, γ = λΔ and
// scale_t = γ_t + (1 − λ_{t+1})·Δ_{t+1} (the next token may lie in the next chunk; 0 after the last).
__device__ __forceinline__ void chunk_scalars(const ChunkParams& p, int64_t bh, int c0, int Tc, float* Lam, float* scale, float* gam,
                              float* eL) {
  const int L = p.d.L;
  for (int tl = threadIdx.x; tl < Tc; tl += kChunkThreads) {
    const int64_t st = bh * L + c0 + tl;
    const float dt = p.dt[st], lam = p.lam[st];
    Lam[tl] = p.A[st], eL[tl] = dt;
    gam[tl] = lam * dt;
    const float next = c0 + tl + 1 < L ? (1.0f - p.lam[st + 1]) * p.dt[st + 1] : 0.0f;
    scale[tl] = lam * dt + next;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float run = 0;
    for (int tl = 0; tl < Tc; ++tl) run += Lam[tl] * eL[tl], Lam[tl] = run;
  }
  __syncthreads();
  for (int tl = threadIdx.x; tl < Tc; tl += kChunkThreads) eL[tl] = expf(Lam[tl]);
}

// out (P × N, row stride ldo; global memory allowed) = Σ_{rows j} s[j / R]·X[j, q]·Y[j, n] from zero, X (rows, P)
// row stride ldX, Y (rows, N) row stride ldY, as kTile×kTile register tiles with the terms in the sequential
// kernels' order: the state change (w ⊙ v)ᵀ·k of a chunk (forward) and its dH contribution (e^Λ ⊙ dy)ᵀ·q (backward),
// which the sequential kernels add onto e^{Λ_last}·H and e^{Λ_last}·dH. 2·rows·P·N FLOPs.
__device__ __forceinline__ void state_outer_f32(int rows, int R, int P, int N, const float* X, int ldX, const float* s,
                                                const float* Y, int ldY, float* out, int ldo) {
  const int pt = (P + kTile - 1) / kTile, nt = (N + kTile - 1) / kTile;
  for (int t = threadIdx.x; t < pt * nt; t += kChunkThreads) {
    const int q0 = (t / nt) * kTile, n0 = t % nt;
    int qc[kTile], nc[kTile];
#pragma unroll
    for (int a = 0; a < kTile; ++a) qc[a] = min(q0 + a, P - 1), nc[a] = min(n0 + a * nt, N - 1);
    float acc[kTile][kTile] = {};
    for (int j = 0; j < rows; ++j) {
      const float sj = s[j / R];
      float x[kTile], y[kTile];
#pragma unroll
      for (int a = 0; a < kTile; ++a) x[a] = sj * X[j * ldX + qc[a]], y[a] = Y[j * ldY + nc[a]];
#pragma unroll
      for (int a = 0; a < kTile; ++a)
#pragma unroll
        for (int c = 0; c < kTile; ++c) acc[a][c] += x[a] * y[c];
    }
#pragma unroll
    for (int a = 0; a < kTile; ++a)
#pragma unroll
      for (int c = 0; c < kTile; ++c) {
        const int q = q0 + a, n = n0 + c * nt;
        if (q < P && n < N) out[int64_t(q) * ldo + n] = acc[a][c];
      }
  }
}

// out = Σ_j s[j / R]·X[j, q]·Y[j, n] as state_outer_f32, for P and N multiples of 4, ldX and ldY multiples of 4 and
// 16-byte aligned X, Y, out: a thread owns 4 consecutive q × 4 consecutive n, so each k-step reads one float4 of X and
// one of Y (2 shared loads per 16 FMAs instead of 8; the state kernel was bound by its shared loads). Each output
// sums the same terms in the same order as state_outer_f32: the same bits.
__device__ __forceinline__ void state_outer_f32_vec(int rows, int R, int P, int N, const float* X, int ldX,
                                                    const float* s, const float* Y, int ldY, float* out, int ldo) {
  const int n4 = N / 4;
  for (int t = threadIdx.x; t < (P / 4) * n4; t += kChunkThreads) {
    const int q0 = (t / n4) * 4, n0 = (t % n4) * 4;
    float acc[4][4] = {};
    for (int j = 0; j < rows; ++j) {
      const float sj = s[j / R];
      const float4 xv = *reinterpret_cast<const float4*>(X + j * ldX + q0);
      const float4 yv = *reinterpret_cast<const float4*>(Y + j * ldY + n0);
      const float x[4] = {sj * xv.x, sj * xv.y, sj * xv.z, sj * xv.w}, y[4] = {yv.x, yv.y, yv.z, yv.w};
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][c] += x[a] * y[c];
    }
#pragma unroll
    for (int a = 0; a < 4; ++a)
      *reinterpret_cast<float4*>(out + int64_t(q0 + a) * ldo + n0) = make_float4(acc[a][0], acc[a][1], acc[a][2], acc[a][3]);
  }
}

// Float offsets of the chunk-state kernel's shared-memory tiles. Row strides are padded to multiples of 4 floats
// (16-byte rows for state_outer_f32_vec, whose warps read whole rows: no bank conflicts).
struct StateLayout {
  int ldN, ldP, K, V, vec, total;
  __host__ __device__ StateLayout(const MixerDims& d, int T) {
    const int rows = T * d.R;
    ldN = (d.N + 3) / 4 * 4, ldP = (d.P + 3) / 4 * 4;
    int o = 0;
    K = o, o += rows * ldN;
    V = o, o += rows * ldP;
    vec = o, o += 5 * T;  // Λ, scale, γ, e^Λ, w
    total = o;
  }
};

// Parallel schedule, step 1: one block per (b, h, chunk c) = blockIdx.x (chunk fastest). The chunk's state change
// from a zero start ΔH_c = (w ⊙ v)ᵀ·k → Hc slot c + 1 (the scan turns it into the state at chunk c + 1's start) and
// e^{Λ_last} → decay[c]; the last chunk only writes its decay (its state change is never used). Same tiles, scalars
// and term order as chunk_forward_kernel's state update. 3·rows·P·N FLOPs per chunk (with the w ⊙ v scaling); reads
// 2·R·N + P floats per token and head, writes P·N per chunk.
template <bool kTC>
__global__ void __launch_bounds__(kChunkThreads) chunk_state_kernel(const ChunkParams p) {
  pdl_wait();
  extern __shared__ float sm[];
  const MixerDims& d = p.d;
  const StateLayout lay(d, p.T);
  const int T = p.T, chunks = (d.L + T - 1) / T, P = d.P, N = d.N, R = d.R;
  const int64_t bh = blockIdx.x / chunks;
  const int ci = int(blockIdx.x % chunks), b = int(bh / d.H), h = int(bh % d.H);
  const int c0 = ci * T, Tc = min(T, d.L - c0), rows = Tc * R;
  const bool last = ci == chunks - 1;
  float *sK = sm + lay.K, *sV = sm + lay.V;
  float *Lam = sm + lay.vec, *scale = Lam + T, *gam = scale + T, *eL = gam + T, *wv = eL + T;
  if (!last) build_chunk(p, bh, b, h, c0, Tc, nullptr, sK, sV, lay.ldN, lay.ldP);
  chunk_scalars(p, bh, c0, Tc, Lam, scale, gam, eL);
  for (int tl = threadIdx.x; tl < Tc; tl += kChunkThreads) wv[tl] = expf(Lam[Tc - 1] - Lam[tl]) * scale[tl];
  __syncthreads();
  if (threadIdx.x == 0) p.decay[bh * chunks + ci] = eL[Tc - 1];
  if (last) return;  // uniform over the block
  float* out = p.Hc + (bh * chunks + ci + 1) * P * N;
  if constexpr (kTC) {
    tc::state_outer(rows, R, P, N, sV, lay.ldP, wv, sK, lay.ldN, out, N, threadIdx.x / 32, threadIdx.x % 32);
  } else if (P % 4 == 0 && N % 4 == 0) {  // out: Hc slot rows of N floats, 16-byte aligned as P·N is a multiple of 4
    state_outer_f32_vec(rows, R, P, N, sV, lay.ldP, wv, sK, lay.ldN, out, N);
  } else {
    state_outer_f32(rows, R, P, N, sV, lay.ldP, wv, sK, lay.ldN, out, N);
  }
}

// Parallel schedule, the elementwise scan over chunks: one thread per (b, h, element e of P·N), in place on
// S (B·H, chunks, P·N). Forward: slot c holds chunk c − 1's state change ΔH from zero; S[c] ← decay[c − 1]·S[c − 1]
// + S[c] with S[0] = 0 gives the state at every chunk start. Reverse: slot c holds chunk c + 1's dH contribution;
// S[c] ← decay[c + 1]·S[c + 1] + S[c] with S[last] = 0 gives the dH entering every chunk from the later ones. The
// sequential kernels' recurrences (H ← e·H + Δ, dH ← e·dH + Δ) term for term. 2 FLOPs and 8 bytes per element and
// chunk (+ 2 bytes when copy16 takes each result rounded to bf16 for bf16 products).
__global__ void chunk_scan_kernel(float* S, const float* decay, int64_t BH, int chunks, int PN, bool reverse,
                                  uint16_t* copy16, bool write_f32) {
  pdl_wait();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= BH * PN) return;
  const int64_t bh = i / PN, off = bh * chunks * PN + i % PN;
  float* s = S + off;
  uint16_t* s16 = copy16 ? copy16 + off : nullptr;
  const float* dc = decay + bh * chunks;
  float run = 0.0f;
  if (!reverse) {
    if (write_f32) s[0] = 0.0f;
    if (s16) s16[0] = 0;
    for (int c = 1; c < chunks; ++c) {
      run = dc[c - 1] * run + s[int64_t(c) * PN];
      if (write_f32) s[int64_t(c) * PN] = run;
      if (s16) s16[int64_t(c) * PN] = bf16_bits_rn(run);
    }
  } else {
    if (write_f32) s[int64_t(chunks - 1) * PN] = 0.0f;
    if (s16) s16[int64_t(chunks - 1) * PN] = 0;
    for (int c = chunks - 2; c >= 0; --c) {
      run = dc[c + 1] * run + s[int64_t(c) * PN];
      if (write_f32) s[int64_t(c) * PN] = run;
      if (s16) s16[int64_t(c) * PN] = bf16_bits_rn(run);
    }
  }
}

// Forward over chunks for one (b, h) = blockIdx.x. Per chunk of rows = T·R: scores r²·N, y r·P·(2N + r),
// state update 3·r·P·N FLOPs, i.e. ≈ R·(T·R·(N + P) + 5·P·N) per token and head; traffic per token and head
// ≈ 2·R·N + 2·P reads + P writes (backward: + P + R·P + P, and P·N per chunk for H_c), all else in shared memory.
// The products run as kTile×kTile register tiles (shared loads per FMA 2/kTile); the score tiles straddling the
// diagonal also form their masked entries, ≈ kTile/(T·R) more score FLOPs.
// kTC (bf16 mode, chunk path "tc"): the four products on tensor cores instead (mamba3_train_chunk_tc.cuh: m16n8k16
// bf16 × bf16 → f32, 16×8 output tiles dealt to the 8 warps, fragments formed from the same f32 tiles). Per chunk of
// 64 rows (N 128, P 64): 752 mma = 3.1 MFLOP (scores 20 causal tiles, y 32, W·v 80 mma, state 256); the shared-memory
// layout, the traffic above and every epilogue are the f32 path's.
// kPar (the chunk-parallel schedule): one block per (b, h, chunk) = blockIdx.x (chunk fastest) starting from the
// chunk's state in Hc (filled by chunk_state_kernel and the scan), without the state update; with kBwd it also
// writes the chunk's dH contribution (e^Λ ⊙ dy)ᵀ·q (2·rows·P·N FLOPs) to dHc slot c − 1 for the reverse scan.
// The body is shared by two entry points (below): chunk_forward_kernel, __launch_bounds__(256) (up to 255 registers),
// and the parallel schedule's chunk_forward_kernel_2blk, __launch_bounds__(256, 2) (≤ 128 registers, for chunks whose
// tiles let two blocks share an SM; ChunkParams::fwd_blocks). Only the register allocation differs, never the
// arithmetic: the same results bit for bit.
template <bool kBwd, bool kTC, bool kPar>
__device__ __forceinline__ void chunk_forward_body(const ChunkParams& p) {
  extern __shared__ float sm[];
  const MixerDims& d = p.d;
  const FwdLayout lay(d, p.T, kBwd, kPar);
  const int ldN = lay.ldN, ldP = lay.ldP, ldR = lay.ldR, P = d.P, N = d.N, R = d.R, T = p.T;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int chunks = (d.L + T - 1) / T;
  const int64_t bh = kPar ? blockIdx.x / chunks : blockIdx.x;
  const int b = int(bh / d.H), h = int(bh % d.H);
  const int c_begin = kPar ? int(blockIdx.x % chunks) : 0, c_end = kPar ? c_begin + 1 : chunks;
  const int64_t prow = kPar ? (int64_t(b) * chunks + c_begin) * d.H + h : bh;  // parameter partials' row
  float *sH = sm + lay.H, *sQ = sm + lay.Q, *sK = sm + lay.K, *sV = sm + lay.V, *sY = sm + lay.Y, *sW = sm + lay.W;
  float *Lam = sm + lay.vec, *scale = Lam + T, *gam = scale + T, *eL = gam + T, *wv = eL + T;
  float *rstd = wv + T, *mean = rstd + T * R;
  float *sDYN = sm + lay.DYN, *gz = sm + lay.gz, *go = sm + lay.go, *gn = sm + lay.gn;
  const float Dh = p.D[h];
  const float* nw = d.outnorm ? p.norm + int64_t(h) * P : nullptr;

  // The chunk's start state from the scan (parallel), or the zero state of training.
  const float* H0 = kPar ? p.Hc + (bh * chunks + c_begin) * P * N : nullptr;
  if (kPar) load_tile(sH, ldN, H0, N, P, N);
  else for (int e = tid; e < P * N; e += kChunkThreads) sH[(e / N) * ldN + e % N] = 0.0f;
  if (kBwd) {
    for (int e = tid; e < R * P; e += kChunkThreads) gz[e] = 0.0f, go[e] = 0.0f;
    for (int e = tid; e < P; e += kChunkThreads) gn[e] = 0.0f;
  }
  __syncthreads();

  for (int ci = c_begin; ci < c_end; ++ci) {
    const int c0 = ci * T, Tc = min(T, d.L - c0), rows = Tc * R;
    if (kBwd && !kPar)
      for (int e = tid; e < P * N; e += kChunkThreads)
        p.Hc[(bh * chunks + ci) * P * N + e] = sH[(e / N) * ldN + e % N];
    build_chunk(p, bh, b, h, c0, Tc, sQ, sK, sV, ldN, ldP);
    chunk_scalars(p, bh, c0, Tc, Lam, scale, gam, eL);
    for (int tl = tid; tl < Tc; tl += kChunkThreads) wv[tl] = expf(Lam[Tc - 1] - Lam[tl]) * scale[tl];
    __syncthreads();

    [[maybe_unused]] const tc::Tiles tt{rows, R, N, P, ldN, ldP, ldR, sQ, sK, sV, Lam, scale, gam, eL, Dh};
    // Causal weights W = (q·kᵀ) ⊙ coef, and y = e^Λ·(q·Hᵀ) + D·v.
    [[maybe_unused]] const int rt = (rows + kTile - 1) / kTile, pt = (P + kTile - 1) / kTile,
                               nt = (N + kTile - 1) / kTile;
    if constexpr (kTC) {
      tc::fwd_scores_y(tt, sH, sW, sY, warp, lane);
    } else {
      for (int t = tid; t < rt * rt; t += kChunkThreads) {
        const int j0 = (t / rt) * kTile, k0 = (t % rt) * kTile;
        float acc[kTile][kTile] = {};
        if (k0 / R <= min(j0 + kTile - 1, rows - 1) / R) {  // else the tile lies wholly above the causal diagonal
          int jr[kTile], kr[kTile];
#pragma unroll
          for (int a = 0; a < kTile; ++a) jr[a] = min(j0 + a, rows - 1) * ldN, kr[a] = min(k0 + a, rows - 1) * ldN;
          for (int n = 0; n < N; ++n) {
            float x[kTile], y[kTile];
#pragma unroll
            for (int a = 0; a < kTile; ++a) x[a] = sQ[jr[a] + n], y[a] = sK[kr[a] + n];
#pragma unroll
            for (int a = 0; a < kTile; ++a)
#pragma unroll
              for (int c = 0; c < kTile; ++c) acc[a][c] += x[a] * y[c];
          }
        }
#pragma unroll
        for (int a = 0; a < kTile; ++a)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            const int j = j0 + a, jj = k0 + c;
            if (j >= rows || jj >= rows) continue;
            const int tl = j / R, sl = jj / R;
            sW[j * ldR + jj] = sl <= tl ? acc[a][c] * (sl < tl ? expf(Lam[tl] - Lam[sl]) * scale[sl] : gam[tl]) : 0.0f;
          }
      }
      for (int t = tid; t < rt * pt; t += kChunkThreads) {
        const int j0 = (t / pt) * kTile, q0 = t % pt;
        int jr[kTile], qr[kTile];
#pragma unroll
        for (int a = 0; a < kTile; ++a) jr[a] = min(j0 + a, rows - 1) * ldN, qr[a] = min(q0 + a * pt, P - 1) * ldN;
        float acc[kTile][kTile] = {};
        for (int n = 0; n < N; ++n) {
          float x[kTile], y[kTile];
#pragma unroll
          for (int a = 0; a < kTile; ++a) x[a] = sQ[jr[a] + n], y[a] = sH[qr[a] + n];
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) acc[a][c] += x[a] * y[c];
        }
#pragma unroll
        for (int a = 0; a < kTile; ++a)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            const int j = j0 + a, q = q0 + c * pt;
            if (j < rows && q < P) sY[j * ldP + q] = eL[j / R] * acc[a][c] + Dh * sV[j * ldP + q];
          }
      }
    }
    __syncthreads();

    // y += W·v; the state to the chunk's end: H ← e^{Λ_last}·H + (w ⊙ v)ᵀ·k (sequential schedule only).
    const float elast = eL[Tc - 1];
    if constexpr (kTC) {
      tc::fwd_wv_state(tt, sW, wv, elast, sH, sY, warp, lane, !kPar);
    } else {
      for (int t = tid; t < rt * pt; t += kChunkThreads) {
        const int j0 = (t / pt) * kTile, q0 = t % pt;
        int jr[kTile], qc[kTile], end[kTile];
#pragma unroll
        for (int a = 0; a < kTile; ++a) {
          const int j = min(j0 + a, rows - 1);
          jr[a] = j * ldR, end[a] = (j / R + 1) * R, qc[a] = min(q0 + a * pt, P - 1);
        }
        float acc[kTile][kTile] = {};
        for (int jj = 0; jj < end[kTile - 1]; ++jj) {  // end[] grows with the row
          float v[kTile];
#pragma unroll
          for (int c = 0; c < kTile; ++c) v[c] = sV[jj * ldP + qc[c]];
#pragma unroll
          for (int a = 0; a < kTile; ++a)
            if (jj < end[a]) {
              const float w = sW[jr[a] + jj];
#pragma unroll
              for (int c = 0; c < kTile; ++c) acc[a][c] += w * v[c];
            }
        }
#pragma unroll
        for (int a = 0; a < kTile; ++a)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            const int j = j0 + a, q = q0 + c * pt;
            if (j < rows && q < P) sY[j * ldP + q] += acc[a][c];
          }
      }
      for (int t = tid; t < (kPar ? 0 : pt * nt); t += kChunkThreads) {
        const int q0 = (t / nt) * kTile, n0 = t % nt;
        int qc[kTile], nc[kTile];
#pragma unroll
        for (int a = 0; a < kTile; ++a) qc[a] = min(q0 + a, P - 1), nc[a] = min(n0 + a * nt, N - 1);
        float acc[kTile][kTile] = {};
        for (int jj = 0; jj < rows; ++jj) {
          const float wj = wv[jj / R];
          float x[kTile], y[kTile];
#pragma unroll
          for (int a = 0; a < kTile; ++a) x[a] = wj * sV[jj * ldP + qc[a]], y[a] = sK[jj * ldN + nc[a]];
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) acc[a][c] += x[a] * y[c];
        }
#pragma unroll
        for (int a = 0; a < kTile; ++a)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            const int q = q0 + a, n = n0 + c * nt;
            if (q < P && n < N) sH[q * ldN + n] = elast * sH[q * ldN + n] + acc[a][c];
          }
      }
    }
    __syncthreads();

    // Output stage (spec §7): per-row RMS of y when normed, then the gate, per column q over the chunk's tokens.
    for (int j = warp; j < rows; j += kWarps) {
      float ss = 0.0f;
      for (int q = lane; q < P; q += 32) ss += sY[j * ldP + q] * sY[j * ldP + q];
      ss = warp_sum(ss);
      if (lane == 0) rstd[j] = nw ? 1.0f / sqrtf(ss / float(P) + kEps) : 1.0f;
    }
    __syncthreads();
    if (!d.mimo) {
      // SISO: o and dz are per (token, q): a thread per element, the gate inputs of kLoadsAhead elements loaded
      // together (a thread per column walking the tokens waited on a global load per token).
      const int total = Tc * P;
      for (int e0 = tid; e0 < total; e0 += kChunkThreads * kLoadsAhead) {
        float zv[kLoadsAhead], dv[kLoadsAhead];
#pragma unroll
        for (int u = 0; u < kLoadsAhead; ++u) {
          const int e = min(e0 + u * kChunkThreads, total - 1);
          const int64_t i = (int64_t(b) * d.L + c0 + e / P) * d.d_inner + int64_t(h) * P + e % P;
          zv[u] = p.zx[(int64_t(b) * d.L + c0 + e / P) * d.din + int64_t(h) * P + e % P];
          dv[u] = kBwd ? p.dO[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kLoadsAhead; ++u) {
          const int e = e0 + u * kChunkThreads;
          if (e >= total) break;
          const int j = e / P, q = e % P;
          const int64_t row = int64_t(b) * d.L + c0 + j;
          const float z = zv[u], dOq = dv[u];
          float dz = 0.0f;
          const float y = sY[j * ldP + q], yn = nw ? y * rstd[j] * nw[q] : y;
          const float sg = sigmoid_f(z), si = z * sg;
          const float o = yn * si;
          if (kBwd) {
            sDYN[j * ldP + q] = dOq * si;
            dz += dOq * yn * sg * (1.0f + z * (1.0f - sg));
          }
          p.o[row * d.d_inner + int64_t(h) * P + q] = o;
          if (kBwd) p.dzx[row * d.din + int64_t(h) * P + q] = dz;
        }
      }
    } else {  // MIMO: the ranks' partials gz/go per (r, q) sum over the tokens in order
      for (int q = tid; q < P; q += kChunkThreads) {
        for (int tl = 0; tl < Tc; ++tl) {
          const int64_t row = int64_t(b) * d.L + c0 + tl;
          const float z = p.zx[row * d.din + int64_t(h) * P + q];
          const float dOq = kBwd ? p.dO[row * d.d_inner + int64_t(h) * P + q] : 0.0f;
          float o = 0.0f, dz = 0.0f;
          for (int r = 0; r < R; ++r) {
            const int j = tl * R + r;
            const float y = sY[j * ldP + q], yn = nw ? y * rstd[j] * nw[q] : y;
            const int64_t i = (int64_t(h) * R + r) * P + q;
            const MimoGate mg = mimo_gate(yn, z, p.mimo_z[i], p.mimo_o[i], dOq, false);
            o += mg.o;
            if (kBwd) {
              go[r * P + q] += mg.go;
              sDYN[j * ldP + q] = mg.dyn;
              gz[r * P + q] += mg.gz;
              dz += mg.dz;
            }
          }
          p.o[row * d.d_inner + int64_t(h) * P + q] = o;
          if (kBwd) p.dzx[row * d.din + int64_t(h) * P + q] = dz;
        }
      }
    }
    if (kBwd) {
      __syncthreads();
      // The output norm's backward: dy = rstd·(dyn ⊙ w − x̂·mean(dyn ⊙ w ⊙ x̂)), x̂ = y·rstd.
      if (nw)
        for (int j = warp; j < rows; j += kWarps) {
          float m = 0.0f;
          for (int q = lane; q < P; q += 32) m += sDYN[j * ldP + q] * nw[q] * (sY[j * ldP + q] * rstd[j]);
          m = warp_sum(m);
          if (lane == 0) mean[j] = m / float(P);
        }
      __syncthreads();
      for (int q = tid; q < P; q += kChunkThreads)
        for (int j = 0; j < rows; ++j) {
          const float dyn = sDYN[j * ldP + q];
          float v = dyn;
          if (nw) {
            const float xh = sY[j * ldP + q] * rstd[j];
            gn[q] += dyn * xh;
            v = rstd[j] * (dyn * nw[q] - xh * mean[j]);
          }
          p.dy[((bh * d.L + c0) * R + j) * P + q] = v;
          if (kPar) sDYN[j * ldP + q] = v;  // column q is this thread's: dy for the dH contribution below
        }
      if (kPar && ci > 0) {  // chunk 0's contribution would only reach the (unused) dH before the sequence
        __syncthreads();
        float* out = p.dHc + (bh * chunks + ci - 1) * P * N;
        if constexpr (kTC) tc::state_outer(rows, R, P, N, sDYN, ldP, eL, sQ, ldN, out, N, warp, lane);
        else state_outer_f32(rows, R, P, N, sDYN, ldP, eL, sQ, ldN, out, N);
      }
    }
    __syncthreads();  // the next chunk overwrites the tiles
  }

  if (kBwd) {
    if (d.mimo)
      for (int e = tid; e < R * P; e += kChunkThreads) {
        p.part_mimo_z[prow * R * P + e] = gz[e];
        p.part_mimo_o[prow * R * P + e] = go[e];
      }
    if (nw)
      for (int q = tid; q < P; q += kChunkThreads) p.part_norm[prow * P + q] = gn[q];
  }
}

// The entry points of the forward body. A second __launch_bounds__ argument of 1 is not the same as none (nvcc 13
// then allocates up to 50 % more registers), so the one-block entry keeps the plain bound.
template <bool kBwd, bool kTC, bool kPar>
__global__ void __launch_bounds__(kChunkThreads) chunk_forward_kernel(const ChunkParams p) {
  pdl_wait();
  chunk_forward_body<kBwd, kTC, kPar>(p);
}
template <bool kBwd, bool kTC>
__global__ void __launch_bounds__(kChunkThreads, 2) chunk_forward_kernel_2blk(const ChunkParams p) {
  pdl_wait();
  chunk_forward_body<kBwd, kTC, true>(p);
}

// Reverse over chunks for one (b, h) = blockIdx.x, carrying dH (P×N). Per chunk of rows = T·R: scores and their
// gradient r²·(N + P), dV/dQ/dK r²·(P + 2N) + 8·r·P·N, dH 2·r·P·N FLOPs (causal halves counted), i.e.
// ≈ R·(2·T·R·(N + P) + 10·P·N) per token and head; traffic per token and head ≈ 2·R·N + P + R·P reads (zx, dy)
// + P·N per chunk (H_c), and 2·R·N (dB̂, dĈ) + P + S + 3 writes. Products as in the forward: kTile×kTile register
// tiles, diagonal score tiles formed whole.
// kTC (bf16 mode, chunk path "tc"): the products on tensor cores (mamba3_train_chunk_tc.cuh: m16n8k16 bf16 × bf16 →
// f32, 16×8 output tiles dealt to the 8 warps, fragments formed from the same f32 tiles, dH accumulated in f32). Per
// chunk of 64 rows (N 128, P 64): 1920 mma = 7.9 MFLOP (scores + dW 240, dV/T1/T2 592, dQ/dK 832, dH 256); the
// shared-memory layout, the traffic above and every epilogue are the f32 path's.
// kPar (the chunk-parallel schedule): one block per (b, h, chunk) = blockIdx.x (chunk fastest) starting from the dH
// entering the chunk (dHc, from the reverse scan), without the dH update; its parameter partials are per chunk.
// Nothing else is carried across chunks: Λ restarts at every chunk (the chunk's e^{Λ_last} reaches earlier chunks
// only through dH and the dΛ_last·(dH ⊙ H_c) term, both local once dH is known), and dadt's suffix sum is per chunk.
// Two entry points as for the forward body: chunk_reverse_kernel (__launch_bounds__(256)) and the parallel
// schedule's chunk_reverse_kernel_2blk (__launch_bounds__(256, 2); ChunkParams::rev_blocks).
template <bool kTC, bool kPar>
__device__ __forceinline__ void chunk_reverse_body(const ChunkParams& p) {
  extern __shared__ float sm[];
  const MixerDims& d = p.d;
  const RevLayout lay(d, p.T);
  const int ldN = lay.ldN, ldP = lay.ldP, ldR = lay.ldR, P = d.P, N = d.N, R = d.R, S = d.S, T = p.T;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int chunks = (d.L + T - 1) / T;
  const int64_t bh = kPar ? blockIdx.x / chunks : blockIdx.x;
  const int b = int(bh / d.H), h = int(bh % d.H);
  const int c_begin = kPar ? int(blockIdx.x % chunks) : 0, c_end = kPar ? c_begin + 1 : chunks;
  float *sQ = sm + lay.Q, *sK = sm + lay.K, *dQ = sm + lay.dQ, *dK = sm + lay.dK;
  float *sV = sm + lay.V, *dY = sm + lay.dY, *dV = sm + lay.dV, *T1 = sm + lay.T1, *T2 = sm + lay.T2;
  float *Sm = sm + lay.Sm, *dW = sm + lay.dW, *sE = sm + lay.E, *Hc = sm + lay.Hc, *dH = sm + lay.dH;
  float *Lam = sm + lay.vec, *scale = Lam + T, *gam = scale + T, *eL = gam + T, *e2 = eL + T, *dLam = e2 + T;
  float *dLamHc = dLam + T, *dws = dLamHc + T * R, *red = sm + lay.red;
  float *gB = sm + lay.gB, *gC = sm + lay.gC, *gX = sm + lay.gX;
  const float Dh = p.D[h];
  float dD = 0.0f;  // this thread's share of Σ dy ⊙ v (fixed element set per thread)

  // The dH entering the chunk from the reverse scan (parallel), or zero after the sequence's last token.
  if (kPar) {
    load_tile(dH, ldN, p.dHc + (bh * chunks + c_begin) * P * N, N, P, N);
  } else {
    for (int e = tid; e < P * N; e += kChunkThreads) dH[(e / N) * ldN + e % N] = 0.0f;
  }
  for (int e = tid; e < R * N; e += kChunkThreads) gB[e] = 0.0f, gC[e] = 0.0f;
  for (int e = tid; e < R * P; e += kChunkThreads) gX[e] = 0.0f;
  __syncthreads();

  for (int ci = c_end - 1; ci >= c_begin; --ci) {
    const int c0 = ci * T, Tc = min(T, d.L - c0), rows = Tc * R;
    build_chunk(p, bh, b, h, c0, Tc, sQ, sK, sV, ldN, ldP);
    load_tile(dY, ldP, p.dy + ((bh * d.L + c0) * R) * P, P, rows, P);
    load_tile(Hc, ldN, p.Hc + (bh * chunks + ci) * P * N, N, P, N);
    chunk_scalars(p, bh, c0, Tc, Lam, scale, gam, eL);
    for (int tl = tid; tl < Tc; tl += kChunkThreads) e2[tl] = expf(Lam[Tc - 1] - Lam[tl]);
    __syncthreads();
    [[maybe_unused]] const tc::Tiles tt{rows, R, N, P, ldN, ldP, ldR, sQ, sK, sV, Lam, scale, gam, eL, Dh};
    [[maybe_unused]] const tc::RevTiles tr{dY, Hc, dH, Sm, dW, sE, dV, T1, T2, dQ, dK, e2};

    // Scores S = q·kᵀ and dW = dy·vᵀ; E = d loss/d coef without scale (→ Λ, scale, γ); Sm ← W, dW ← dS. The f32 path
    // also forms T1 = q·H_cᵀ and T2 = k·dHᵀ here (they need only the loaded tiles), on the threads that the score
    // tiles (about half of them causal) leave idle: one barrier interval of balanced work instead of two uneven ones.
    [[maybe_unused]] const int rt = (rows + kTile - 1) / kTile, pt = (P + kTile - 1) / kTile,
                               nt = (N + kTile - 1) / kTile;
    if constexpr (kTC) {
      tc::rev_scores(tt, tr, warp, lane);
    } else {
      for (int it = tid; it < rt * rt + 2 * rt * pt; it += kChunkThreads) {
        if (it >= rt * rt) {  // T1 (first rt·pt items) or T2 tile
          const int u = it - rt * rt, t = u % (rt * pt);
          const bool second = u >= rt * pt;
          const float *X = second ? sK : sQ, *Y = second ? dH : Hc;
          float* out = second ? T2 : T1;
          const int j0 = (t / pt) * kTile, q0 = t % pt;
          int jr[kTile], qc[kTile];
#pragma unroll
          for (int a = 0; a < kTile; ++a) jr[a] = min(j0 + a, rows - 1), qc[a] = min(q0 + a * pt, P - 1);
          float acc[kTile][kTile] = {};
          for (int n = 0; n < N; ++n) {
            float x[kTile], y[kTile];
#pragma unroll
            for (int a = 0; a < kTile; ++a) x[a] = X[jr[a] * ldN + n], y[a] = Y[qc[a] * ldN + n];
#pragma unroll
            for (int a = 0; a < kTile; ++a)
#pragma unroll
              for (int c = 0; c < kTile; ++c) acc[a][c] += x[a] * y[c];
          }
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) {
              const int j = j0 + a, q = q0 + c * pt;
              if (j < rows && q < P) out[j * ldP + q] = acc[a][c];
            }
          continue;
        }
        const int j0 = (it / rt) * kTile, k0 = (it % rt) * kTile;
        float as[kTile][kTile] = {}, adw[kTile][kTile] = {};
        if (k0 / R <= min(j0 + kTile - 1, rows - 1) / R) {  // else the tile lies wholly above the causal diagonal
          int jr[kTile], kr[kTile];
#pragma unroll
          for (int a = 0; a < kTile; ++a) jr[a] = min(j0 + a, rows - 1), kr[a] = min(k0 + a, rows - 1);
          for (int n = 0; n < N; ++n) {
            float x[kTile], y[kTile];
#pragma unroll
            for (int a = 0; a < kTile; ++a) x[a] = sQ[jr[a] * ldN + n], y[a] = sK[kr[a] * ldN + n];
#pragma unroll
            for (int a = 0; a < kTile; ++a)
#pragma unroll
              for (int c = 0; c < kTile; ++c) as[a][c] += x[a] * y[c];
          }
          for (int q = 0; q < P; ++q) {
            float x[kTile], y[kTile];
#pragma unroll
            for (int a = 0; a < kTile; ++a) x[a] = dY[jr[a] * ldP + q], y[a] = sV[kr[a] * ldP + q];
#pragma unroll
            for (int a = 0; a < kTile; ++a)
#pragma unroll
              for (int c = 0; c < kTile; ++c) adw[a][c] += x[a] * y[c];
          }
        }
#pragma unroll
        for (int a = 0; a < kTile; ++a)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            const int j = j0 + a, jj = k0 + c;
            if (j >= rows || jj >= rows) continue;
            const int tl = j / R, sl = jj / R;
            float s = 0.0f, dw = 0.0f, cf = 0.0f, ge = 0.0f;
            if (sl <= tl) {
              s = as[a][c], dw = adw[a][c];
              if (sl < tl) {
                const float ex = expf(Lam[tl] - Lam[sl]);
                cf = ex * scale[sl];
                ge = dw * s * ex;
              } else {
                cf = gam[tl];
                ge = dw * s;
              }
            }
            Sm[j * ldR + jj] = s * cf;
            dW[j * ldR + jj] = dw * cf;
            sE[j * ldR + jj] = ge;
          }
      }
    }
    __syncthreads();

    // dV = Wᵀ·dy + D·dy + w ⊙ T2; dQ = dS·k + e^Λ ⊙ (dy·H_c); dK = dSᵀ·q + w ⊙ (v·dH) (the tensor-core path also
    // forms T1 and T2 here). f32: the dV tiles, then dQ and dK tiles as separate items (704 at 42 rows) so that every
    // thread gets 2–3 of them after its dV tile.
    if constexpr (kTC) {
      tc::rev_dv_dq_dk(tt, tr, warp, lane);
    } else {
      for (int t = tid; t < rt * pt; t += kChunkThreads) {
        const int j0 = (t / pt) * kTile, q0 = t % pt;
        int jr[kTile], qc[kTile], beg[kTile];
#pragma unroll
        for (int a = 0; a < kTile; ++a) jr[a] = min(j0 + a, rows - 1), beg[a] = (jr[a] / R) * R, qc[a] = min(q0 + a * pt, P - 1);
        float acc[kTile][kTile] = {};
        for (int jj = beg[0]; jj < rows; ++jj) {  // beg[] grows with the row
          float v[kTile];
#pragma unroll
          for (int c = 0; c < kTile; ++c) v[c] = dY[jj * ldP + qc[c]];
#pragma unroll
          for (int a = 0; a < kTile; ++a)
            if (jj >= beg[a]) {
              const float w = Sm[jj * ldR + jr[a]];
#pragma unroll
              for (int c = 0; c < kTile; ++c) acc[a][c] += w * v[c];
            }
        }
#pragma unroll
        for (int a = 0; a < kTile; ++a)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            const int j = j0 + a, q = q0 + c * pt, tl = j / R;
            if (j >= rows || q >= P) continue;
            const float dy = dY[j * ldP + q];
            dV[j * ldP + q] = acc[a][c] + Dh * dy + e2[tl] * scale[tl] * T2[j * ldP + q];
          }
      }
      for (int it = tid; it < 2 * rt * nt; it += kChunkThreads) {
        const bool isK = it >= rt * nt;
        const int t = isK ? it - rt * nt : it;
        const int j0 = (t / nt) * kTile, n0 = t % nt;
        int jr[kTile], nc[kTile], beg[kTile];
#pragma unroll
        for (int a = 0; a < kTile; ++a) jr[a] = min(j0 + a, rows - 1), beg[a] = (jr[a] / R) * R, nc[a] = min(n0 + a * nt, N - 1);
        if (!isK) {
          float aq[kTile][kTile] = {}, bq[kTile][kTile] = {};
          for (int jj = 0; jj < beg[kTile - 1] + R; ++jj) {  // row a sums jj < beg[a] + R
            float y[kTile];
#pragma unroll
            for (int c = 0; c < kTile; ++c) y[c] = sK[jj * ldN + nc[c]];
#pragma unroll
            for (int a = 0; a < kTile; ++a)
              if (jj < beg[a] + R) {
                const float w = dW[jr[a] * ldR + jj];
#pragma unroll
                for (int c = 0; c < kTile; ++c) aq[a][c] += w * y[c];
              }
          }
          for (int q = 0; q < P; ++q) {
            float x[kTile], y[kTile];
#pragma unroll
            for (int a = 0; a < kTile; ++a) x[a] = dY[jr[a] * ldP + q], y[a] = Hc[q * ldN + nc[a]];
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) bq[a][c] += x[a] * y[c];
          }
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) {
              const int j = j0 + a, n = n0 + c * nt;
              if (j < rows && n < N) dQ[j * ldN + n] = aq[a][c] + eL[j / R] * bq[a][c];
            }
        } else {
          float ak[kTile][kTile] = {}, bk[kTile][kTile] = {};
          for (int jj = beg[0]; jj < rows; ++jj) {
            float y[kTile];
#pragma unroll
            for (int c = 0; c < kTile; ++c) y[c] = sQ[jj * ldN + nc[c]];
#pragma unroll
            for (int a = 0; a < kTile; ++a)
              if (jj >= beg[a]) {
                const float w = dW[jj * ldR + jr[a]];
#pragma unroll
                for (int c = 0; c < kTile; ++c) ak[a][c] += w * y[c];
              }
          }
          for (int q = 0; q < P; ++q) {
            float x[kTile], y[kTile];
#pragma unroll
            for (int a = 0; a < kTile; ++a) x[a] = sV[jr[a] * ldP + q], y[a] = dH[q * ldN + nc[a]];
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) bk[a][c] += x[a] * y[c];
          }
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) {
              const int j = j0 + a, n = n0 + c * nt, tl = j / R;
              if (j < rows && n < N) dK[j * ldN + n] = ak[a][c] + e2[tl] * scale[tl] * bk[a][c];
            }
        }
      }
    }
    for (int e = tid; e < rows * P; e += kChunkThreads) dD += dY[(e / P) * ldP + e % P] * sV[(e / P) * ldP + e % P];
    {
      float dot = 0.0f;
      for (int e = tid; e < P * N; e += kChunkThreads) dot += dH[(e / N) * ldN + e % N] * Hc[(e / N) * ldN + e % N];
      dot = warp_sum(dot);
      if (lane == 0) red[warp] = dot;
    }
    __syncthreads();

    // Row sums for dΛ (read of H_c) and dw (state carried out); dH ← e^{Λ_last}·dH + (e^Λ ⊙ dy)ᵀ·q (sequential
    // schedule only: the parallel one has the dH of every chunk from the scan).
    for (int j = warp; j < rows; j += kWarps) {
      float a = 0.0f, c = 0.0f;
      for (int q = lane; q < P; q += 32) a += dY[j * ldP + q] * T1[j * ldP + q], c += sV[j * ldP + q] * T2[j * ldP + q];
      a = warp_sum(a), c = warp_sum(c);
      if (lane == 0) dLamHc[j] = eL[j / R] * a, dws[j] = c;
    }
    const float elast = eL[Tc - 1];
    if constexpr (kPar) {
      // nothing: the dH entering every chunk comes from the reverse scan
    } else if constexpr (kTC) {
      tc::rev_dstate(tt, tr, elast, warp, lane);
    } else {
      for (int t = tid; t < pt * nt; t += kChunkThreads) {
        const int q0 = (t / nt) * kTile, n0 = t % nt;
        int qc[kTile], nc[kTile];
#pragma unroll
        for (int a = 0; a < kTile; ++a) qc[a] = min(q0 + a, P - 1), nc[a] = min(n0 + a * nt, N - 1);
        float acc[kTile][kTile] = {};
        for (int j = 0; j < rows; ++j) {
          const float ej = eL[j / R];
          float x[kTile], y[kTile];
#pragma unroll
          for (int a = 0; a < kTile; ++a) x[a] = ej * dY[j * ldP + qc[a]], y[a] = sQ[j * ldN + nc[a]];
#pragma unroll
          for (int a = 0; a < kTile; ++a)
#pragma unroll
            for (int c = 0; c < kTile; ++c) acc[a][c] += x[a] * y[c];
        }
#pragma unroll
        for (int a = 0; a < kTile; ++a)
#pragma unroll
          for (int c = 0; c < kTile; ++c) {
            const int q = q0 + a, n = n0 + c * nt;
            if (q < P && n < N) dH[q * ldN + n] = elast * dH[q * ldN + n] + acc[a][c];
          }
      }
    }
    if (tid == 0) {
      float s = 0.0f;
      for (int w = 0; w < kWarps; ++w) s += red[w];
      red[kWarps] = s;
    }
    // H_c's tile is dead from here (its readers are behind the barrier above): the chunk's cos/sin and x go there for
    // the per-token loops below, which would otherwise wait on a global load per token.
    float *sCS = Hc, *sSN = Hc + Tc * S, *sX = Hc + 2 * Tc * S;
    const bool staged = 2 * Tc * S + Tc * P <= P * ldN;
    if (staged) {
      for (int e = tid; e < Tc * S; e += kChunkThreads) {
        const float2 r = rotary_cos_sin(p.phi[(bh * d.L + c0) * S + e]);
        sCS[e] = r.x, sSN[e] = r.y;
      }
      if (d.mimo) load_tile(sX, P, p.zx + (int64_t(b) * d.L + c0) * d.din + d.off_x + int64_t(h) * P, d.din, Tc, P);
    }
    __syncthreads();

    // Per token: dΛ, dscale, dγ (rows and columns of E in a fixed order).
    for (int tl = tid; tl < Tc; tl += kChunkThreads) {
      float dl = 0.0f, dsc = 0.0f, dg = 0.0f, dwt = 0.0f;
      for (int r = 0; r < R; ++r) {
        const int j = tl * R + r;
        dl += dLamHc[j];
        dwt += dws[j];
        for (int jj = 0; jj < tl * R; ++jj) dl += sE[j * ldR + jj] * scale[jj / R];
        for (int jj = tl * R; jj < tl * R + R; ++jj) dg += sE[j * ldR + jj];
      }
      for (int r = 0; r < R; ++r)
        for (int j = (tl + 1) * R; j < rows; ++j) {
          const float v = sE[j * ldR + tl * R + r];
          dl -= v * scale[tl];
          dsc += v;
        }
      dl -= dwt * e2[tl] * scale[tl];
      dsc += dwt * e2[tl];
      if (tl == Tc - 1) {
        float carry = 0.0f;
        for (int sl = 0; sl < Tc; ++sl) {
          float w = 0.0f;
          for (int r = 0; r < R; ++r) w += dws[sl * R + r];
          carry += w * e2[sl] * scale[sl];
        }
        dl += carry + elast * red[kWarps];
      }
      dLam[tl] = dl;
      p.dgam[bh * d.L + c0 + tl] = dg;
      p.dscale[bh * d.L + c0 + tl] = dsc;
    }
    // Back through the rotation and bias: dĈ/dB̂ per head (group sums come later), bias partials per (r, n).
    for (int e = tid; e < R * N; e += kChunkThreads) {
      const int r = e / N, n = e % N;
      for (int tl = 0; tl < Tc; ++tl) {
        const int j = tl * R + r;
        const int64_t st = bh * d.L + c0 + tl, row = int64_t(b) * d.L + c0 + tl;
        int i, a, bb;
        float cs = 1.0f, sn = 0.0f;
        if (rotary_pair(n, N, S, d.mimo, i, a, bb)) {
          if (staged) {
            cs = sCS[tl * S + i], sn = sSN[tl * S + i];
          } else {
            const float2 r = rotary_cos_sin(p.phi[st * S + i]);
            cs = r.x, sn = r.y;
          }
        }
        const float gq = unrotate_at(dQ + j * ldN, cs, sn, n, N, S, d.mimo);
        const float gk = unrotate_at(dK + j * ldN, cs, sn, n, N, S, d.mimo);
        const int64_t dst = ((row * d.H + h) * R + r) * N + n;
        p.dCn[dst] = gq;
        p.dBn[dst] = gk;
        gC[e] += gq;
        gB[e] += gk;
      }
    }
    // The per-token angle gradient (its reverse cumulative sum runs in the angle backward kernel).
    for (int e = tid; e < Tc * S; e += kChunkThreads) {
      const int tl = e / S, i = e % S, a = d.mimo ? i : 2 * i, bb = d.mimo ? i + N / 2 : 2 * i + 1;
      float acc = 0.0f;
      for (int r = 0; r < R; ++r) {
        const int j = tl * R + r;
        acc += dQ[j * ldN + bb] * sQ[j * ldN + a] - dQ[j * ldN + a] * sQ[j * ldN + bb];
        acc += dK[j * ldN + bb] * sK[j * ldN + a] - dK[j * ldN + a] * sK[j * ldN + bb];
      }
      p.dphi[(bh * d.L + c0 + tl) * S + i] = acc;
    }
    // x's gradient (ranks summed), a thread per (token, q); then the mimo_x partials per (r, q), tokens in order.
    for (int e = tid; e < Tc * P; e += kChunkThreads) {
      const int tl = e / P, q = e % P;
      float acc = 0.0f;
      for (int r = 0; r < R; ++r) {
        const float dv = dV[(tl * R + r) * ldP + q];
        if (d.mimo) acc += dv * p.mimo_x[(int64_t(h) * R + r) * P + q];
        else acc += dv;
      }
      p.dzx[(int64_t(b) * d.L + c0 + tl) * d.din + d.off_x + int64_t(h) * P + q] = acc;
    }
    if (d.mimo)
      for (int e = tid; e < R * P; e += kChunkThreads) {
        const int r = e / P, q = e % P;
        for (int tl = 0; tl < Tc; ++tl) {
          const float x = staged ? sX[tl * P + q]
                                 : p.zx[(int64_t(b) * d.L + c0 + tl) * d.din + d.off_x + int64_t(h) * P + q];
          gX[e] += dV[(tl * R + r) * ldP + q] * x;
        }
      }
    __syncthreads();
    // Λ_t = Σ_{j ≤ t in chunk} A_j·Δ_j: d(A·Δ)_t is dΛ's reverse prefix sum.
    if (tid == 0) {
      float run = 0.0f;
      for (int tl = Tc - 1; tl >= 0; --tl) run += dLam[tl], p.dadt[bh * d.L + c0 + tl] = run;
    }
    // The next chunk's loads touch no tile read above (dLam is rewritten only after two more barriers).
  }

  const int64_t prow = kPar ? (int64_t(b) * chunks + c_begin) * d.H + h : bh;  // parameter partials' row
  for (int e = tid; e < R * N; e += kChunkThreads) {
    p.part_B_bias[prow * R * N + e] = gB[e];
    p.part_C_bias[prow * R * N + e] = gC[e];
  }
  if (d.mimo)
    for (int e = tid; e < R * P; e += kChunkThreads) p.part_mimo_x[prow * R * P + e] = gX[e];
  dD = warp_sum(dD);
  __syncthreads();  // red's last readers are done
  if (lane == 0) red[warp] = dD;
  __syncthreads();
  if (tid == 0) {
    float s = 0.0f;
    for (int w = 0; w < kWarps; ++w) s += red[w];
    p.part_D[prow] = s;
  }
}

// The entry points of the reverse body (see the forward's). The one-block entry takes the bound (256, 1): with the plain
// bound ptxas capped the f32 reverse at 128 registers and spilled (~160 bytes); with it, 178 registers and no spills —
// the tiles allow one block per SM anyway.
template <bool kTC, bool kPar>
__global__ void __launch_bounds__(kChunkThreads, 1) chunk_reverse_kernel(const ChunkParams p) {
  pdl_wait();
  chunk_reverse_body<kTC, kPar>(p);
}
template <bool kTC>
__global__ void __launch_bounds__(kChunkThreads, 2) chunk_reverse_kernel_2blk(const ChunkParams p) {
  pdl_wait();
  chunk_reverse_body<kTC, true>(p);
}

#ifndef MAMBA3_CHUNK_HOST_EMULATION
int chunk_count(const ChunkParams& p) { return (p.d.L + p.T - 1) / p.T; }

// One block per (b, h) (sequential schedule) or per (b, h, chunk) (parallel). two_blocks: a __launch_bounds__(256, 2)
// variant, launched with the shared-memory carveout preferred at its maximum so that two blocks' tiles fit an SM (a
// hint; the register allocation already allows two).
template <typename Kernel>
void launch_with_smem(Kernel kernel, cudaStream_t s, const ChunkParams& p, size_t bytes, bool per_chunk,
                      bool two_blocks = false) {
  const int64_t blocks = int64_t(p.d.B) * p.d.H * (per_chunk ? chunk_count(p) : 1);
  MAMBA3_CHECK(blocks <= 0x7fffffff, "chunk kernels: {} blocks exceed the grid", blocks);
  MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  if (two_blocks)
    MAMBA3_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared)));
  launch_train(kernel, unsigned(blocks), kChunkThreads, bytes, s, p);
  MAMBA3_LAUNCH_CHECK();
}

// The parallel schedule's per-chunk kernels in the variant ChunkParams::fwd_blocks / rev_blocks names.
void check_blocks(int blocks) {
  MAMBA3_CHECK(blocks == 1 || blocks == 2, "chunk kernels: {} resident blocks per SM (1 or 2 expected)", blocks);
}

template <bool kBwd, bool kTC>
void launch_forward_parallel(cudaStream_t s, const ChunkParams& p, size_t bytes) {
  check_blocks(p.fwd_blocks);
  if (p.fwd_blocks == 2) launch_with_smem(chunk_forward_kernel_2blk<kBwd, kTC>, s, p, bytes, true, true);
  else launch_with_smem(chunk_forward_kernel<kBwd, kTC, true>, s, p, bytes, true);
}

template <bool kTC>
void launch_reverse_parallel(cudaStream_t s, const ChunkParams& p, size_t bytes) {
  check_blocks(p.rev_blocks);
  if (p.rev_blocks == 2) launch_with_smem(chunk_reverse_kernel_2blk<kTC>, s, p, bytes, true, true);
  else launch_with_smem(chunk_reverse_kernel<kTC, true>, s, p, bytes, true);
}

void launch_chunk_scan(cudaStream_t s, const ChunkParams& p, float* S, bool reverse) {
  launch_state_scan(s, S, p.decay, int64_t(p.d.B) * p.d.H, chunk_count(p), p.d.P * p.d.N, reverse);
}
#endif

}  // namespace

#ifndef MAMBA3_CHUNK_HOST_EMULATION
void launch_state_scan(cudaStream_t s, float* S, const float* decay, int64_t BH, int chunks, int PN, bool reverse,
                       uint16_t* copy16, bool write_f32) {
  MAMBA3_CHECK(write_f32 || copy16, "state scan: no output (neither f32 nor the bf16 copy)");
  const int64_t n = BH * PN;
  constexpr int kThreads = 256;
  launch_train(chunk_scan_kernel, unsigned((n + kThreads - 1) / kThreads), kThreads, 0, s, S, decay, BH, chunks, PN,
               reverse, copy16, write_f32);
  MAMBA3_LAUNCH_CHECK();
}
#endif

size_t chunk_forward_smem_bytes(const MixerDims& d, int T, bool backward, bool parallel) {
  return size_t(FwdLayout(d, T, backward, parallel).total) * sizeof(float);
}

size_t chunk_reverse_smem_bytes(const MixerDims& d, int T) { return size_t(RevLayout(d, T).total) * sizeof(float); }

size_t chunk_state_smem_bytes(const MixerDims& d, int T) { return size_t(StateLayout(d, T).total) * sizeof(float); }

#ifndef MAMBA3_CHUNK_HOST_EMULATION
void launch_chunk_forward(cudaStream_t s, const ChunkParams& p, bool backward) {
  const size_t bytes = chunk_forward_smem_bytes(p.d, p.T, backward, p.parallel);
  if (!p.parallel) {
    if (backward) {
      if (p.tc) launch_with_smem(chunk_forward_kernel<true, true, false>, s, p, bytes, false);
      else launch_with_smem(chunk_forward_kernel<true, false, false>, s, p, bytes, false);
    } else {
      if (p.tc) launch_with_smem(chunk_forward_kernel<false, true, false>, s, p, bytes, false);
      else launch_with_smem(chunk_forward_kernel<false, false, false>, s, p, bytes, false);
    }
    return;
  }
  MAMBA3_CHECK(p.Hc && p.decay && (!backward || p.dHc), "launch_chunk_forward: the parallel schedule needs Hc, decay{}",
               backward ? " and dHc" : "");
  const size_t state_bytes = chunk_state_smem_bytes(p.d, p.T);
  if (p.tc) launch_with_smem(chunk_state_kernel<true>, s, p, state_bytes, true);
  else launch_with_smem(chunk_state_kernel<false>, s, p, state_bytes, true);
  launch_chunk_scan(s, p, p.Hc, false);
  if (backward) {
    if (p.tc) launch_forward_parallel<true, true>(s, p, bytes);
    else launch_forward_parallel<true, false>(s, p, bytes);
  } else {
    if (p.tc) launch_forward_parallel<false, true>(s, p, bytes);
    else launch_forward_parallel<false, false>(s, p, bytes);
  }
}

void launch_chunk_reverse(cudaStream_t s, const ChunkParams& p) {
  const size_t bytes = chunk_reverse_smem_bytes(p.d, p.T);
  if (!p.parallel) {
    if (p.tc) launch_with_smem(chunk_reverse_kernel<true, false>, s, p, bytes, false);
    else launch_with_smem(chunk_reverse_kernel<false, false>, s, p, bytes, false);
    return;
  }
  MAMBA3_CHECK(p.dHc && p.decay, "launch_chunk_reverse: the parallel schedule needs dHc and decay");
  launch_chunk_scan(s, p, p.dHc, true);
  if (p.tc) launch_reverse_parallel<true>(s, p, bytes);
  else launch_reverse_parallel<false>(s, p, bytes);
}
#endif

}  // namespace mamba3::cuda::train_detail
