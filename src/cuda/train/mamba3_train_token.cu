// Per-token kernels of the Mamba-3 mixer's GPU training pass: B/C normalisation, the scalars of spec §2.2, the angle
// scan, and on the way back the angle/scalar gradients, the B/C RMSNorm backward and deterministic column sums.
// All f32 with the CPU's formulas (src/ops/mamba3_common.h, mamba3_scan_backward.cpp).
#include <cuda_bf16.h>

#include <algorithm>

#include "cuda/cuda_check.h"
#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/train/mamba3_train_angles.cuh"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_math.cuh"

namespace mamba3::cuda::train_detail {

namespace {

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// v rounded to bf16 (nearest even), as bits: dzx's copy for the bf16 mode's in_proj products (TrainGemm's rounding).
__device__ __forceinline__ uint16_t bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// In place, a warp per (row, vector) — the (which, r, g) vectors of every row in order, 8 per block (one block per row
// had left 6 of its 8 warps idle at G = 1: 16.8 µs per 125M call): the raw vector is saved to bc_raw (M, 2·R·G·N: B's
// vectors then C's, as in zx) for the backward, then normalised in zx. Reads 2·R·G·N, writes 4·R·G·N floats per row
// (copying all din columns into a second buffer had cost 0.12 ms per layer call at 125M).
// bc_unrot (optional): the normalised coordinates [N/2, N) of every vector once more, (M, 2·R·G, N/2) — a compact copy
// for the readers that form q's and k's unrotated half from them (BatchedParams::bc_unrot).
__global__ void normalize_bc_kernel(MixerDims d, float* __restrict__ zx, const float* __restrict__ B_norm,
                                    const float* __restrict__ C_norm, float* __restrict__ bc_raw,
                                    float* __restrict__ bc_unrot) {
  pdl_wait();
  const int RG = d.R * d.G, lane = threadIdx.x % 32;
  const int64_t job = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (job >= int64_t(d.B) * d.L * 2 * RG) return;  // (whole warps)
  const int64_t m = job / (2 * RG);
  const int item = int(job % (2 * RG));
  float* v = zx + m * d.din + d.off_B + int64_t(item) * d.N;  // C's vectors follow B's in zx
  float* raw = bc_raw + (m * 2 * RG + item) * d.N;
  const float* w = item < RG ? B_norm : C_norm;
  float ss = 0;
  for (int n = lane; n < d.N; n += 32) ss += v[n] * v[n];
  const float r = 1.0f / sqrtf(warp_sum(ss) / float(d.N) + kEps);
  const int NR = d.N / 2;
  float* unrot = bc_unrot ? bc_unrot + (m * 2 * RG + item) * (d.N - NR) - NR : nullptr;
  for (int n = lane; n < d.N; n += 32) {
    const float x = v[n], y = x * r * w[n];
    raw[n] = x;
    v[n] = y;
    if (unrot && n >= NR) unrot[n] = y;
  }
}

// The token scalars of spec §2.2 for a tile of `tile` (≤ 32) tokens of one sequence and every head: the tile's dt,
// A and λ columns of zx (3·H per token row) read row by row into shared memory, then one thread per (head, token)
// with the tokens fastest, so that the (B·H, L) outputs are written in whole runs of tokens (a thread per (bh, t) had
// read three scattered floats of a different token row per thread: 12.1 µs per 125M call at 0.4 TB/s).
__global__ void token_scalars_kernel(MixerDims d, const float* __restrict__ zx, const float* __restrict__ dt_bias,
                                     TokenScalars out, int tile) {
  pdl_wait();
  extern __shared__ float cols[];  // (tile, 3·H): dt, A, λ columns of each token
  const int tiles = (d.L + tile - 1) / tile;
  const int b = int(blockIdx.x / tiles), t0 = int(blockIdx.x % tiles) * tile;
  const int nt = min(tile, d.L - t0), width = 3 * d.H;
  for (int k = threadIdx.x; k < nt * width; k += blockDim.x) {
    const int j = k / width, c = k % width;
    cols[j * width + c] = zx[(int64_t(b) * d.L + t0 + j) * d.din + d.off_dt + c];
  }
  __syncthreads();
  for (int k = threadIdx.x; k < d.H * tile; k += blockDim.x) {
    const int h = k / tile, j = k % tile;
    if (j >= nt) continue;
    const float* dd = cols + j * width;
    const int64_t e = (int64_t(b) * d.H + h) * d.L + t0 + j;
    const float arg = dd[h] + dt_bias[h], a = dd[d.H + h];
    float f, df;
    if (d.heavy_tail) {
      f = a >= 0 ? 1.0f + a : 1.0f / (1.0f - a);
      df = a >= 0 ? 1.0f : 1.0f / ((1.0f - a) * (1.0f - a));
    } else {
      f = softplus_f(a);
      df = a > 20.0f ? 1.0f : sigmoid_f(a);
    }
    out.dt[e] = softplus_f(arg);
    out.A[e] = fminf(-f, -d.A_floor);
    out.lam[e] = d.euler ? 1.0f : sigmoid_f(dd[2 * d.H + h]);
    out.dAdl[e] = -f > -d.A_floor ? 0.0f : -df;
    out.dsp[e] = arg > 20.0f ? 1.0f : sigmoid_f(arg);
  }
}

// The angle scan φ_t = wrap(φ_{t−1} + π·tanh(θ_t)·Δ_t) in two levels (a walk over all L tokens per (bh, i) ran 6144
// threads through 2048 dependent steps at 125M: 0.39 ms per call). One thread per (bh, segment, i) scans its
// segment of kAngleSegment tokens from 0 (wrapping at every step, the inputs of kAhead tokens loaded and tanh'd
// before their adds) into sn and leaves the segment's end in seg; one thread per (bh, i) turns those into each
// segment's starting angle (wrapped sums of the earlier ones); the elementwise pass adds it and wraps.
// φ is the sequential scan's up to rounding (the same sum mod 2π, grouped by segment).
constexpr int kAhead = 8;

// One segment's scan from 0 for angle i of task bh (sequence b): φ ← wrap(φ + π·tanh(θ_t)·Δ_t) for t in
// [t_begin, t_end), each φ handed to store(t − t_begin, φ); returns the segment's end. The inputs of the next kAhead
// tokens are loaded while the current kAhead tokens (tanh'd before their adds) take their steps. The split path's
// local kernel and the fused kernel both run this one body, so that their φ are the same bits.
template <typename Store>
__device__ __forceinline__ float angle_segment_scan(const MixerDims& d, const float* __restrict__ zx,
                                                    const float* __restrict__ dt, int64_t bh, int b, int i,
                                                    int t_begin, int t_end, Store store) {
  const float* z = zx + (int64_t(b) * d.L + t_begin) * d.din + d.off_ang + i;  // θ_i of token t_begin
  const float* v = dt + bh * d.L + t_begin;
  const int n = t_end - t_begin;
  float zr[kAhead], dr[kAhead];
#pragma unroll
  for (int k = 0; k < kAhead; ++k) {
    const int j = min(k, n - 1);
    zr[k] = d.no_rotary ? 0.0f : z[int64_t(j) * d.din];
    dr[k] = v[j];
  }
  float phi = 0;
  for (int j0 = 0; j0 < n; j0 += kAhead) {
    float th[kAhead], dv[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      th[k] = angle_rate(zr[k], d.no_rotary);
      dv[k] = dr[k];
    }
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {  // the next tokens' loads, in flight during these steps
      const int j = min(j0 + kAhead + k, n - 1);
      zr[k] = d.no_rotary ? 0.0f : z[int64_t(j) * d.din];
      dr[k] = v[j];
    }
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (j0 + k >= n) break;
      phi = angle_step(phi, th[k], dv[k], d.no_rotary);
      store(j0 + k, phi);
    }
  }
  return phi;
}

__global__ void angle_scan_local_kernel(MixerDims d, const float* __restrict__ zx, const float* __restrict__ dt,
                                        float* __restrict__ phi_out, float* __restrict__ seg) {
  pdl_wait();
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * nseg * d.S) return;
  const int i = int(e % d.S);
  const int64_t bs = e / d.S, bh = bs / nseg;
  const int sg = int(bs % nseg), b = int(bh / d.H), t_begin = sg * kAngleSegment;
  float* out = phi_out + (bh * d.L + t_begin) * d.S + i;
  seg[e] = angle_segment_scan(d, zx, dt, bh, b, i, t_begin, min(d.L, t_begin + kAngleSegment),
                              [&](int k, float v) { out[int64_t(k) * d.S] = v; });
}

