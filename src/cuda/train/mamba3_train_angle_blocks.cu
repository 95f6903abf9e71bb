// The angle scan and its backward in segment blocks: one block per (sequence b, segment of kAngleSegment tokens) over
// all H heads and S angles. The per-angle kernels (mamba3_train_token.cu) give each (head, angle) its own thread and
// redo per head what all heads share: π·tanh θ_t (H times per token in the scan), and in the backward a warp per token
// walks the heads with one dependent round of loads per four heads, after the suffix sums have been written out and
// read back (the scan 47 µs, the backward 30 + 66 µs per 125M layer against ~12 and ~25 µs of bytes). Here a block
// stages a segment's tanh θ and Δ in shared memory once, and each thread walks its (head, angle) through the segment
// from shared memory. Same arithmetic in the same order as the per-angle kernels (mamba3_train_angles.cuh), so the
// same bits (FusedAnglesGiveTheSplitBits):
// - scan: a first kernel scans each segment from 0 and leaves its end in seg; the second turns the earlier segments'
//   ends into the segment's start (the carry recurrence) and writes wrap(local + start) — φ written once, θ and Δ read
//   from L2 twice.
// - backward: a first kernel sums each segment's dφ from its last token down into seg (the suffix kernel's totals,
//   without writing the local sums back); the second adds the later segments' totals (the carry), walks its segment
//   from the end in tiles of kTileTokens tokens keeping the running sums in registers, and per tile puts every head's
//   θ factors and Δ shares in shared memory, from which threads per (token, angle) sum the θ gradient over the heads
//   in head order and threads per (token, head) form the scalar gradients — dφ read twice, never written.
//   At S = 32 (one angle per lane; the 125M shape) the walk only keeps the running sums and stores dΦ·π per (token,
//   head, angle); both products and both sums over a tile — the θ gradient over the heads, and Δ's share over the
//   angles in the warp butterfly's order — run after the hand-over on otherwise idle threads (a third of the
//   instructions of the walk with a butterfly per token and head; MAMBA3_TRAIN_ANGLE_SHARES=warp keeps that form).
#include <cuda_bf16.h>

#include <algorithm>

#include "cuda/cuda_check.h"
#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/train/mamba3_train_angles.cuh"
#include "cuda/train/mamba3_train_kernels.h"

