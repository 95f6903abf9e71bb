#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_pipeline.h>

#include "cuda/mamba3_stage_gpu.h"
#include "cuda/mamba3_gpu_math.cuh"

#include "cuda/mamba3_chunk_gpu.h"
#include "cuda/mamba3_decode_gpu.h"
#include "cuda/pdl.h"

namespace mamba3::cuda {
namespace {

constexpr int kRowsPerWarp = 8;    // head channels p per warp of the prefill state kernel
constexpr int kMaxThreads = 512;   // 16 warps × 8 channels = the largest P
// Heads per staging warp (its B/C norm is computed once for them). Measured against 1 head per warp (4× the warps)
// on an H200, 1.5B b128 decode: 20.7 vs 27.3 µs per layer (MIMO R = 4: 68 vs 84 µs); 4 kept.
constexpr int kHeadsPerUnit = 4;
constexpr int64_t kFewHeadsDecode = 2048;  // (sequence, head) pairs of a decode step staged one head per warp
constexpr int kPairSlots = 4;      // rotary pairs per lane in the staging warp: ⌈(N/2 + N mod 2) / 32⌉ ≤ 4 (N ≤ 256)
constexpr int kRing = 4;           // prefill ring of token slots: previous, current, two in flight
constexpr int kDecodeRows = 16;    // head channels per decode block when the output has no per-head norm
constexpr int kStageThreads = 256;

struct StageArgs : Mamba3KernelShape {
  int t0, Lc;  // this segment: tokens [t0, t0 + Lc); the stage holds Lc tokens
  Mamba3GpuParams p;
  const float* zx;
  Mamba3GpuState st;
  Mamba3GpuStage sg;
  void* o;
};

__device__ __forceinline__ void copy4(float* dst, const float* src) { __pipeline_memcpy_async(dst, src, 4); }

// The in_proj row of token tl of the segment for sequence b.
__device__ __forceinline__ const float* zx_row(const StageArgs& a, int b, int tl) {
  return a.zx + (int64_t(b) * a.L + a.t0 + tl) * a.d_in;
}

// φ_{t,h,i} = wrap(φ_{t−1,h,i} + π·tanh(θ_{t,i})·Δ_{t,h}) over the segment (spec §2.3; no_rotary keeps φ), sequential
// in t; one thread per (b, h, i), idx = (b·H + h)·S + i (the angle state's layout). Per token and thread: 2 floats
// read (θ coalesced over i, dd_dt broadcast), 1 written: ≈ 12·B·L·H·S bytes, ≈ 30 instructions.
__global__ void __launch_bounds__(256) mamba3_angle_kernel(StageArgs a, int total) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int i = idx % a.S, bh = idx / a.S, h = bh % a.H, b = bh / a.H;
  if (mamba3_row_skipped(a.st, a.L, b)) return;  // an inactive decode row keeps its angles
  const float bias = a.p.dt_bias[h];
  const int64_t step = int64_t(a.H) * a.S;
  float* out = a.sg.phi + int64_t(b) * a.Lc * step + int64_t(h) * a.S + i;
  float phi = a.st.angle[idx];
#pragma unroll 4
  for (int tl = 0; tl < a.Lc; ++tl) {
    const float* row = zx_row(a, b, tl);
    const float dt = softplus_f(row[a.off_dt + h] + bias);
    float ang = a.no_rotary ? phi : phi + kMamba3Pi * tanhf(row[a.off_angles + i]) * dt;
    ang -= kMamba3TwoPi * floorf(ang / kMamba3TwoPi);
    phi = ang;
    out[tl * step] = ang;
  }
  a.st.angle[idx] = phi;
}

// The lane's rotary pair slots j = l + 32m: SISO coordinates (2j, 2j + 1), MIMO (j, j + N/2); an odd N's last
// coordinate is a slot of its own (ib = −1); −1: none.
__device__ __forceinline__ void pair_slots(const StageArgs& a, int lane, int (&ia)[kPairSlots], int (&ib)[kPairSlots]) {
  const int N = a.N, npairs = N / 2, nslots = npairs + (N & 1), partner = a.mimo ? N / 2 : 1;
#pragma unroll
  for (int m = 0; m < kPairSlots; ++m) {
    const int j = lane + 32 * m;
    ia[m] = ib[m] = -1;
    if (j < npairs) {
      ia[m] = a.mimo ? j : 2 * j;
      ib[m] = ia[m] + partner;
    } else if (j < nslots) {
      ia[m] = N - 1;
    }
  }
}

// The RMSNorm of raw B and C vectors (spec §2.4) with their weights, at the lane's pair slots (one warp).
__device__ __forceinline__ void load_normed_bc(const StageArgs& a, const float* Braw, const float* Craw,
                                               const int (&ia)[kPairSlots], const int (&ib)[kPairSlots],
                                               float (&ba)[kPairSlots], float (&bb)[kPairSlots],
                                               float (&ca)[kPairSlots], float (&cb)[kPairSlots]) {
  float ssb = 0.0f, ssc = 0.0f;
#pragma unroll
  for (int m = 0; m < kPairSlots; ++m) {
    const int ea = ia[m], eb = ib[m];
    ba[m] = ea >= 0 ? Braw[ea] : 0.0f;
    bb[m] = eb >= 0 ? Braw[eb] : 0.0f;
    ca[m] = ea >= 0 ? Craw[ea] : 0.0f;
    cb[m] = eb >= 0 ? Craw[eb] : 0.0f;
    ssb += ba[m] * ba[m] + bb[m] * bb[m];
    ssc += ca[m] * ca[m] + cb[m] * cb[m];
  }
  ssb = warp_sum(ssb);
  ssc = warp_sum(ssc);
  const float rb = rsqrtf(ssb / float(a.N) + kMamba3NormEps), rc = rsqrtf(ssc / float(a.N) + kMamba3NormEps);
#pragma unroll
  for (int m = 0; m < kPairSlots; ++m) {
    if (ia[m] >= 0) {
      ba[m] = ba[m] * rb * a.p.B_norm[ia[m]];
      ca[m] = ca[m] * rc * a.p.C_norm[ia[m]];
    }
    if (ib[m] >= 0) {
      bb[m] = bb[m] * rb * a.p.B_norm[ib[m]];
      cb[m] = cb[m] * rc * a.p.C_norm[ib[m]];
    }
  }
}

// Head h, rank r of token tl: bias, rotation of the pair slots below S (spec §3; angle(m, sn, cs) gives slot m's
// sine and cosine) → k (slot tl + 1), q;
// for the segment's last token the cached k moves to slot 0 (k_{−1} of the state kernel) and the new k is cached
// (each lane reads and writes its own coordinates).
template <typename Angle>
__device__ __forceinline__ void emit_head(const StageArgs& a, int b, int tl, int r, int h, int lane,
                                          const int (&ia)[kPairSlots], const int (&ib)[kPairSlots],
                                          const float (&ba)[kPairSlots], const float (&bb)[kPairSlots],
                                          const float (&ca)[kPairSlots], const float (&cb)[kPairSlots], Angle angle) {
  const int N = a.N, H = a.H, R = a.R;
  const bool last = tl == a.Lc - 1;
  const int64_t rhn = int64_t(R) * H * N;
  const float* biasB = a.p.B_bias + (int64_t(h) * R + r) * N;
  const float* biasC = a.p.C_bias + (int64_t(h) * R + r) * N;
  const int64_t within = (int64_t(r) * H + h) * N;  // (r, h) inside one token's (R, H, N)
  float* kout = a.sg.k + (int64_t(b) * (a.Lc + 1) + tl + 1) * rhn + within;
  float* qout = a.sg.q + (int64_t(b) * a.Lc + tl) * rhn + within;
  float* kslot0 = a.sg.k + int64_t(b) * (a.Lc + 1) * rhn + within;
  float* kcache = a.st.k + int64_t(b) * rhn + within;
#pragma unroll
  for (int m = 0; m < kPairSlots; ++m) {
    const int ea = ia[m], eb = ib[m], j = lane + 32 * m;
    if (ea < 0) continue;
    float k0 = ba[m] + biasB[ea], q0 = ca[m] + biasC[ea];
    if (eb >= 0) {
      float k1 = bb[m] + biasB[eb], q1 = cb[m] + biasC[eb];
      if (j < a.S) {
        float sn, cs;
        angle(m, sn, cs);
        const float rk0 = k0 * cs - k1 * sn, rk1 = k0 * sn + k1 * cs;
        const float rq0 = q0 * cs - q1 * sn, rq1 = q0 * sn + q1 * cs;
        k0 = rk0;
        k1 = rk1;
        q0 = rq0;
        q1 = rq1;
      }
      kout[eb] = k1;
      qout[eb] = q1;
      if (last) {
        kslot0[eb] = kcache[eb];
        kcache[eb] = k1;
      }
    }
    kout[ea] = k0;
    qout[ea] = q0;
    if (last) {
      kslot0[ea] = kcache[ea];
      kcache[ea] = k0;
    }
  }
}

// α, β, γ and A·Δ of head h at token tl (spec §2.2; the chunked kernel sums A·Δ into its decay prefix).
__device__ __forceinline__ void write_scalars(const StageArgs& a, const float* row, int b, int tl, int h) {
  const int H = a.H;
  const TokenScalars t = token_scalars(row, a.off_dt, H, h, a.p.dt_bias[h], a.heavy_tail, a.A_floor, a.euler);
  reinterpret_cast<float4*>(a.sg.scal)[(int64_t(b) * a.Lc + tl) * H + h] =
      make_float4(t.alpha, t.beta, t.gamma, t.A * t.dt);
}

// One warp per (b, token tl, rank r, group g, chunk of `hpu` heads of g): B and C normed once, then per head the
// bias and the rotation by the angle scan's φ → k, q. Warps with r = 0 also write the heads' scalars.
// Bytes per token: reads 2·R·G·N raw floats (+ biases, φ: cached), writes 2·R·H·N + 4·H floats.
__global__ void __launch_bounds__(kStageThreads, 3) mamba3_stage_kernel(StageArgs a, int hpu, int chunks, int units) {
  const int unit = int((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5);  // warp-uniform
  const int lane = threadIdx.x & 31;
  if (unit >= units) return;
  const int N = a.N, H = a.H, S = a.S, R = a.R;
  int u = unit;
  const int c = u % chunks;
  u /= chunks;
  const int g = u % a.G;
  u /= a.G;
  const int r = u % R;
  u /= R;
  const int tl = u % a.Lc, b = u / a.Lc;
  if (mamba3_row_skipped(a.st, a.L, b)) return;  // warp-uniform: an inactive decode row keeps its k cache
  const int hg = H / a.G, h0 = g * hg + c * hpu, h1 = min(h0 + hpu, (g + 1) * hg);
  const float* row = zx_row(a, b, tl);
  int ia[kPairSlots], ib[kPairSlots];
  float ba[kPairSlots], bb[kPairSlots], ca[kPairSlots], cb[kPairSlots];
  pair_slots(a, lane, ia, ib);
  load_normed_bc(a, row + a.off_B + (r * a.G + g) * N, row + a.off_C + (r * a.G + g) * N, ia, ib, ba, bb, ca, cb);
  for (int h = h0; h < h1; ++h) {
    const float* phi = a.sg.phi + ((int64_t(b) * a.Lc + tl) * H + h) * S;
    emit_head(a, b, tl, r, h, lane, ia, ib, ba, bb, ca, cb,
              [&](int m, float& sn, float& cs) { sincosf(phi[lane + 32 * m], &sn, &cs); });
  }
  if (r == 0 && lane < h1 - h0) write_scalars(a, row, b, tl, h0 + lane);
}

// Decode (one token): the angle update and the staging in one launch, one warp per (b, group g, chunk of `hpu`
// heads of g) for every rank (used for SISO; see mamba3_staged_gpu). The warp owns its heads' angles, so it updates them in place (no other warp reads them),
// computes sincos once per (head, angle) for all R ranks (the two-kernel path computes it per rank), and stages each
// rank's B and C normed once for its heads. Same expressions as mamba3_angle_kernel + mamba3_stage_kernel, so the
// same bits; φ is not written to the stage (the decode state kernels do not read it).
__global__ void __launch_bounds__(kStageThreads, 2) mamba3_stage_decode_kernel(StageArgs a, int hpu, int chunks,
                                                                               int units) {
  pdl_trigger();
  pdl_wait();
  const int unit = int((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5);  // warp-uniform
  const int lane = threadIdx.x & 31;
  if (unit >= units) return;
  const int N = a.N, H = a.H, S = a.S, R = a.R;
  const int c = unit % chunks, g = (unit / chunks) % a.G, b = unit / chunks / a.G;
  if (mamba3_row_skipped(a.st, 1, b)) return;  // warp-uniform: an inactive row keeps its angles and k cache
  const int hg = H / a.G, h0 = g * hg + c * hpu, h1 = min(h0 + hpu, (g + 1) * hg);
  const float* row = zx_row(a, b, 0);
  int ia[kPairSlots], ib[kPairSlots];
  pair_slots(a, lane, ia, ib);
  float cs[kHeadsPerUnit][kPairSlots], sn[kHeadsPerUnit][kPairSlots];
#pragma unroll
  for (int hh = 0; hh < kHeadsPerUnit; ++hh) {
    const int h = h0 + hh;
    if (h >= h1) break;
    const float dt = softplus_f(row[a.off_dt + h] + a.p.dt_bias[h]);
    float* angle = a.st.angle + (int64_t(b) * H + h) * S;
#pragma unroll
    for (int m = 0; m < kPairSlots; ++m) {
      const int j = lane + 32 * m;
      cs[hh][m] = 1.0f, sn[hh][m] = 0.0f;
      if (j < S) {
        const float phi = angle[j];
        float ang = a.no_rotary ? phi : phi + kMamba3Pi * tanhf(row[a.off_angles + j]) * dt;
        ang -= kMamba3TwoPi * floorf(ang / kMamba3TwoPi);
        angle[j] = ang;
        if (ia[m] >= 0 && ib[m] >= 0) sincosf(ang, &sn[hh][m], &cs[hh][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float ba[kPairSlots], bb[kPairSlots], ca[kPairSlots], cb[kPairSlots];
    load_normed_bc(a, row + a.off_B + (r * a.G + g) * N, row + a.off_C + (r * a.G + g) * N, ia, ib, ba, bb, ca, cb);
#pragma unroll
    for (int hh = 0; hh < kHeadsPerUnit; ++hh) {
      if (h0 + hh >= h1) break;
      emit_head(a, b, 0, r, h0 + hh, lane, ia, ib, ba, bb, ca, cb, [&](int m, float& s_, float& c_) {
        s_ = sn[hh][m];
        c_ = cs[hh][m];
      });
    }
  }
  if (lane < h1 - h0) write_scalars(a, row, b, 0, h0 + lane);
}

// Output stage (spec §7) of `rows` channels [p0, p0 + rows) of one token: y (RMAX, rows) in ybuf, z (rows), MIMO
// vectors (RMAX, rows); optional per-head norm (needs rows = P). Contains a barrier when the norm is on.
template <int RMAX>
__device__ void output_rows(const StageArgs& a, int h, int p0, int rows, const float* ybuf, const float* z,
                            const float* mz, const float* mo, float* misc, int64_t o_base) {
  const int R = a.R, tid = threadIdx.x, nthreads = blockDim.x, warp = tid / 32, lane = tid % 32, warps = nthreads / 32;
  if (a.p.norm) {
    for (int r = warp; r < R; r += warps) {
      float ss = 0.0f;
      for (int q = lane; q < rows; q += 32) ss += ybuf[r * rows + q] * ybuf[r * rows + q];
      ss = warp_sum(ss);
      if (lane == 0) misc[r] = rsqrtf(ss / float(a.P) + kMamba3NormEps);
    }
    __syncthreads();
  }
  for (int q = tid; q < rows; q += nthreads) {
    const int p = p0 + q;
    const float acc = gated_output(
        R, a.mimo, z[q],
        [&](int r) {
          const float y = ybuf[r * rows + q];
          return a.p.norm ? y * misc[r] * a.p.norm[h * a.P + p] : y;
        },
        [&](int r) { return mz[r * rows + q]; }, [&](int r) { return mo[r * rows + q]; });
    store_output(a.o, o_base + p, acc, a.o_bf16);
  }
}

// MIMO vectors of channels [p0, p0 + rows) as (RMAX, rows), 1 for SISO and for ranks ≥ R.
template <int RMAX>
__device__ void load_mimo(const StageArgs& a, int h, int p0, int rows, float* mx, float* mz, float* mo) {
  for (int r = 0; r < RMAX; ++r) {
    const bool use = a.mimo && r < a.R;
    const int64_t src = (int64_t(h) * a.R + r) * a.P + p0;
    for (int q = threadIdx.x; q < rows; q += blockDim.x) {
      mx[r * rows + q] = use ? a.p.mimo_x[src + q] : 1.0f;
      mz[r * rows + q] = use ? a.p.mimo_z[src + q] : 1.0f;
      mo[r * rows + q] = use ? a.p.mimo_o[src + q] : 1.0f;
    }
  }
}

// Floats of one prefill ring slot: k (R, N), q (R, N), x (P), z (P), scalars (4).
__host__ __device__ inline int slot_floats(int R, int N, int P) { return (2 * R * N + 2 * P + 4 + 3) / 4 * 4; }

// Prefill state kernel: one block per (b, h); warp w owns channels [8w, 8w + 8), lane l state channels l + 32j; the
// P×N state sits in registers. Ring slot s holds token s − 1's k, q, x, z, α/β/γ (slot 0: the cached k_{−1}, x_{−1});
// slots s + 2 and s + 3 are in flight (cp.async) while token s − 1... is computed, so no global latency is on the
// per-token path. Per token: 2 barriers (3 with the output norm), ≈ 4·R·P·N FMAs, reads 2·R·N + 2·P + 4 floats.
template <int NPT, int RMAX>
__global__ void __launch_bounds__(kMaxThreads) mamba3_stream_kernel(StageArgs a) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int H = a.H, P = a.P, N = a.N, R = a.R, Lc = a.Lc;
  const int b = blockIdx.x / H, h = blockIdx.x % H;
  // Decode falls back to this kernel when the decode kernel does not apply: an inactive row returns (block-uniform,
  // before any barrier or copy).
  if (mamba3_row_skipped(a.st, a.L, b)) return;
  const int tid = threadIdx.x, nthreads = blockDim.x, warp = tid / 32, lane = tid % 32;
  const int sf = slot_floats(R, N, P), RN = R * N;
  float* ring = smem;
  float* ybuf = ring + kRing * sf;  // (RMAX, P)
  float* mx = ybuf + RMAX * P;
  float* mz = mx + RMAX * P;
  float* mo = mz + RMAX * P;
  float* misc = mo + RMAX * P;  // [16]
  const int64_t bh = int64_t(b) * H + h, rhn = int64_t(R) * H * N;
  load_mimo<RMAX>(a, h, 0, P, mx, mz, mo);

  auto issue = [&](int s) {
    if (s <= Lc) {
      float* buf = ring + (s & (kRing - 1)) * sf;
      const float* ksrc = a.sg.k + (int64_t(b) * (Lc + 1) + s) * rhn + int64_t(h) * N;
      for (int r = 0; r < R; ++r)
        for (int n = tid; n < N; n += nthreads) copy4(buf + r * N + n, ksrc + int64_t(r) * H * N + n);
      if (s == 0) {
        for (int p = tid; p < P; p += nthreads) copy4(buf + 2 * RN + p, a.st.v + bh * P + p);
      } else {
        const float* qsrc = a.sg.q + (int64_t(b) * Lc + s - 1) * rhn + int64_t(h) * N;
        for (int r = 0; r < R; ++r)
          for (int n = tid; n < N; n += nthreads) copy4(buf + RN + r * N + n, qsrc + int64_t(r) * H * N + n);
        const float* row = zx_row(a, b, s - 1);
        for (int p = tid; p < P; p += nthreads) {
          copy4(buf + 2 * RN + p, row + a.off_x + h * P + p);
          copy4(buf + 2 * RN + P + p, row + h * P + p);
        }
        if (tid < 4) copy4(buf + 2 * RN + 2 * P + tid, a.sg.scal + ((int64_t(b) * Lc + s - 1) * H + h) * 4 + tid);
      }
    }
    __pipeline_commit();  // one group per slot, empty past the segment, so the wait counts stay uniform
  };
  issue(0);
  issue(1);
  issue(2);

  float hs[kRowsPerWarp][NPT];
  const float* ssm_in = a.st.ssm + bh * P * N;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int p = warp * kRowsPerWarp + i;
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      const int n = lane + 32 * j;
      hs[i][j] = (p < P && n < N) ? ssm_in[int64_t(p) * N + n] : 0.0f;
    }
  }
  const float Dh = a.p.D[h];

  for (int tl = 0; tl < Lc; ++tl) {
    issue(tl + 3);  // into the slot of token tl − 2, last read before the previous token's second barrier
    __pipeline_wait_prior(2);
    __syncthreads();
    const float* prev = ring + (tl & (kRing - 1)) * sf;
    const float* cur = ring + ((tl + 1) & (kRing - 1)) * sf;
    const float* kp = prev;
    const float* xp = prev + 2 * RN;
    const float* kc = cur;
    const float* qc = cur + RN;
    const float* xc = cur + 2 * RN;
    const float* zc = cur + 2 * RN + P;
    const float alpha = cur[2 * RN + 2 * P], beta = cur[2 * RN + 2 * P + 1], gamma = cur[2 * RN + 2 * P + 2];

    // h ← α h + β Σ_r v_prev,r k_prev,rᵀ + γ Σ_r v_r k_rᵀ and y_r = h q_r + D v_r (spec §4.1).
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int p = warp * kRowsPerWarp + i;
      if (p >= P) break;  // warp-uniform
      float vprev[RMAX], vcur[RMAX], part[RMAX];
#pragma unroll
      for (int r = 0; r < RMAX; ++r) {
        vprev[r] = r < R ? beta * mx[r * P + p] * xp[p] : 0.0f;
        vcur[r] = r < R ? gamma * mx[r * P + p] * xc[p] : 0.0f;
        part[r] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < NPT; ++j) {
        const int n = lane + 32 * j;
        if (n < N) {
          float hv = alpha * hs[i][j];
#pragma unroll
          for (int r = 0; r < RMAX; ++r)
            if (r < R) hv += vprev[r] * kp[r * N + n] + vcur[r] * kc[r * N + n];
          hs[i][j] = hv;
#pragma unroll
          for (int r = 0; r < RMAX; ++r)
            if (r < R) part[r] += hv * qc[r * N + n];
        }
      }
#pragma unroll
      for (int r = 0; r < RMAX; ++r) {
        if (r < R) {
          const float y = warp_sum(part[r]);
          if (lane == 0) ybuf[r * P + p] = y + Dh * mx[r * P + p] * xc[p];
        }
      }
    }
    __syncthreads();
    output_rows<RMAX>(a, h, 0, P, ybuf, zc, mz, mo, misc, (int64_t(b) * a.L + a.t0 + tl) * a.d_inner + int64_t(h) * P);
  }

  float* ssm_out = a.st.ssm + bh * P * N;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int p = warp * kRowsPerWarp + i;
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      const int n = lane + 32 * j;
      if (p < P && n < N) ssm_out[int64_t(p) * N + n] = hs[i][j];
    }
  }
  // The last token's x becomes the cache (its k was stored by the staging kernel, its φ by the angle scan).
  const float* xlast = ring + (Lc & (kRing - 1)) * sf + 2 * RN;
  for (int p = tid; p < P; p += nthreads) a.st.v[bh * P + p] = xlast[p];
}

// Shared floats of the prefill state kernel.
size_t stream_shared_floats(int R, int N, int P, int rmax) {
  return size_t(kRing) * slot_floats(R, N, P) + 4 * size_t(rmax) * P + 16;
}

// Decode state kernel (L = 1), memory-bound: one block per (b, h, chunk of `rows` channels). The block's rows×N
// state slice, the staged k_{−1}, k, q, x_{−1}, x, z and α/β/γ all arrive by cp.async in one group; then each warp
// updates its channels straight from shared memory to global, reduces y, and the output stage runs for the chunk.
// No block reads what another writes: x_{−1} and x of a chunk are its own channels; k and φ were stored by the
// earlier kernels. Bytes: 2·rows·N·4 state + (3·R·N + 3·rows + 4)·4 per block.
template <int RMAX>
__global__ void __launch_bounds__(256) mamba3_stream_decode_kernel(StageArgs a, int rows) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int H = a.H, P = a.P, N = a.N, R = a.R, RN = R * N;
  const int chunks = P / rows, item = blockIdx.x / chunks, p0 = (blockIdx.x % chunks) * rows;
  const int b = item / H, h = item % H;
  if (mamba3_row_skipped(a.st, a.L, b)) return;  // an inactive row (block-uniform, before any copy or barrier)
  const int tid = threadIdx.x, nthreads = blockDim.x, warp = tid / 32, lane = tid % 32, warps = nthreads / 32;
  float* hsm = smem;         // (rows, N); rows·N is a multiple of 4
  float* kp = hsm + rows * N;  // (R, N)
  float* kc = kp + RN;
  float* qc = kc + RN;
  float* xp = qc + RN;  // (rows)
  float* xc = xp + rows;
  float* zc = xc + rows;
  float* sc = zc + rows;   // 4
  float* ybuf = sc + 4;    // (RMAX, rows)
  float* mx = ybuf + RMAX * rows;
  float* mz = mx + RMAX * rows;
  float* mo = mz + RMAX * rows;
  float* misc = mo + RMAX * rows;  // 16