__global__ void angle_scan_carry_kernel(MixerDims d, float* __restrict__ seg) {
  pdl_wait();
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * d.S) return;
  float* s = seg + (e / d.S) * nseg * d.S + e % d.S;
  float carry = 0;
  for (int sg = 0; sg < nseg; ++sg) {
    const float end = s[int64_t(sg) * d.S];
    s[int64_t(sg) * d.S] = carry;
    carry = wrap_angle(carry + end);
  }
}

// The scanned angles, one thread per (bh, t, i): the segment-local φ in phi plus its segment's start, wrapped.
__global__ void angle_finish_kernel(MixerDims d, const float* __restrict__ seg, float* __restrict__ phi) {
  pdl_wait();
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * d.L * d.S) return;
  const int64_t bht = e / d.S, bh = bht / d.L;
  const int t = int(bht % d.L), i = int(e % d.S);
  phi[e] = wrap_angle(phi[e] + seg[(bh * nseg + t / kAngleSegment) * d.S + i]);
}

// The angle scan in one kernel. The split path's finish pass reads and writes all of φ once more (200 MB per layer at
// 125M: B=8, L=2048, H=24, S=64) and its carry pass walks global memory; here one block per (bh, tile of kI angles)
// keeps the whole sequence's segment-local φ in shared memory. Phase 1: one thread per (segment, angle) scans its
// segment (angle_segment_scan, the split path's body) into shared memory and leaves the segment's end there. Phase 2:
// one thread per angle turns the ends into segment starts with the carry kernel's recurrence (start = carry; carry =
// wrap(carry + end), segments in order). Phase 3: each thread writes wrap(local + start) for its own (segment, angle),
// as the finish kernel does; a warp's store covers 32 / kI segments' rows of kI consecutive angles (whole 32-byte
// sectors: see launch_angles_fused for why kI ≥ 8). The same operations on the same values in the same order: φ is
// the split path's bit for bit (MAMBA3_TRAIN_ANGLES=split runs that path). Nothing writes the seg scratch (the
// forward never reads it; the backward fills its own).
// Shared memory: nseg segments of (kAngleSegment + 1) rows of kI floats (the padding row puts a warp's segments in
// different banks), then the ends and the starts, nseg·kI floats each: 68.6 KB at 125M (kI = 8). Bytes: writes φ
// once, 4·B·H·L·S (100 MB at 125M), and reads θ and Δ (4·L·(kI + 1) per block, 4·B·H·L·(S + S/kI) in all, mostly
// L2 hits: every head reads its sequence's θ); the split path writes φ, then reads and writes it again (300 MB).
// Measured on an H200 (standalone harness, 125M shapes): 91 µs against 215 µs for the three kernels.
constexpr int kFusedAngleThreads = 256;     // the (segment, angle) pairs a block aims at when kI > 8
constexpr int kFusedAngleMaxThreads = 512;  // and the most it may have
template <int kI>
__global__ void __launch_bounds__(kFusedAngleMaxThreads, 1)
    angle_scan_fused_kernel(MixerDims d, const float* __restrict__ zx, const float* __restrict__ dt,
                            float* __restrict__ phi_out) {
  pdl_wait();
  extern __shared__ float angle_sm[];
  constexpr int kSegFloats = (kAngleSegment + 1) * kI;
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  float* local = angle_sm;                   // (nseg, kAngleSegment + 1, kI): segment-local φ, a padding row each
  float* ends = local + nseg * kSegFloats;   // (nseg, kI)
  float* starts = ends + nseg * kI;          // (nseg, kI)
  const int tiles = (d.S + kI - 1) / kI;
  const int64_t bh = blockIdx.x / tiles;
  const int i0 = int(blockIdx.x % tiles) * kI, width = min(kI, d.S - i0), b = int(bh / d.H);

  const int sg = threadIdx.x / kI, c = threadIdx.x % kI;
  if (sg < nseg && c < width) {
    const int t_begin = sg * kAngleSegment;
    float* mine = local + sg * kSegFloats + c;
    ends[sg * kI + c] = angle_segment_scan(d, zx, dt, bh, b, i0 + c, t_begin, min(d.L, t_begin + kAngleSegment),
                                           [&](int k, float v) { mine[k * kI] = v; });
  }
  __syncthreads();

  if (threadIdx.x < width) {
    const int a = threadIdx.x;
    float carry = 0;
    for (int s0 = 0; s0 < nseg; s0 += kAhead) {
      float end[kAhead];
#pragma unroll
      for (int k = 0; k < kAhead; ++k) end[k] = ends[min(s0 + k, nseg - 1) * kI + a];
#pragma unroll
      for (int k = 0; k < kAhead; ++k) {
        if (s0 + k >= nseg) break;
        starts[(s0 + k) * kI + a] = carry;
        carry = wrap_angle(carry + end[k]);
      }
    }
  }
  __syncthreads();

  // Each thread writes its own (segment, angle): a warp's store covers 32 / kI segments' rows of kI consecutive
  // angles (whole 32-byte sectors for kI ≥ 8), with the shared reads at fixed offsets and no index arithmetic.
  if (sg < nseg && c < width) {
    const int t_begin = sg * kAngleSegment, n = min(kAngleSegment, d.L - t_begin);
    const float start = starts[sg * kI + c];
    const float* mine = local + sg * kSegFloats + c;
    float* out = phi_out + (bh * d.L + t_begin) * d.S + i0 + c;
    if (n == kAngleSegment) {
#pragma unroll 16
      for (int k = 0; k < kAngleSegment; ++k) out[int64_t(k) * d.S] = wrap_angle(mine[k * kI] + start);
    } else {
      for (int k = 0; k < n; ++k) out[int64_t(k) * d.S] = wrap_angle(mine[k * kI] + start);
    }
  }
}