namespace mamba3::cuda::train_detail {
namespace {

constexpr int kLoadsAhead = 16;   // global loads a thread issues before it uses them
constexpr int kCarryAhead = 8;    // the backward's loads of the later segments' totals in flight
constexpr int kTileTokens = 8;    // the backward's tokens between two hand-overs through shared memory
// The backward's reach: S ≤ 32·kMaxChunks angles (lane l takes angles l, l + 32, …), H ≤ kMaxWarps·kMaxHeadSlots
// heads (warps take up to kMaxHeadSlots heads each); wider layers take the per-angle kernels.
constexpr int kMaxChunks = 2;
constexpr int kMaxHeadSlots = 2;
// The backward: at most 24 warps per block (one head each at 125M), two blocks per SM at 40 registers a thread.
// (12 warps of two heads each at 80 registers — fewer recomputed addresses — ran 99.7 against 95.2 µs per 125M
// layer: the walk's latency needs the warps.)
constexpr int kMaxWarps = 24;
constexpr size_t kMaxSharedBytes = 48 * 1024;

struct Segment {
  int b, sg, t0, n, nseg;
};
__device__ __forceinline__ Segment this_segment(const MixerDims& d) {
  Segment s;
  s.nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  s.b = int(blockIdx.x / s.nseg);
  s.sg = int(blockIdx.x % s.nseg);
  s.t0 = s.sg * kAngleSegment;
  s.n = min(kAngleSegment, d.L - s.t0);
  return s;
}

// Δ of every head over the segment into dts (H, kAngleSegment), and f(θ) of every (token, angle) into th (n, S).
// th's rows are kPitch floats apart (0: S, packed).
template <int kPitch = 0, typename ThetaFn>
__device__ __forceinline__ void stage_segment(const MixerDims& d, const Segment& s, const float* __restrict__ zx,
                                              const float* __restrict__ dt, float* th, float* dts, ThetaFn f) {
  for (int e = threadIdx.x; e < s.n * d.S; e += blockDim.x) {
    const int t = e / d.S, i = e - t * d.S;
    th[kPitch == 0 ? e : t * kPitch + i] = f(zx[(int64_t(s.b) * d.L + s.t0 + t) * d.din + d.off_ang + i]);
  }
  for (int e = threadIdx.x; e < d.H * s.n; e += blockDim.x) {
    const int h = e / s.n, t = e - h * s.n;
    dts[h * kAngleSegment + t] = dt[(int64_t(s.b) * d.H + h) * d.L + s.t0 + t];
  }
}

// Angle i's scan through the segment from 0 (rates (n, S), dts: the head's Δ); each φ handed to store(t, φ).
template <typename Store>
__device__ __forceinline__ float segment_scan(const float* rate, const float* dts, int S, int n, int i, Store store) {
  float phi = 0;
#pragma unroll 8
  for (int t = 0; t < n; ++t) {
    phi = angle_step(phi, rate[t * S + i], dts[t], false);
    store(t, phi);
  }
  return phi;
}

// Shared memory of the scan kernels: rates (kAngleSegment, S), then Δ (H, kAngleSegment).
size_t scan_shared_bytes(const MixerDims& d) { return size_t(kAngleSegment) * (d.S + d.H) * sizeof(float); }

// The scan's two kernels, one body: kWrite false scans each (head, angle) through its segment from 0 and leaves the
// end in ends; kWrite true forms the segment's start from the earlier segments' ends (the carry recurrence, in
// order), scans again and writes wrap(local + start) into phi.
template <bool kWrite>
__global__ void angle_block_scan_kernel(MixerDims d, const float* __restrict__ zx, const float* __restrict__ dt,
                                        float* __restrict__ ends, float* __restrict__ phi,
                                        uint16_t* __restrict__ codes) {
  pdl_wait();
  extern __shared__ float scan_sm[];
  const Segment s = this_segment(d);
  float *rate = scan_sm, *dts = scan_sm + kAngleSegment * d.S;
  stage_segment(d, s, zx, dt, rate, dts, [](float z) { return angle_rate(z, false); });
  __syncthreads();
  for (int e = threadIdx.x; e < d.H * d.S; e += blockDim.x) {
    const int h = e / d.S, i = e - h * d.S;
    const int64_t bh = int64_t(s.b) * d.H + h;
    if constexpr (!kWrite) {
      ends[(bh * s.nseg + s.sg) * d.S + i] =
          segment_scan(rate, dts + h * kAngleSegment, d.S, s.n, i, [](int, float) {});
    } else {
      const float* end = ends + bh * s.nseg * d.S + i;
      float start = 0;
      for (int s0 = 0; s0 < s.sg; s0 += kLoadsAhead) {
        float v[kLoadsAhead];
#pragma unroll
        for (int k = 0; k < kLoadsAhead; ++k) v[k] = end[int64_t(min(s0 + k, s.sg - 1)) * d.S];
#pragma unroll
        for (int k = 0; k < kLoadsAhead; ++k) {
          if (s0 + k >= s.sg) break;
          start = wrap_angle(start + v[k]);
        }
      }
      const int64_t at = (bh * d.L + s.t0) * d.S + i;
      if (codes)  // (the same φ, written as its code)
        segment_scan(rate, dts + h * kAngleSegment, d.S, s.n, i,
                     [&](int t, float v) { codes[at + int64_t(t) * d.S] = angle_code(wrap_angle(v + start)); });
      else
        segment_scan(rate, dts + h * kAngleSegment, d.S, s.n, i,
                     [&](int t, float v) { phi[at + int64_t(t) * d.S] = wrap_angle(v + start); });
    }
  }
}

// The backward's first kernel: each (bh, segment, angle)'s sum of dφ over the segment. A segment of one bh is a
// contiguous (n, S) block, so a warp per (bh, segment) streams it as float4s: each lane keeps kVec groups of 4 angles
// (kGroups lanes cover a row) and takes every kPhases-th token (tokens in increasing order), then the lanes of a group
// add their partials by butterflies (offsets kGroups, 2·kGroups, …). (A thread per (bh, segment, angle) walking its
// tokens read 128-byte rows 128 bytes apart at 1.6 TB/s.) The order of the sum is this kernel's own; every backward
// path takes its totals from here (launch_angle_totals), or from the SISO rotation backward at S = 16 and 32, whose
// eight warps take the same eight phases of tokens (kVec 2 at S = 32 for that), so all of them carry the same bits.
template <int kS, int kVec = 1>
__global__ void angle_totals_warp_kernel(MixerDims d, const float* __restrict__ dphi, float* __restrict__ seg) {
  pdl_wait();
  constexpr int kGroups = kS / (4 * kVec), kPhases = 32 / kGroups, kBatch = 8, kRow = kS / 4;
  static_assert(kGroups * 4 * kVec == kS && kPhases * kGroups == 32, "whole float4 groups over a warp");
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int64_t task = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // (bh, segment)
  if (task >= int64_t(d.B) * d.H * nseg) return;  // whole warps
  const int lane = threadIdx.x % 32, sg = int(task % nseg), t0 = sg * kAngleSegment;
  const int n = min(kAngleSegment, d.L - t0), group = lane % kGroups, phase = lane / kGroups;
  const int64_t bh = task / nseg;
  const float4* g4 = reinterpret_cast<const float4*>(dphi + (bh * d.L + t0) * kS) + group * kVec;
  float4 acc[kVec];
#pragma unroll
  for (int q = 0; q < kVec; ++q) acc[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int t1 = phase; t1 < n; t1 += kPhases * kBatch) {
    float4 v[kBatch][kVec];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int t = t1 + k * kPhases;
#pragma unroll
      for (int q = 0; q < kVec; ++q) v[k][q] = t < n ? g4[int64_t(t) * kRow + q] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        acc[q].x += v[k][q].x, acc[q].y += v[k][q].y, acc[q].z += v[k][q].z, acc[q].w += v[k][q].w;
      }
  }
#pragma unroll
  for (int o = kGroups; o < 32; o <<= 1)
#pragma unroll
    for (int q = 0; q < kVec; ++q) {
      acc[q].x += __shfl_xor_sync(0xffffffffu, acc[q].x, o);
      acc[q].y += __shfl_xor_sync(0xffffffffu, acc[q].y, o);
      acc[q].z += __shfl_xor_sync(0xffffffffu, acc[q].z, o);
      acc[q].w += __shfl_xor_sync(0xffffffffu, acc[q].w, o);
    }
  if (phase == 0)
#pragma unroll
    for (int q = 0; q < kVec; ++q) reinterpret_cast<float4*>(seg + task * kS)[group * kVec + q] = acc[q];
}

// The same sums for any S, a thread per (bh, segment, angle) walking the segment's tokens in increasing order.
__global__ void angle_totals_thread_kernel(MixerDims d, const float* __restrict__ dphi, float* __restrict__ seg) {
  pdl_wait();
  const int nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * nseg * d.S) return;
  const int i = int(e % d.S);
  const int64_t bs = e / d.S, bh = bs / nseg;
  const int sg = int(bs % nseg), t0 = sg * kAngleSegment, n = min(kAngleSegment, d.L - t0);
  const float* g = dphi + (bh * d.L + t0) * d.S + i;
  float run = 0;
  for (int t1 = 0; t1 < n; t1 += kLoadsAhead) {
    float v[kLoadsAhead];
#pragma unroll
    for (int k = 0; k < kLoadsAhead; ++k) v[k] = g[int64_t(min(t1 + k, n - 1)) * d.S];
#pragma unroll
    for (int k = 0; k < kLoadsAhead; ++k) {
      if (t1 + k >= n) break;
      run += v[k];
    }
  }
  seg[e] = run;
}