  const int64_t base = (int64_t(item) * P + p0) * N, rhn = int64_t(R) * H * N;
  const float4* src = reinterpret_cast<const float4*>(a.st.ssm + base);
  for (int i = tid; i < rows * N / 4; i += nthreads) __pipeline_memcpy_async(hsm + 4 * i, src + i, 16);
  const float* k0 = a.sg.k + int64_t(b) * 2 * rhn + int64_t(h) * N;  // slot 0 (k_{−1}); slot 1 follows after rhn
  const float* qs = a.sg.q + int64_t(b) * rhn + int64_t(h) * N;
  for (int r = 0; r < R; ++r) {
    for (int n = tid; n < N; n += nthreads) {
      const int64_t off = int64_t(r) * H * N + n;
      copy4(kp + r * N + n, k0 + off);
      copy4(kc + r * N + n, k0 + rhn + off);
      copy4(qc + r * N + n, qs + off);
    }
  }
  const float* row = a.zx + int64_t(b) * a.d_in;
  for (int i = tid; i < rows; i += nthreads) {
    copy4(xp + i, a.st.v + int64_t(item) * P + p0 + i);
    copy4(xc + i, row + a.off_x + h * P + p0 + i);
    copy4(zc + i, row + h * P + p0 + i);
  }
  if (tid < 4) copy4(sc + tid, a.sg.scal + int64_t(item) * 4 + tid);
  __pipeline_commit();
  load_mimo<RMAX>(a, h, p0, rows, mx, mz, mo);
  const float Dh = a.p.D[h];
  __pipeline_wait_prior(0);
  __syncthreads();