// The angle backward, step 1: dΦ_t = Σ_{t' ≥ t} dφ_{t'}, in two levels so that the walks are short: one thread per
// (bh, segment, i) sums its segment of kAngleSegment tokens backwards in place (loads of kAhead tokens issued before
// their adds); the segments' totals come from launch_angle_totals (before, on the unsummed dφ: the order every path
// shares); then one thread per (bh, i) turns the totals into the sums of the later segments, which the token kernel
// adds. (A walk over all L tokens per (bh, i) ran 6144 threads through 2048
// dependent steps at 125M: most of the angle backward's 1 ms per layer.)
__global__ void angle_suffix_local_kernel(MixerDims d, float* __restrict__ dphi) {
  pdl_wait();
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * nseg * d.S) return;
  const int i = int(e % d.S);
  const int64_t bs = e / d.S, bh = bs / nseg;
  const int sg = int(bs % nseg), t0 = sg * kAngleSegment, t_end = min(d.L, t0 + kAngleSegment);
  float* g = dphi + bh * d.L * d.S + i;
  float run = 0;
  for (int t1 = t_end - 1; t1 >= t0; t1 -= kAhead) {
    float v[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) v[k] = g[int64_t(max(t1 - k, t0)) * d.S];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (t1 - k < t0) break;
      run += v[k];
      g[int64_t(t1 - k) * d.S] = run;
    }
  }
}

