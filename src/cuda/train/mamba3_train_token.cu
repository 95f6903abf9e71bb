// Per-token kernels of the Mamba-3 mixer's GPU training pass: B/C normalisation, the scalars of spec §2.2, the angle
// scan, and on the way back the angle/scalar gradients, the B/C RMSNorm backward and deterministic column sums.
// All f32 with the CPU's formulas (src/ops/mamba3_common.h, mamba3_scan_backward.cpp).
#include "cuda/cuda_check.h"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_math.cuh"

namespace mamba3::cuda::train_detail {

namespace {

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// One block per row; warps take the (which, r, g) vectors. Reads 2·R·G·N + din, writes din floats per row.
__global__ void normalize_bc_kernel(MixerDims d, const float* __restrict__ zx_raw, const float* __restrict__ B_norm,
                                    const float* __restrict__ C_norm, float* __restrict__ zx) {
  const int64_t m = blockIdx.x;
  const float* src = zx_raw + m * d.din;
  float* dst = zx + m * d.din;
  for (int e = threadIdx.x; e < d.din; e += blockDim.x)
    if (e < d.off_B || e >= d.off_dt) dst[e] = src[e];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32, RG = d.R * d.G;
  for (int item = warp; item < 2 * RG; item += warps) {
    const int off = (item < RG ? d.off_B : d.off_C) + (item % RG) * d.N;
    const float* w = item < RG ? B_norm : C_norm;
    float ss = 0;
    for (int n = lane; n < d.N; n += 32) ss += src[off + n] * src[off + n];
    const float r = 1.0f / sqrtf(warp_sum(ss) / float(d.N) + kEps);
    for (int n = lane; n < d.N; n += 32) dst[off + n] = src[off + n] * r * w[n];
  }
}

// One thread per (bh, t).
__global__ void token_scalars_kernel(MixerDims d, const float* __restrict__ zx, const float* __restrict__ dt_bias,
                                     TokenScalars out) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * d.L) return;
  const int64_t bh = e / d.L, t = e % d.L;
  const int b = int(bh / d.H), h = int(bh % d.H);
  const float* dd = zx + (int64_t(b) * d.L + t) * d.din + d.off_dt;
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

// The angle scan φ_t = wrap(φ_{t−1} + π·tanh(θ_t)·Δ_t): one thread per (bh, i) walks t, with only the adds and
// wraps on its dependency chain: the inputs of kAhead tokens are loaded and tanh'd before their adds (the loads of a
// one-token loop body waited ~0.6 µs each: 1.3 ms per call at 125M), and φ is stored (into sn) for the elementwise
// cos/sin pass. The chain does the one-pass kernel's operations in its order: the same φ bit for bit.
constexpr int kAhead = 8;
__global__ void angle_scan_kernel(MixerDims d, const float* __restrict__ zx, const float* __restrict__ dt,
                                  float* __restrict__ phi_out) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * d.S) return;
  const int64_t bh = e / d.S;
  const int i = int(e % d.S), b = int(bh / d.H);
  float phi = 0;
  for (int t0 = 0; t0 < d.L; t0 += kAhead) {
    float th[kAhead], dv[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      const int t = min(t0 + k, d.L - 1);
      th[k] = d.no_rotary ? 0.0f : kPi * tanhf(zx[(int64_t(b) * d.L + t) * d.din + d.off_ang + i]);
      dv[k] = dt[bh * d.L + t];
    }
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (t0 + k >= d.L) break;
      if (!d.no_rotary) phi += th[k] * dv[k];
      phi -= kTwoPi * floorf(phi / kTwoPi);
      phi_out[(bh * d.L + t0 + k) * d.S + i] = phi;
    }
  }
}

// cos/sin of the scanned angles, one thread per (bh, t, i); φ arrives in sn.
__global__ void angle_sincos_kernel(int64_t n, float* __restrict__ cs, float* __restrict__ sn) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  const float phi = sn[e];
  cs[e] = cosf(phi);
  sn[e] = sinf(phi);
}

// The angle backward, step 1: dΦ_t = Σ_{t' ≥ t} dφ_{t'} in place, one thread per (bh, i) walking t backwards with the
// loads of kAhead tokens issued before their adds (the same adds in the same order as the one-warp-per-bh kernel).
__global__ void angle_grad_suffix_kernel(MixerDims d, float* __restrict__ dphi) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= int64_t(d.B) * d.H * d.S) return;
  const int64_t bh = e / d.S;
  const int i = int(e % d.S);
  float* g = dphi + bh * d.L * d.S + i;
  float run = 0;
  for (int t1 = d.L - 1; t1 >= 0; t1 -= kAhead) {
    float v[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) v[k] = g[int64_t(max(t1 - k, 0)) * d.S];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (t1 - k < 0) break;
      run += v[k];
      g[int64_t(t1 - k) * d.S] = run;
    }
  }
}