// The later segments' totals of dφ for this thread's heads and angles, summed from the last segment down (the suffix
// carry kernel's order), into carry; run zeroed.
template <int kC, int kSlots>
__device__ __forceinline__ void segment_carry(const AngleBackwardParams& p, const Segment& s, int lane, int warp,
                                              int warps, float (&run)[kSlots][kC], float (&carry)[kSlots][kC]) {
  const MixerDims& d = p.d;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const int h = warp + k * warps;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int i = lane + 32 * c;
      run[k][c] = 0.0f;
      carry[k][c] = 0.0f;
      if (h >= d.H || i >= d.S) continue;
      const float* tot = p.seg + (int64_t(s.b) * d.H + h) * s.nseg * d.S + i;
      for (int s1 = s.nseg - 1; s1 > s.sg; s1 -= kCarryAhead) {
        float w[kCarryAhead];
#pragma unroll
        for (int u = 0; u < kCarryAhead; ++u) w[u] = tot[int64_t(max(s1 - u, s.sg + 1)) * d.S];
#pragma unroll
        for (int u = 0; u < kCarryAhead; ++u) {
          if (s1 - u <= s.sg) break;
          carry[k][c] += w[u];
        }
      }
    }
  }
}

// Head h's scalar gradients at segment token t, from Δ (dts) and its angle shares (ang).
__device__ __forceinline__ ScalarGrads token_scalar_grads(const AngleBackwardParams& p, const Segment& s,
                                                          const float* dts, const float* ang, int h, int t) {
  const MixerDims& d = p.d;
  const int tg = s.t0 + t;
  const int64_t st = (int64_t(s.b) * d.H + h) * d.L + tg;
  const float dsig = tg > 0 ? p.dscale[st - 1] : 0.0f;  // training starts from the zero state: no σ̄_0 pair
  return angle_scalar_grads(dts[h * kAngleSegment + t], p.A[st], p.lam[st], p.dAdl[st], p.dsp[st], p.dadt[st],
                            __fadd_rn(p.dgam[st], p.dscale[st]), dsig, ang[t * d.H + h], d.euler);
}