__global__ void angle_suffix_carry_kernel(MixerDims d, float* __restrict__ seg) {
  pdl_wait();
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * d.S) return;
  const int64_t bh = e / d.S;
  float* s = seg + bh * nseg * d.S + e % d.S;
  float carry = 0;
  for (int sg = nseg - 1; sg >= 0; --sg) {
    const float tot = s[int64_t(sg) * d.S];
    s[int64_t(sg) * d.S] = carry;
    carry += tot;
  }
}

// Step 2, one warp per token row (b, t) taking its heads in order: lanes take the angles i (tanh θ_t once per token,
// where a warp per (b, h, t) took it once per head), each head's dθ term π·dΦ·Δ·(1 − tanh²) is summed over the heads
// in head order straight into dzx's angle columns (the B/C norm backward summed an (M, H, S) buffer of them before:
// the same sums), and each head's Δ share Σ_i dΦ·π·tanh θ (lanes' partials over their angles, then the butterfly)
// goes to shared memory; then lanes take heads for the per-token scalar gradients (spec §2.2 chain: scale_t = γ_t +
// σ̄_{t+1}, γ = λΔ, σ̄ = (1−λ)Δ, A·Δ). Heads' loads are issued kHeadsAhead at a time.
constexpr int kHeadsAhead = 4, kMaxAngleChunks = 4;  // S ≤ 128 angles
__global__ void angle_scalar_token_kernel(AngleBackwardParams p) {
  pdl_wait();
  const MixerDims& d = p.d;
  extern __shared__ float ang_sm[];  // (warps, H): Δ's angle share per head
  const int lane = threadIdx.x % 32, wib = threadIdx.x / 32, chunks = (d.S + 31) / 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + wib;
  if (row >= int64_t(d.B) * d.L) return;  // whole warps leave together (no block barrier below)
  const int b = int(row / d.L), t = int(row % d.L), sg = t / kAngleSegment;
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  float* ang = ang_sm + wib * d.H;
  float th[kMaxAngleChunks], g[kMaxAngleChunks];
#pragma unroll
  for (int c = 0; c < kMaxAngleChunks; ++c) {
    const int i = 32 * c + lane;
    // no_rotary: the increments are 0 whatever θ and Δ are, so neither gets a gradient from the angles.
    th[c] = c < chunks && i < d.S && !d.no_rotary ? tanhf(p.zx[row * d.din + d.off_ang + i]) : 0.0f;
    g[c] = 0.0f;
  }
  for (int h0 = 0; h0 < d.H; h0 += kHeadsAhead) {
    float dPhi[kHeadsAhead][kMaxAngleChunks], dtv[kHeadsAhead];
#pragma unroll
    for (int k = 0; k < kHeadsAhead; ++k) {
      const int64_t bh = int64_t(b) * d.H + min(h0 + k, d.H - 1), st = bh * d.L + t;
      dtv[k] = p.dt[st];
#pragma unroll
      for (int c = 0; c < kMaxAngleChunks; ++c) {
        const int i = 32 * c + lane;
        dPhi[k][c] = c < chunks && i < d.S ? __fadd_rn(p.dphi[st * d.S + i], p.seg[(bh * nseg + sg) * d.S + i]) : 0.0f;
      }
    }
#pragma unroll
    for (int k = 0; k < kHeadsAhead; ++k) {
      if (h0 + k >= d.H) break;
      float a = 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxAngleChunks; ++c) {
        if (c >= chunks || d.no_rotary) break;
        a = angle_dt_share_add(a, dPhi[k][c], th[c]);
        g[c] = theta_grad_add(g[c], angle_theta_factor(dPhi[k][c], dtv[k]), th[c]);
      }
      a = warp_sum(a);
      if (lane == 0) ang[h0 + k] = a;
    }
  }