// Step 2, one warp per (bh, t): lanes take the angles (dθ per head, Δ's angle share summed over the warp), then lane
// 0 finishes the token's scalar gradients (spec §2.2 chain: scale_t = γ_t + σ̄_{t+1}, γ = λΔ, σ̄ = (1−λ)Δ, A·Δ).
__global__ void angle_scalar_token_kernel(AngleBackwardParams p) {
  const MixerDims& d = p.d;
  const int lane = threadIdx.x % 32;
  const int64_t st = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (st >= int64_t(d.B) * d.H * d.L) return;  // whole warps leave together
  const int64_t bh = st / d.L;
  const int t = int(st % d.L), b = int(bh / d.H), h = int(bh % d.H);
  const int64_t row = int64_t(b) * d.L + t;
  const float dtv = p.dt[st];
  float ang = 0;
  for (int i = lane; i < d.S; i += 32) {
    const float dPhi = p.dphi[st * d.S + i];
    float g = 0;
    // no_rotary: the increments are 0 whatever θ and Δ are, so neither gets a gradient from the angles.
    if (!d.no_rotary) {
      const float th = tanhf(p.zx[row * d.din + d.off_ang + i]);
      ang += dPhi * kPi * th;
      g = dPhi * kPi * dtv * (1.0f - th * th);
    }
    p.dth[(row * d.H + h) * d.S + i] = g;
  }
  ang = warp_sum(ang);
  if (lane == 0) {
    const float lam = p.lam[st], dadt = p.dadt[st];
    const float dgam = p.dgam[st] + p.dscale[st];
    const float dsig = t > 0 ? p.dscale[st - 1] : 0.0f;  // training starts from the zero state: no σ̄_0 pair
    const float ddt = dadt * p.A[st] + dgam * lam + dsig * (1.0f - lam) + ang;
    const float dlam = (dgam - dsig) * dtv;
    const float dsp = ddt * p.dsp[st];
    float* dz = p.dzx + row * d.din;
    dz[d.off_dt + h] = dsp;
    dz[d.off_A + h] = dadt * dtv * p.dAdl[st];
    dz[d.off_trap + h] = d.euler ? 0.0f : dlam * lam * (1.0f - lam);  // euler: λ does not depend on trap
  }
}

// Step 3: the dt_bias partial per bh, Σ over t from last to first (the one-warp kernel's order), one thread per bh.
__global__ void dt_bias_partial_kernel(AngleBackwardParams p) {
  const MixerDims& d = p.d;
  const int64_t bh = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bh >= int64_t(d.B) * d.H) return;
  const int b = int(bh / d.H), h = int(bh % d.H);
  const float* col = p.dzx + int64_t(b) * d.L * d.din + d.off_dt + h;
  float dtb = 0;
  for (int t1 = d.L - 1; t1 >= 0; t1 -= kAhead) {
    float v[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) v[k] = col[int64_t(max(t1 - k, 0)) * d.din];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      if (t1 - k < 0) break;
      dtb += v[k];
    }
  }
  p.part_dt_bias[bh] = dtb;
}

// One block per row; warps take the (which, r, g) vectors: acc = Σ_{h ∈ g} dBn/dCn, then the RMSNorm backward.
__global__ void bc_norm_backward_kernel(MixerDims d, const float* __restrict__ zx_raw,
                                        const float* __restrict__ B_norm, const float* __restrict__ C_norm,
                                        const float* __restrict__ dBn, const float* __restrict__ dCn,
                                        const float* __restrict__ dth, float* __restrict__ dzx,
                                        float* __restrict__ part_B, float* __restrict__ part_C) {
  const int64_t m = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32, RG = d.R * d.G;
  const int hpg = d.H / d.G;
  for (int item = warp; item < 2 * RG; item += warps) {
    const bool isB = item < RG;
    const int rg = item % RG, r = rg / d.G, g = rg % d.G;
    const int off = (isB ? d.off_B : d.off_C) + rg * d.N;
    const float* x = zx_raw + m * d.din + off;
    const float* w = isB ? B_norm : C_norm;
    const float* src = (isB ? dBn : dCn) + m * d.H * d.R * d.N;
    float* part = (isB ? part_B : part_C) + (m * RG + rg) * d.N;
    auto group_sum = [&](int n) {
      float acc = 0;
      for (int h = g * hpg; h < (g + 1) * hpg; ++h) acc += src[(int64_t(h) * d.R + r) * d.N + n];
      return acc;
    };
    float ss = 0;
    for (int n = lane; n < d.N; n += 32) ss += x[n] * x[n];
    const float rstd = 1.0f / sqrtf(warp_sum(ss) / float(d.N) + kEps);
    float mean = 0;
    for (int n = lane; n < d.N; n += 32) {
      const float acc = group_sum(n);
      part[n] = acc * x[n] * rstd;
      mean += acc * w[n] * x[n] * rstd;
    }
    mean = warp_sum(mean) / float(d.N);
    for (int n = lane; n < d.N; n += 32) dzx[m * d.din + off + n] = rstd * (group_sum(n) * w[n] - x[n] * rstd * mean);
  }
  for (int i = threadIdx.x; i < d.S; i += blockDim.x) {
    float a = 0;
    for (int h = 0; h < d.H; ++h) a += dth[(m * d.H + h) * d.S + i];
    dzx[m * d.din + d.off_ang + i] = a;
  }
}