// The scalar gradients per (token, head) from Δ (dts) and its angle shares (ang), tokens fastest (consecutive
// addresses in the (B·H, L) arrays).
__device__ __forceinline__ void segment_scalar_grads(const AngleBackwardParams& p, const Segment& s, const float* dts,
                                                     const float* ang) {
  const MixerDims& d = p.d;
  for (int e = threadIdx.x; e < s.n * d.H; e += blockDim.x) {
    const int h = e / s.n, t = e - h * s.n;
    write_scalar_grads(p, int64_t(s.b) * d.L + s.t0 + t, h, token_scalar_grads(p, s, dts, ang, h, t));
  }
}

// The same, staged through shared memory (stage: 3·n·H floats) and written with heads fastest: a token's dt, A and
// trap columns are H consecutive values each, where the direct form's warps (tokens fastest) store one value per row.
__device__ __forceinline__ void segment_scalar_grads_staged(const AngleBackwardParams& p, const Segment& s,
                                                            const float* dts, const float* ang, float* stage) {
  const MixerDims& d = p.d;
  for (int e = threadIdx.x; e < s.n * d.H; e += blockDim.x) {
    const int h = e / s.n, t = e - h * s.n;
    const ScalarGrads gr = token_scalar_grads(p, s, dts, ang, h, t);
    float* o = stage + (t * d.H + h) * 3;
    o[0] = gr.dsp, o[1] = gr.dA, o[2] = gr.dtrap;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < s.n * d.H; e += blockDim.x) {
    const int t = e / d.H, h = e - t * d.H;
    const float* o = stage + e * 3;
    write_scalar_grads(p, int64_t(s.b) * d.L + s.t0 + t, h, ScalarGrads{o[0], o[1], o[2]});
  }
}