#pragma unroll
  for (int c = 0; c < kMaxAngleChunks; ++c) {
    const int i = 32 * c + lane;
    if (c >= chunks || i >= d.S) break;
    if (p.dzx16) p.dzx16[row * d.din + d.off_ang + i] = bf16_bits(g[c]);
    else p.dzx[row * d.din + d.off_ang + i] = g[c];
  }
  __syncwarp();
  for (int h = lane; h < d.H; h += 32) {
    const int64_t st = (int64_t(b) * d.H + h) * d.L + t;
    const float dsig = t > 0 ? p.dscale[st - 1] : 0.0f;  // training starts from the zero state: no σ̄_0 pair
    const ScalarGrads gr = angle_scalar_grads(p.dt[st], p.A[st], p.lam[st], p.dAdl[st], p.dsp[st], p.dadt[st],
                                              __fadd_rn(p.dgam[st], p.dscale[st]), dsig, ang[h], d.euler);
    write_scalar_grads(p, row, h, gr);
  }
}

// Step 3: the dt_bias partial per bh, Σ over t: a warp per bh, lanes striding over t, then the butterfly sum (fixed
// order; a thread walking all L tokens was latency-bound). Blocks of two warps spread the B·H warps over many SMs
// (eight warps per block put the 125M layer's 192 warps on 24 SMs: 9.2 µs on an H100 at 7 % of its DRAM bandwidth).
constexpr int kDtBiasWarps = 2;
__global__ void dt_bias_partial_kernel(AngleBackwardParams p) {
  pdl_wait();
  const MixerDims& d = p.d;
  const int64_t bh = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (bh >= int64_t(d.B) * d.H) return;  // whole warps leave together
  const int lane = threadIdx.x % 32, b = int(bh / d.H), h = int(bh % d.H);
  const float* col = p.dzx + int64_t(b) * d.L * d.din + d.off_dt + h;
  float dtb = 0;
  // (16 loads in flight per lane before their adds, in the same order: the column's loads are a strided gather)
#pragma unroll 16
  for (int t = lane; t < d.L; t += 32) dtb += col[int64_t(t) * d.din];
  dtb = warp_sum(dtb);
  if (lane == 0) p.part_dt_bias[bh] = dtb;
}

// One block per row; warps take the (which, r, g) vectors: acc = Σ_{h ∈ g} dBn/dCn, then the RMSNorm backward.
// (Measured slower, 2026-12-02: the slot loop with `#pragma unroll 4`, 73 → 94 µs per 125M layer; a group's slots
// loaded all at once, 73 → 104 µs (MIMO 367 → 429 µs); one resident wave of blocks walking the rows, 73 → 79 µs
// (MIMO 367 → 406 µs). Neither the slot loads' latency nor the block count bounds it.)
__global__ void bc_norm_backward_kernel(MixerDims d, int slots, const float* __restrict__ bc_raw,
                                        const float* __restrict__ B_norm, const float* __restrict__ C_norm,
                                        const float* __restrict__ dBn, const float* __restrict__ dCn,
                                        float* __restrict__ dzx,
                                        float* __restrict__ part_B, float* __restrict__ part_C,
                                        uint16_t* __restrict__ dzx16) {
  pdl_wait();
  const int64_t m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32, RG = d.R * d.G;
  const int spg = slots / d.G;  // head slots per group
  extern __shared__ float group[];  // (warps, N)
  for (int item = warp; item < 2 * RG; item += warps) {
    const bool isB = item < RG;
    const int rg = item % RG, r = rg / d.G, g = rg % d.G;
    const int off = (isB ? d.off_B : d.off_C) + rg * d.N;
    const float* x = bc_raw + (m * 2 * RG + item) * d.N;  // the raw vector (normalize_bc saved it)
    const float* w = isB ? B_norm : C_norm;
    const float* src = (isB ? dBn : dCn) + m * slots * d.R * d.N;
    float* part = (isB ? part_B : part_C) + (m * RG + rg) * d.N;
    float* acc_n = group + warp * d.N;  // this warp's Σ_{h ∈ g}, element n owned by lane n % 32
    float ss = 0;
    for (int n = lane; n < d.N; n += 32) ss += x[n] * x[n];
    const float rstd = 1.0f / sqrtf(warp_sum(ss) / float(d.N) + kEps);
    float mean = 0;
    for (int n = lane; n < d.N; n += 32) {
      float acc = 0;
      for (int k = g * spg; k < (g + 1) * spg; ++k) acc += src[(int64_t(k) * d.R + r) * d.N + n];
      acc_n[n] = acc;
      part[n] = acc * x[n] * rstd;
      mean += acc * w[n] * x[n] * rstd;
    }
    mean = warp_sum(mean) / float(d.N);
    for (int n = lane; n < d.N; n += 32) {
      const float g = rstd * (acc_n[n] * w[n] - x[n] * rstd * mean);
      if (dzx16) dzx16[m * d.din + off + n] = bf16_bits(g);
      else dzx[m * d.din + off + n] = g;
    }
  }
}