  const float alpha = sc[0], beta = sc[1], gamma = sc[2];
  float* ssm_out = a.st.ssm + base;
  for (int i = warp; i < rows; i += warps) {
    float vprev[RMAX], vcur[RMAX], part[RMAX];
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      vprev[r] = r < R ? beta * mx[r * rows + i] * xp[i] : 0.0f;
      vcur[r] = r < R ? gamma * mx[r * rows + i] * xc[i] : 0.0f;
      part[r] = 0.0f;
    }
    for (int n = lane; n < N; n += 32) {
      float hv = alpha * hsm[i * N + n];
#pragma unroll
      for (int r = 0; r < RMAX; ++r)
        if (r < R) hv += vprev[r] * kp[r * N + n] + vcur[r] * kc[r * N + n];
      ssm_out[int64_t(i) * N + n] = hv;
#pragma unroll
      for (int r = 0; r < RMAX; ++r)
        if (r < R) part[r] += hv * qc[r * N + n];
    }
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      if (r < R) {
        const float y = warp_sum(part[r]);
        if (lane == 0) ybuf[r * rows + i] = y + Dh * mx[r * rows + i] * xc[i];
      }
    }
  }
  __syncthreads();
  output_rows<RMAX>(a, h, p0, rows, ybuf, zc, mz, mo, misc, int64_t(b) * a.d_inner + int64_t(h) * P);
  for (int i = tid; i < rows; i += nthreads) a.st.v[int64_t(item) * P + p0 + i] = xc[i];
}