// Row `row`'s angle column i of dzx (or of dzx16 when given): the θ gradient g.
__device__ __forceinline__ void write_theta_grad(const AngleBackwardParams& p, int64_t row, int i, float g) {
  const MixerDims& d = p.d;
  if (p.dzx16)
    p.dzx16[row * d.din + d.off_ang + i] = __bfloat16_as_ushort(__float2bfloat16_rn(g));
  else
    p.dzx[row * d.din + d.off_ang + i] = g;
}

// Shared memory of the backward's second kernel: tanh θ (kAngleSegment, S), Δ (H, kAngleSegment), Δ's angle shares
// (kAngleSegment, H), then per tile the θ factors (kTileTokens, H, S).
size_t backward_shared_bytes(const MixerDims& d) {
  return (size_t(kAngleSegment) * (d.S + 2 * d.H) + size_t(kTileTokens) * d.H * d.S) * sizeof(float);
}

// The second kernel: warps take heads (warp w: heads w, w + warps, …, kSlots of them), lanes angles (lane l: l,
// l + 32, …, kC of them); the running sums of dφ from the segment's end stay in registers, and the next tile's dφ is
// loaded before the barrier that hands the current tile's θ factors over. The scalar gradients wait for the end of
// the segment, when all their loads can be in flight at once.
template <int kC, int kSlots>
__global__ void __launch_bounds__(32 * kMaxWarps, 2) angle_block_backward_kernel(AngleBackwardParams p) {
  pdl_wait();
  const MixerDims& d = p.d;
  extern __shared__ float bwd_sm[];
  const Segment s = this_segment(d);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float* th = bwd_sm;                           // (kAngleSegment, S)
  float* dts = th + kAngleSegment * d.S;        // (H, kAngleSegment)
  float* ang = dts + kAngleSegment * d.H;       // (kAngleSegment, H)
  float* xs = ang + kAngleSegment * d.H;        // (kTileTokens, H, S)
  stage_segment(d, s, p.zx, p.dt, th, dts, [](float z) { return tanhf(z); });

  // A tile's dφ (tokens hi − 1 − j, j < kTileTokens, j < hi) of this thread's heads and angles.
  float v[kSlots][kTileTokens][kC];
  const auto load_tile = [&](int hi) {
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int h = min(warp + k * warps, d.H - 1);
      const float* g = p.dphi + ((int64_t(s.b) * d.H + h) * d.L + s.t0) * d.S;
#pragma unroll
      for (int j = 0; j < kTileTokens; ++j)
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          const int i = lane + 32 * c;
          v[k][j][c] = j < hi && i < d.S ? g[int64_t(hi - 1 - j) * d.S + i] : 0.0f;
        }
    }
  };
  load_tile(s.n);

  float run[kSlots][kC], carry[kSlots][kC];
  segment_carry<kC, kSlots>(p, s, lane, warp, warps, run, carry);
  __syncthreads();

  // A token of the walk: one warp's head k, its angles' running sums, θ factors into xs and the Δ share into ang.
  // Lanes past S (S not a multiple of 32) carry zero sums and read a valid tanh θ: they add exact zeros to the share
  // and store nothing (no branch around them: the walk is the kernel's instruction budget).
  const float* th_lane[kC];
  bool on[kC];
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    on[c] = lane + 32 * c < d.S;
    th_lane[c] = th + min(lane + 32 * c, d.S - 1);
  }
  const auto walk = [&](int k, int h, int j, int hi) {
    const int t = hi - 1 - j;
    float a = 0.0f;
    float* x_row = xs + (j * d.H + h) * d.S + lane;
    const float dt_t = dts[h * kAngleSegment + t];
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      run[k][c] += v[k][j][c];
      const float dPhi = __fadd_rn(run[k][c], carry[k][c]);
      a = angle_dt_share_add(a, dPhi, th_lane[c][t * d.S]);
      if (on[c]) x_row[32 * c] = angle_theta_factor(dPhi, dt_t);
    }
    a = warp_sum(a);
    if (lane == 0) ang[t * d.H + h] = a;
  };

  for (int hi = s.n; hi > 0; hi -= kTileTokens) {
    const int cnt = min(kTileTokens, hi);  // tokens hi − 1 down to hi − cnt (segment-local), j = hi − 1 − t
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int h = warp + k * warps;
      if (h >= d.H) break;  // the whole warp
      if (cnt == kTileTokens) {
#pragma unroll
        for (int j = 0; j < kTileTokens; ++j) walk(k, h, j, hi);
      } else {
#pragma unroll
        for (int j = 0; j < kTileTokens; ++j)
          if (j < cnt) walk(k, h, j, hi);
      }
    }
    if (hi > kTileTokens) load_tile(hi - kTileTokens);  // in flight through the hand-over
    __syncthreads();
    // θ's gradient per (token, angle), summed over the heads in head order.
    for (int e = threadIdx.x; e < cnt * d.S; e += blockDim.x) {
      const int j = e / d.S, i = e - j * d.S, t = hi - 1 - j;
      const float tv = th[t * d.S + i];
      float gsum = 0.0f;
      for (int h = 0; h < d.H; ++h) gsum = theta_grad_add(gsum, xs[(j * d.H + h) * d.S + i], tv);
      write_theta_grad(p, int64_t(s.b) * d.L + s.t0 + t, i, gsum);
    }
    __syncthreads();
  }

  segment_scalar_grads(p, s, dts, ang);
}