// Block (32, 8): 32 columns, 8 row phases summed in a fixed order; grid (column tiles, row segments).
constexpr int kSegRows = 1024;
__global__ void colsum_kernel(const float* __restrict__ in, int64_t rows, int64_t cols, int64_t seg_rows,
                              float* __restrict__ out, bool accumulate) {
  pdl_wait();
  __shared__ float red[8][33];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * seg_rows, r1 = min(rows, r0 + seg_rows);
  float acc = 0;
  if (c < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) acc += in[r * cols + c];
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float s = red[0][threadIdx.x];
    for (int k = 1; k < 8; ++k) s += red[k][threadIdx.x];
    float* dst = out + int64_t(blockIdx.y) * cols + c;
    *dst = accumulate ? *dst + s : s;
  }
}

// colsum_kernel over several sums in one launch: block x of the grid finds its job and its (column tile, row segment)
// in the job table (jobs in order, each owning tiles·segs consecutive blocks), then sums exactly as colsum_kernel
// does. (A layer's ten parameter sums were 8–10 launches of ~5 µs, mostly launch and tail, 0.54 ms per 125M step.)
struct ColsumBatch {
  ColsumJob job[kMaxColsumJobs];
  int64_t first_block[kMaxColsumJobs + 1];  // job j owns blocks [first_block[j], first_block[j + 1])
  int count;
  bool second;  // the second level: sum each job's segments from its scratch into its out
};
__global__ void colsum_batch_kernel(const ColsumBatch b) {
  pdl_wait();
  const int64_t blk = blockIdx.x;
  int j = 0;
  while (j + 1 < b.count && blk >= b.first_block[j + 1]) ++j;
  const ColsumJob& jb = b.job[j];
  const int64_t segs = (jb.rows + kSegRows - 1) / kSegRows, local = blk - b.first_block[j];
  const int64_t tiles = (jb.cols + 31) / 32;
  const int64_t tile = local % tiles, seg = local / tiles;
  // The level's input, rows per segment and output, as colsum_add's launches have them.
  const float* in = b.second ? jb.scratch : jb.in;
  const int64_t rows = b.second ? segs : jb.rows, seg_rows = b.second || segs == 1 ? rows : kSegRows;
  float* out = !b.second && segs > 1 ? jb.scratch : jb.out;
  const bool accumulate = b.second || segs == 1;
  __shared__ float red[8][33];
  const int64_t c = tile * 32 + threadIdx.x;
  const int64_t r0 = seg * seg_rows, r1 = min(rows, r0 + seg_rows);
  float acc = 0;
  if (c < jb.cols)
#pragma unroll 16
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) acc += in[r * jb.cols + c];
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < jb.cols) {
    float s = red[0][threadIdx.x];
    for (int k = 1; k < 8; ++k) s += red[k][threadIdx.x];
    float* dst = out + seg * jb.cols + c;
    *dst = accumulate ? *dst + s : s;
  }
}

// MAMBA3_TRAIN_ANGLES, read once per process: the angle kernels' form ("blocks", or unset; "fused"; "split"). All
// write the same bits.
int g_angles_mode = -1;  // set_angles_mode (-1: the environment's choice)
AnglesMode angles_mode() {
  static const AnglesMode env = [] {
    const std::string v = env_choice("MAMBA3_TRAIN_ANGLES", {"blocks", "fused", "split"});
    return v == "split" ? AnglesMode::kSplit : v == "fused" ? AnglesMode::kFused : AnglesMode::kBlocks;
  }();
  return g_angles_mode < 0 ? env : AnglesMode(g_angles_mode);
}

template <int kI>
void launch_angle_fused_width(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, float* phi,
                              int threads, int64_t blocks, size_t bytes) {
  const auto kernel = angle_scan_fused_kernel<kI>;
  static size_t raised = 48 * 1024;  // this instance's dynamic shared-memory limit so far (set once per size)
  if (bytes > raised) {
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    // A hint: the most shared memory per SM, so that several blocks fit (three of 68.6 KB at 125M).
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           int(cudaSharedmemCarveoutMaxShared)));
    raised = bytes;
  }
  launch_train(kernel, unsigned(blocks), unsigned(threads), bytes, s, d, zx, dt, phi);
  MAMBA3_LAUNCH_CHECK();
}