size_t decode_shared_floats(int rows, int R, int N, int rmax) {
  return size_t(rows) * N + 3 * size_t(R) * N + 3 * size_t(rows) + 4 + 4 * size_t(rmax) * rows + 16;
}

constexpr size_t kMaxShared = 200 * 1024;

template <typename Kernel>
void allow_shared(Kernel k, bool& raised) {
  if (!raised) {  // the dynamic shared-memory limit (48 KB by default), raised once per instantiation
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxShared)));
    raised = true;
  }
}

template <int NPT, int RMAX>
void launch_stream(cudaStream_t s, const StageArgs& a, int blocks) {
  static bool raised = false;
  allow_shared(mamba3_stream_kernel<NPT, RMAX>, raised);
  const int threads = std::max(64, ((a.P + kRowsPerWarp - 1) / kRowsPerWarp) * 32);
  const size_t bytes = stream_shared_floats(a.R, a.N, a.P, RMAX) * sizeof(float);
  mamba3_stream_kernel<NPT, RMAX><<<blocks, threads, bytes, s>>>(a);
  MAMBA3_LAUNCH_CHECK();
}

template <int RMAX>
void launch_stream_for_state(cudaStream_t s, const StageArgs& a, int blocks) {
  if (a.N <= 32)
    launch_stream<1, RMAX>(s, a, blocks);
  else if (a.N <= 64)
    launch_stream<2, RMAX>(s, a, blocks);
  else if (a.N <= 128)
    launch_stream<4, RMAX>(s, a, blocks);
  else
    launch_stream<8, RMAX>(s, a, blocks);
}