// The S = 32 form of the second kernel (lane l: angle l; warps take heads as above). The walk keeps each angle's
// running sum and stores dΦ·π into xs; after the hand-over threads per (token, angle) form the θ factors dΦ·π·Δ and
// sum them over the heads in head order (theta_grad_add), and threads per (token, head) form the shares dΦ·π·tanh θ
// and sum them over the angles in the order of warp_sum's butterfly (offsets 16, 8, 4, 2, 1: every lane's sum has
// the same bits, lane 0's is written): the products and sums of the warp form, the same bits. Rows of xs and th are
// 33 floats apart, so that neither a warp of tokens×heads nor one of tokens×angles meets itself in a bank.
constexpr int kPitch32 = 33;
size_t backward_s32_shared_bytes(const MixerDims& d) {
  return (size_t(kAngleSegment) * (kPitch32 + 2 * d.H) + size_t(kTileTokens) * d.H * kPitch32) * sizeof(float);
}

// Lane kL's partial sum after kLevel rounds of warp_sum's butterfly over the 32 shares x[l]·th[l] (x: dΦ·π), which is
// every lane's after five; formed depth first, so that few partials are live at once.
template <int kLevel, int kL>
__device__ __forceinline__ float butterfly_share(const float* x, const float* th) {
  if constexpr (kLevel == 1) {
    return __fadd_rn(angle_dt_share_add_scaled(0.0f, x[kL], th[kL]),
                     angle_dt_share_add_scaled(0.0f, x[kL + 16], th[kL + 16]));
  } else {
    return __fadd_rn(butterfly_share<kLevel - 1, kL>(x, th), butterfly_share<kLevel - 1, kL + (32 >> kLevel)>(x, th));
  }
}