// The fused angle kernel where it fits, true when launched. Its width kI (angles per block) is a power of two, at most
// 32 and no wider than S needs, halved while the block has more than kFusedAngleThreads (segment, angle) pairs and
// kI > 8 (kI = 8 at L = 2048: 256 threads, 68.6 KB, three blocks per SM), then while it has more than
// kFusedAngleMaxThreads or more shared memory than the device lets a block have. False (nothing launched) where that
// leaves rows narrower than min(S, 8) angles: 16-byte pieces of rows halve the store bandwidth, and such a kernel ran
// slower than the split path (228 against 212 µs at 125M, H200). So with S ≥ 8: L ≤ 4096 (kI = 8 and 512 threads
// from L = 2049 on, 137 KB, one block per SM); with S < 8: kI = S rounded up to a power of two, L·kI ≤ 32768.
bool launch_angles_fused(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, float* phi) {
  const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  static const int optin = [] {  // the device's opt-in shared memory per block, asked once
    int dev = 0, v = 0;
    MAMBA3_CUDA_CHECK(cudaGetDevice(&dev));
    MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return v;
  }();
  const auto bytes_for = [&](int w) { return size_t(nseg) * (kAngleSegment + 3) * w * sizeof(float); };
  int full = 32;  // the narrowest width that still writes whole rows or whole 32-byte sectors
  while (full > 1 && full / 2 >= d.S) full /= 2;
  const int needed = std::min(full, 8);
  int width = full;
  while (width > 8 && nseg * width > kFusedAngleThreads) width /= 2;
  while (width > 1 && (nseg * width > kFusedAngleMaxThreads || bytes_for(width) > size_t(optin))) width /= 2;
  const int64_t pairs = nseg * width, blocks = int64_t(d.B) * d.H * ((d.S + width - 1) / width);
  const size_t bytes = bytes_for(width);
  if (width < needed || pairs > kFusedAngleMaxThreads || bytes > size_t(optin) || blocks > 0x7fffffff) return false;
  const int threads = int((pairs + 31) / 32 * 32);
  switch (width) {
    case 32: launch_angle_fused_width<32>(s, d, zx, dt, phi, threads, blocks, bytes); break;
    case 16: launch_angle_fused_width<16>(s, d, zx, dt, phi, threads, blocks, bytes); break;
    case 8: launch_angle_fused_width<8>(s, d, zx, dt, phi, threads, blocks, bytes); break;
    case 4: launch_angle_fused_width<4>(s, d, zx, dt, phi, threads, blocks, bytes); break;
    case 2: launch_angle_fused_width<2>(s, d, zx, dt, phi, threads, blocks, bytes); break;
    default: launch_angle_fused_width<1>(s, d, zx, dt, phi, threads, blocks, bytes); break;
  }
  return true;
}

}  // namespace

void launch_normalize_bc(cudaStream_t s, const MixerDims& d, float* zx, const float* B_norm, const float* C_norm,
                         float* bc_raw, float* bc_unrot) {
  launch_train(normalize_bc_kernel, blocks_for(int64_t(d.B) * d.L * 2 * d.R * d.G * 32, 256), 256, 0, s, d, zx, B_norm,
               C_norm, bc_raw, bc_unrot);
  MAMBA3_LAUNCH_CHECK();
}

void launch_token_scalars(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt_bias, TokenScalars out) {
  if (int64_t(d.B) * d.H * d.L == 0) return;
  // 32 tokens per tile, fewer where 3·H columns of 32 tokens would pass 48 KB of shared memory (H > 128).
  const int tile = int(std::clamp<int64_t>(48 * 1024 / (int64_t(3) * d.H * int64_t(sizeof(float))), 1, 32));
  const int64_t blocks = int64_t(d.B) * ((d.L + tile - 1) / tile);
  MAMBA3_CHECK(blocks <= 0x7fffffff && int64_t(3) * d.H * 4 <= 48 * 1024, "token scalars: {} heads exceed a block",
               d.H);
  launch_train(token_scalars_kernel, unsigned(blocks), 256, size_t(tile) * 3 * d.H * sizeof(float), s, d, zx, dt_bias,
               out, tile);
  MAMBA3_LAUNCH_CHECK();
}

void set_angles_mode(AnglesMode mode) { g_angles_mode = int(mode); }

void launch_angles(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, float* phi, float* seg) {
  const int64_t lanes = int64_t(d.B) * d.H * d.S, n = lanes * d.L;
  if (n == 0) return;
  const AnglesMode mode = angles_mode();
  if (mode == AnglesMode::kBlocks && launch_angles_blocks(s, d, zx, dt, phi, seg)) return;
  if (mode != AnglesMode::kSplit && launch_angles_fused(s, d, zx, dt, phi)) return;
  const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  launch_train(angle_scan_local_kernel, blocks_for(lanes * nseg, 128), 128, 0, s, d, zx, dt, phi, seg);
  MAMBA3_LAUNCH_CHECK();
  launch_train(angle_scan_carry_kernel, blocks_for(lanes, 128), 128, 0, s, d, seg);
  MAMBA3_LAUNCH_CHECK();
  launch_train(angle_finish_kernel, blocks_for(n, 256), 256, 0, s, d, seg, phi);
  MAMBA3_LAUNCH_CHECK();
}

bool launch_angle_codes(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, uint16_t* codes,
                        float* seg) {
  if (int64_t(d.B) * d.H * d.S * d.L == 0) return false;
  return angles_mode() == AnglesMode::kBlocks && launch_angles_blocks(s, d, zx, dt, nullptr, seg, codes);
}