// Head channels per decode block: chunks of 16 (4× the blocks of whole heads, so more state copies in flight per SM;
// the staging is no longer repeated per chunk) unless the per-head output norm needs the whole head.
int decode_rows(const StageArgs& a) { return !a.p.norm && a.P % kDecodeRows == 0 ? kDecodeRows : a.P; }

template <int RMAX>
bool try_launch_decode(cudaStream_t s, const StageArgs& a, int items) {
  const int rows = decode_rows(a);
  const size_t bytes = decode_shared_floats(rows, a.R, a.N, RMAX) * sizeof(float);
  const bool aligned = reinterpret_cast<uintptr_t>(a.st.ssm) % 16 == 0 && (size_t(rows) * a.N) % 4 == 0;
  if (a.Lc != 1 || a.L != 1 || !aligned || bytes > kMaxShared) return false;
  static bool raised = false;
  allow_shared(mamba3_stream_decode_kernel<RMAX>, raised);
  const int threads = rows == kDecodeRows ? 128 : 256;
  mamba3_stream_decode_kernel<RMAX><<<items * (a.P / rows), threads, bytes, s>>>(a, rows);
  MAMBA3_LAUNCH_CHECK();
  return true;
}

int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }


}  // namespace

int64_t mamba3_gpu_stage_floats(const Mamba3Config& c, int64_t batch, int64_t tokens) {
  const int64_t H = c.nheads(), S = c.num_angles(), RHN = c.rank() * H * c.d_state;
  return round4(batch * tokens * H * S) + round4(batch * (tokens + 1) * RHN) + round4(batch * tokens * RHN) +
         batch * tokens * H * 4;
}