template <int kSlots>
__global__ void __launch_bounds__(32 * kMaxWarps, 2) angle_block_backward_s32_kernel(AngleBackwardParams p) {
  pdl_wait();
  constexpr int kS = 32;
  const MixerDims& d = p.d;
  extern __shared__ float bwd_sm[];
  const Segment s = this_segment(d);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float* th = bwd_sm;                          // (kAngleSegment, kPitch32): tanh θ
  float* dts = th + kAngleSegment * kPitch32;  // (H, kAngleSegment)
  float* ang = dts + kAngleSegment * d.H;      // (kAngleSegment, H)
  float* xs = ang + kAngleSegment * d.H;       // (kTileTokens, H, kPitch32): dΦ·π
  stage_segment<kPitch32>(d, s, p.zx, p.dt, th, dts, [](float z) { return tanhf(z); });

  float v[kSlots][kTileTokens];
  const auto load_tile = [&](int hi) {
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int h = min(warp + k * warps, d.H - 1);
      const float* g = p.dphi + ((int64_t(s.b) * d.H + h) * d.L + s.t0) * kS + lane;
#pragma unroll
      for (int j = 0; j < kTileTokens; ++j) v[k][j] = j < hi ? g[int64_t(hi - 1 - j) * kS] : 0.0f;
      // The tile after it asked of L2 (lane j: its token j's 128-byte row), so that its loads return from there.
      const int t_next = hi - 1 - kTileTokens - lane;
      if (lane < kTileTokens && t_next >= 0) prefetch_l2(g - lane + int64_t(t_next) * kS);
    }
  };
  load_tile(s.n);
  float run[kSlots][1], carry[kSlots][1];
  segment_carry<1, kSlots>(p, s, lane, warp, warps, run, carry);
  __syncthreads();

  const int row_stride = d.H * kPitch32;  // xs floats between consecutive tokens of a tile
  for (int hi = s.n; hi > 0; hi -= kTileTokens) {
    const int cnt = min(kTileTokens, hi);  // tokens hi − 1 down to hi − cnt (segment-local), j = hi − 1 − t
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int h = warp + k * warps;
      if (h >= d.H) break;  // the whole warp
      float* x = xs + h * kPitch32 + lane;
#pragma unroll
      for (int j = 0; j < kTileTokens; ++j) {
        if (cnt < kTileTokens && j >= cnt) break;
        run[k][0] += v[k][j];
        x[j * row_stride] = angle_scaled_dphi(__fadd_rn(run[k][0], carry[k][0]));
      }
    }
    if (hi > kTileTokens) load_tile(hi - kTileTokens);  // in flight through the hand-over
    __syncthreads();
    const int n_theta = cnt * kS;
    for (int e = threadIdx.x; e < n_theta + cnt * d.H; e += blockDim.x) {
      if (e < n_theta) {  // θ's gradient at (token, angle), summed over the heads in head order
        const int j = e / kS, i = e % kS, t = hi - 1 - j;
        const float tv = th[t * kPitch32 + i];
        const float* xr = xs + j * row_stride + i;
        float gsum = 0.0f;
        for (int h = 0; h < d.H; ++h)
          gsum = theta_grad_add(gsum, angle_theta_factor_scaled(xr[h * kPitch32], dts[h * kAngleSegment + t]), tv);
        write_theta_grad(p, int64_t(s.b) * d.L + s.t0 + t, i, gsum);
      } else {  // Δ's share at (token, head), summed over the angles as warp_sum does
        const int jh = e - n_theta, j = jh / d.H, h = jh - j * d.H, t = hi - 1 - j;
        const float* xr = xs + jh * kPitch32;  // row (j, h)
        const float* tr = th + t * kPitch32;
        ang[t * d.H + h] = butterfly_share<5, 0>(xr, tr);
      }
    }
    __syncthreads();
  }
  segment_scalar_grads_staged(p, s, dts, ang, xs);  // xs is dead: 3·n·H ≤ kTileTokens·H·kPitch32 floats
}

// Where the segment-block kernels apply: rotary angles, the shared memory under the default 48 KB, the grid's size.
bool blocks_apply(const MixerDims& d, size_t bytes) {
  const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  return !d.no_rotary && d.S > 0 && d.H > 0 && d.L > 0 && bytes <= kMaxSharedBytes &&
         int64_t(d.B) * nseg <= 0x7fffffff;
}

}  // namespace

bool launch_angles_blocks(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, float* phi, float* seg,
                          uint16_t* codes) {
  const size_t bytes = scan_shared_bytes(d);
  if (!blocks_apply(d, bytes)) return false;
  const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const int threads = int(std::min<int64_t>(1024, (int64_t(d.H) * d.S + 31) / 32 * 32));
  const unsigned blocks = unsigned(int64_t(d.B) * nseg);
  launch_train(angle_block_scan_kernel<false>, blocks, threads, bytes, s, d, zx, dt, seg, nullptr, nullptr);
  MAMBA3_LAUNCH_CHECK();
  launch_train(angle_block_scan_kernel<true>, blocks, threads, bytes, s, d, zx, dt, seg, codes ? nullptr : phi, codes);
  MAMBA3_LAUNCH_CHECK();
  return true;
}