void launch_angle_scalar_backward(cudaStream_t s, const AngleBackwardParams& p) {
  const MixerDims& d = p.d;
  const int64_t BH = int64_t(d.B) * d.H, lanes = BH * d.S;
  if (BH * d.L == 0) return;
  if (angles_mode() == AnglesMode::kBlocks && launch_angle_backward_blocks(s, p)) {
    launch_train(dt_bias_partial_kernel, blocks_for(BH, kDtBiasWarps), 32 * kDtBiasWarps, 0, s, p);
    MAMBA3_LAUNCH_CHECK();
    return;
  }
  if (lanes > 0) {
    const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
    if (!p.seg_ready) launch_angle_totals(s, d, p.dphi, p.seg);  // from dφ before the local sums overwrite it
    launch_train(angle_suffix_local_kernel, blocks_for(lanes * nseg, 128), 128, 0, s, d, p.dphi);
    MAMBA3_LAUNCH_CHECK();
    launch_train(angle_suffix_carry_kernel, blocks_for(lanes, 128), 128, 0, s, d, p.seg);
    MAMBA3_LAUNCH_CHECK();
  }
  MAMBA3_CHECK(d.S <= 32 * kMaxAngleChunks, "angle backward: {} angles (at most {})", d.S, 32 * kMaxAngleChunks);
  launch_train(angle_scalar_token_kernel, blocks_for(int64_t(d.B) * d.L, 8), 256, size_t(8) * d.H * sizeof(float), s,
               p);
  MAMBA3_LAUNCH_CHECK();
  launch_train(dt_bias_partial_kernel, blocks_for(BH, kDtBiasWarps), 32 * kDtBiasWarps, 0, s, p);
  MAMBA3_LAUNCH_CHECK();
}

size_t angle_scratch_floats(const MixerDims& d) {
  const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  return size_t(std::max<int64_t>(1, int64_t(d.B) * d.H * nseg * d.S));
}

void launch_bc_norm_backward(cudaStream_t s, const MixerDims& d, int slots, const float* bc_raw, const float* B_norm,
                             const float* C_norm, const float* dBn, const float* dCn, float* dzx,
                             float* part_B_norm, float* part_C_norm, uint16_t* dzx16) {
  MAMBA3_CHECK(slots >= d.G && d.H % slots == 0 && slots % d.G == 0,
               "B/C norm backward: {} head slots for {} heads in {} groups", slots, d.H, d.G);
  // A warp per B/C vector of the row (2·R·G of them, at most 8 warps): SISO with one group runs 64-thread blocks, so
  // that no warps idle in the block and more rows share an SM.
  const int warps = std::min(8, 2 * d.R * d.G);
  const size_t smem = size_t(warps) * d.N * sizeof(float);
  launch_train(bc_norm_backward_kernel, unsigned(int64_t(d.B) * d.L), 32 * warps, smem, s, d, slots, bc_raw, B_norm,
               C_norm, dBn, dCn, dzx, part_B_norm, part_C_norm, dzx16);
  MAMBA3_LAUNCH_CHECK();
}

size_t colsum_scratch_floats(int64_t rows, int64_t cols) {
  const int64_t segs = (rows + kSegRows - 1) / kSegRows;
  return segs > 1 ? size_t(segs * cols) : 1;
}

void colsum_add_batch(cudaStream_t s, const ColsumJob* jobs, int count) {
  MAMBA3_CHECK(count >= 0 && count <= kMaxColsumJobs, "colsum_add_batch: {} jobs (at most {})", count,
               kMaxColsumJobs);
  for (int level = 0; level < 2; ++level) {
    ColsumBatch b{};
    b.second = level == 1;
    int64_t blocks = 0;
    for (int i = 0; i < count; ++i) {
      const ColsumJob& jb = jobs[i];
      const int64_t segs = (jb.rows + kSegRows - 1) / kSegRows;
      if (jb.rows == 0 || jb.cols == 0 || (b.second && segs == 1)) continue;  // nothing (more) to sum
      b.job[b.count] = jb, b.first_block[b.count] = blocks, ++b.count;
      blocks += (jb.cols + 31) / 32 * (b.second ? 1 : segs);
    }
    b.first_block[b.count] = blocks;
    if (blocks == 0) continue;
    MAMBA3_CHECK(blocks <= 0x7fffffff, "colsum_add_batch: {} blocks", blocks);
    launch_train(colsum_batch_kernel, unsigned(blocks), dim3(32, 8), 0, s, b);
    MAMBA3_LAUNCH_CHECK();
  }
}

void colsum_add(cudaStream_t s, const float* in, int64_t rows, int64_t cols, float* out, float* scratch) {
  if (rows == 0 || cols == 0) return;
  const int64_t segs = (rows + kSegRows - 1) / kSegRows;
  const dim3 block(32, 8);
  const unsigned tiles = unsigned((cols + 31) / 32);
  if (segs == 1) {
    launch_train(colsum_kernel, dim3(tiles, 1), block, 0, s, in, rows, cols, rows, out, true);
    MAMBA3_LAUNCH_CHECK();
    return;
  }
  // Two levels: fixed segments of kSegRows rows into scratch (segs, cols), then the segments into out.
  launch_train(colsum_kernel, dim3(tiles, unsigned(segs)), block, 0, s, in, rows, cols, kSegRows, scratch, false);
  MAMBA3_LAUNCH_CHECK();
  launch_train(colsum_kernel, dim3(tiles, 1), block, 0, s, scratch, segs, cols, segs, out, true);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda::train_detail