// Block (32, 8): 32 columns, 8 row phases summed in a fixed order; grid (column tiles, row segments).
constexpr int kSegRows = 1024;
__global__ void colsum_kernel(const float* __restrict__ in, int64_t rows, int64_t cols, int64_t seg_rows,
                              float* __restrict__ out, bool accumulate) {
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

}  // namespace

void launch_normalize_bc(cudaStream_t s, const MixerDims& d, const float* zx_raw, const float* B_norm,
                         const float* C_norm, float* zx) {
  normalize_bc_kernel<<<unsigned(int64_t(d.B) * d.L), 256, 0, s>>>(d, zx_raw, B_norm, C_norm, zx);
  MAMBA3_LAUNCH_CHECK();
}

void launch_token_scalars(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt_bias, TokenScalars out) {
  token_scalars_kernel<<<blocks_for(int64_t(d.B) * d.H * d.L, 256), 256, 0, s>>>(d, zx, dt_bias, out);
  MAMBA3_LAUNCH_CHECK();
}

void launch_angles(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, float* cs, float* sn) {
  const int64_t lanes = int64_t(d.B) * d.H * d.S, n = lanes * d.L;
  if (n == 0) return;
  // 32-thread blocks: B·H·S chains (6144 at 125M) spread over every SM rather than a third of them.
  angle_scan_kernel<<<blocks_for(lanes, 32), 32, 0, s>>>(d, zx, dt, sn);
  MAMBA3_LAUNCH_CHECK();
  angle_sincos_kernel<<<blocks_for(n, 256), 256, 0, s>>>(n, cs, sn);
  MAMBA3_LAUNCH_CHECK();
}

void launch_angle_scalar_backward(cudaStream_t s, const AngleBackwardParams& p) {
  const MixerDims& d = p.d;
  const int64_t BH = int64_t(d.B) * d.H, lanes = BH * d.S;
  if (BH * d.L == 0) return;
  if (lanes > 0) {
    angle_grad_suffix_kernel<<<blocks_for(lanes, 32), 32, 0, s>>>(d, p.dphi);
    MAMBA3_LAUNCH_CHECK();
  }
  angle_scalar_token_kernel<<<blocks_for(BH * d.L, 8), 256, 0, s>>>(p);
  MAMBA3_LAUNCH_CHECK();
  dt_bias_partial_kernel<<<blocks_for(BH, 32), 32, 0, s>>>(p);
  MAMBA3_LAUNCH_CHECK();
}

void launch_bc_norm_backward(cudaStream_t s, const MixerDims& d, const float* zx_raw, const float* B_norm,
                             const float* C_norm, const float* dBn, const float* dCn, const float* dth, float* dzx,
                             float* part_B_norm, float* part_C_norm) {
  bc_norm_backward_kernel<<<unsigned(int64_t(d.B) * d.L), 256, 0, s>>>(d, zx_raw, B_norm, C_norm, dBn, dCn, dth, dzx,
                                                                       part_B_norm, part_C_norm);
  MAMBA3_LAUNCH_CHECK();
}

size_t colsum_scratch_floats(int64_t rows, int64_t cols) {
  const int64_t segs = (rows + kSegRows - 1) / kSegRows;
  return segs > 1 ? size_t(segs * cols) : 1;
}

void colsum_add(cudaStream_t s, const float* in, int64_t rows, int64_t cols, float* out, float* scratch) {
  if (rows == 0 || cols == 0) return;
  const int64_t segs = (rows + kSegRows - 1) / kSegRows;
  const dim3 block(32, 8);
  const unsigned tiles = unsigned((cols + 31) / 32);
  if (segs == 1) {
    colsum_kernel<<<dim3(tiles, 1), block, 0, s>>>(in, rows, cols, rows, out, true);
    MAMBA3_LAUNCH_CHECK();
    return;
  }
  // Two levels: fixed segments of kSegRows rows into scratch (segs, cols), then the segments into out.
  colsum_kernel<<<dim3(tiles, unsigned(segs)), block, 0, s>>>(in, rows, cols, kSegRows, scratch, false);
  MAMBA3_LAUNCH_CHECK();
  colsum_kernel<<<dim3(tiles, 1), block, 0, s>>>(scratch, segs, cols, segs, out, true);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda::train_detail