void launch_angle_totals(cudaStream_t s, const MixerDims& d, const float* dphi, float* seg) {
  const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment, tasks = int64_t(d.B) * d.H * nseg;
  if (tasks * d.S == 0) return;
  const auto warps = [&](auto kernel) { launch_train(kernel, unsigned((tasks + 7) / 8), 256, 0, s, d, dphi, seg); };
  switch (d.S) {
    case 4: warps(angle_totals_warp_kernel<4>); break;
    case 8: warps(angle_totals_warp_kernel<8>); break;
    case 16: warps(angle_totals_warp_kernel<16>); break;
    case 32:
      warps(angle_totals_warp_kernel<32, 2>);
      break;  // (eight phases: the rotation backward's warps)
    case 64: warps(angle_totals_warp_kernel<64>); break;
    case 128: warps(angle_totals_warp_kernel<128>); break;
    default:
      launch_train(angle_totals_thread_kernel, unsigned((tasks * d.S + 127) / 128), 128, 0, s, d, dphi, seg);
  }
  MAMBA3_LAUNCH_CHECK();
}

namespace {
int g_angle_shares = -1;  // set_angle_shares_in_pass (-1: the environment's choice)
bool angle_shares_in_pass() {
  static const bool env = env_choice("MAMBA3_TRAIN_ANGLE_SHARES", {"pass", "warp"}) != "warp";
  return g_angle_shares < 0 ? env : g_angle_shares != 0;
}
}  // namespace

void set_angle_shares_in_pass(int mode) { g_angle_shares = mode < 0 ? -1 : mode != 0; }

bool launch_angle_backward_blocks(cudaStream_t s, const AngleBackwardParams& p) {
  const MixerDims& d = p.d;
  const int slots = d.H <= kMaxWarps ? 1 : 2, warps = (d.H + slots - 1) / slots;
  // (One head per warp only: the two-head instance, 25 heads — the most whose tiles fit 48 KB — has not run on a GPU
  // yet; FusedAnglesGiveTheSplitBits has a 25-head case for it.)
  const bool s32 = d.S == 32 && slots == 1 && angle_shares_in_pass();
  const size_t bytes = s32 ? backward_s32_shared_bytes(d) : backward_shared_bytes(d);
  if (!blocks_apply(d, bytes) || d.S > 32 * kMaxChunks || d.H > kMaxWarps * kMaxHeadSlots) return false;
  const int64_t nseg = (d.L + kAngleSegment - 1) / kAngleSegment;
  const unsigned blocks = unsigned(int64_t(d.B) * nseg);
  if (!p.seg_ready) launch_angle_totals(s, d, p.dphi, p.seg);
  const int chunks = (d.S + 31) / 32;
  const auto kernel = s32 ? angle_block_backward_s32_kernel<1>
                      : chunks == 1
                          ? (slots == 1 ? angle_block_backward_kernel<1, 1> : angle_block_backward_kernel<1, 2>)
                          : (slots == 1 ? angle_block_backward_kernel<2, 1> : angle_block_backward_kernel<2, 2>);
  static bool carveout_set[3][2] = {};  // per instance: the most shared memory per SM asked for, once
  bool& set = carveout_set[s32 ? 2 : chunks - 1][slots - 1];
  if (!set) {
    // Two blocks per SM need twice its ~44 KB (125M): more than the carveout the driver may pick by default.
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           int(cudaSharedmemCarveoutMaxShared)));
    set = true;
  }
  launch_train(kernel, blocks, 32 * warps, bytes, s, p);
  MAMBA3_LAUNCH_CHECK();
  return true;
}

}  // namespace mamba3::cuda::train_detail