Mamba3GpuStage mamba3_gpu_stage_view(const Mamba3Config& c, float* base, int64_t batch, int64_t tokens) {
  const int64_t H = c.nheads(), S = c.num_angles(), RHN = c.rank() * H * c.d_state;
  Mamba3GpuStage v;
  v.phi = base;
  v.k = v.phi + round4(batch * tokens * H * S);
  v.q = v.k + round4(batch * (tokens + 1) * RHN);
  v.scal = v.q + round4(batch * tokens * RHN);
  v.tokens = tokens;
  return v;
}

int64_t mamba3_gpu_stage_tokens(const Mamba3Config& c, int64_t batch, int64_t L, size_t max_bytes) {
  const int64_t per_token = batch * (c.nheads() * c.num_angles() + 2 * c.rank() * c.nheads() * c.d_state +
                                     4 * c.nheads()) * 4;
  return std::clamp<int64_t>(int64_t(max_bytes) / std::max<int64_t>(per_token, 1), 1, std::max<int64_t>(L, 1));
}

void mamba3_staged_gpu(cudaStream_t s, const Mamba3Config& c, const Mamba3GpuParams& p, int64_t batch, int64_t L,
                       const float* zx, Mamba3GpuState state, void* o, Precision o_precision,
                       const Mamba3GpuStage& prefill_stage, bool chunked_prefill) {
  const Mamba3GpuStage& stage = L == 1 ? state.stage : prefill_stage;
  MAMBA3_CHECK(stage.tokens >= 1 && stage.phi && stage.k && stage.q && stage.scal,
               "Mamba-3 CUDA staged path: no stage scratch for {} tokens", L);
  StageArgs a{};
  static_cast<Mamba3KernelShape&>(a) = mamba3_kernel_shape(c, L, o_precision);
  a.p = p;
  a.zx = zx;
  a.st = state;
  a.sg = stage;
  a.o = o;
  // Heads per staging warp: a warp walks its heads one after another, each head's loads waiting on global memory, so
  // a decode step of few sequences (too few warps to overlap them) gives every warp one head; larger launches share
  // the B/C norm of a group over 4 heads (1.5B, 64 heads: one head per warp up to 32 sequences).
  const int64_t hg = a.H / a.G, hpu = L == 1 && batch * a.H <= kFewHeadsDecode ? 1 : kHeadsPerUnit;
  const int64_t chunks = (hg + hpu - 1) / hpu;
  const int items = int(batch * a.H);
  for (int64_t t0 = 0; t0 < L; t0 += stage.tokens) {
    a.t0 = int(t0);
    a.Lc = int(std::min<int64_t>(stage.tokens, L - t0));
    if (a.L == 1) {  // decode: one kernel per layer stages and steps each head
      Mamba3DecodeArgs da{};
      static_cast<Mamba3KernelShape&>(da) = a;
      da.p = a.p, da.zx = a.zx, da.st = a.st, da.o = a.o;
      if (mamba3_decode_step_gpu(s, da, batch)) continue;  // else out of reach: staging + the cp.async kernel
    }
    const int64_t warps_per_block = kStageThreads / 32;
    // SISO decode: angles and staging in one launch (1.5B b128: 21.6 µs per layer against 6.4 + 20.7). MIMO keeps the
    // two kernels: one warp staging every rank was no faster at b128 (73 vs 68 + 6.4 µs) and far slower at batch 1.
    if (a.L == 1 && a.R == 1) {
      const int64_t units = batch * a.G * chunks;
      MAMBA3_CHECK(units < (int64_t(1) << 31), "Mamba-3 CUDA staged path: batch {} too large", batch);
      const unsigned blocks = unsigned((units + warps_per_block - 1) / warps_per_block);
      launch_pdl(pdl_small(batch), mamba3_stage_decode_kernel, blocks, kStageThreads, 0, s, a, int(hpu), int(chunks),
                 int(units));
    } else {
      const int64_t angles = batch * a.H * a.S;
      MAMBA3_CHECK(angles < (int64_t(1) << 31), "Mamba-3 CUDA staged path: batch {} too large", batch);
      mamba3_angle_kernel<<<int((angles + 255) / 256), 256, 0, s>>>(a, int(angles));
      MAMBA3_LAUNCH_CHECK();
      const int64_t units = batch * a.Lc * a.R * a.G * chunks;
      MAMBA3_CHECK(units < (int64_t(1) << 31), "Mamba-3 CUDA staged path: {} staging units", units);
      mamba3_stage_kernel<<<int((units + warps_per_block - 1) / warps_per_block), kStageThreads, 0, s>>>(
          a, int(hpu), int(chunks), int(units));
      MAMBA3_LAUNCH_CHECK();
    }
    const bool decoded = a.R == 1 ? try_launch_decode<1>(s, a, items) : try_launch_decode<4>(s, a, items);
    if (decoded) continue;
    if (chunked_prefill && a.L > 1) {
      Mamba3ChunkArgs ca{};
      static_cast<Mamba3KernelShape&>(ca) = a;
      ca.t0 = a.t0, ca.Lc = a.Lc, ca.p = a.p, ca.zx = a.zx, ca.st = a.st, ca.sg = a.sg, ca.o = a.o;
      if (mamba3_chunk_gpu(s, ca, batch)) continue;  // else the shape is out of its reach: the stream kernel
    }
    if (a.R == 1)
      launch_stream_for_state<1>(s, a, items);
    else
      launch_stream_for_state<4>(s, a, items);
  }
}

}  // namespace mamba3::cuda
