// The attention core of the GPU attention mixer's training pass: a streaming (flash-attention style) forward that
// keeps the log-sum-exp per (row, head), and a deterministic backward in two kernels that recompute the
// probabilities from it — dq per query, dk/dv per key (summing the GQA group's query heads in order). No
// atomics; f32 on CUDA cores throughout (correctness first: no tensor cores).
//
// Tiling shared by the three kernels: a block holds kWarps rows (queries, or keys for dk/dv), one per warp, and
// streams the other side through shared memory in tiles of 32 (one per lane). A lane computes the dot products of
// its tile row (serial over channels, rows padded to an odd stride so the 32 lanes hit 32 banks); the warp then
// accumulates its own row's result with lane ℓ owning channels ℓ, ℓ + 32, … (the tile value broadcast by shuffle).
// Only O(tile·hd) is ever held: no L×L matrix.
#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/attention_train_kernels.h"

namespace mamba3::cuda::attn_train {
namespace {

constexpr int kWarps = 8;                         // rows per block
constexpr int kTile = 32;                         // streamed rows per tile (one per lane)
constexpr int kPerLane = int(kMaxHeadDim / 32);   // channels per lane

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Odd row stride for tiles read row-per-lane (conflict-free banks).
__host__ __device__ __forceinline__ int64_t padded(int64_t hd) { return hd | 1; }

struct CoreArgs {
  Dims d;
  const float *q, *k, *v;  // (B·L, H, hd), (B·L, Hkv, hd) ×2
  float* o;                // forward out / backward: saved out (read), row stride o_ld
  int64_t o_ld;
  float* lse;              // (B·L, H)
  const float* dout;       // (B·L, ·) stride dout_ld, head h at column h·hd
  int64_t dout_ld;
  float* dvec;             // (B·L, H): dout·o
  float *dq, *dk, *dv;
};

// Loads rows j0 … j0 + 31 of kv head kvh of sequence b (zeros past L) into tile (row stride ld).
__device__ __forceinline__ void load_kv_tile(const float* src, const Dims& d, int64_t b, int64_t kvh, int64_t j0,
                                             float* tile, int64_t ld) {
  const int64_t hd = d.hd;
  for (int64_t idx = threadIdx.x; idx < kTile * hd; idx += blockDim.x) {
    const int64_t jj = idx / hd, c = idx - jj * hd, j = j0 + jj;
    tile[jj * ld + c] = j < d.L ? src[((b * d.L + j) * d.Hkv + kvh) * hd + c] : 0.0f;
  }
}

// Forward. Grid (⌈L/kWarps⌉, H, B); warp w owns query t = blockIdx.x·kWarps + w and runs an online softmax over
// the key tiles (keys ≤ t when causal). Cost per (query, head): 4·nk·hd FLOPs; K/V tiles read once per block.
__global__ void __launch_bounds__(kWarps * 32) forward_kernel(CoreArgs a) {
  pdl_wait();
  extern __shared__ float smem[];
  const Dims& d = a.d;
  const int64_t hd = d.hd, ks = padded(hd), H = d.H, L = d.L;
  float* Ks = smem;            // (kTile, ks)
  float* Vs = Ks + kTile * ks;  // (kTile, hd)
  float* Qs = Vs + kTile * hd;  // (kWarps, hd)
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, t0 = int64_t(blockIdx.x) * kWarps, t = t0 + warp;
  const int64_t kvh = h / (H / d.Hkv), row = b * L + t;
  const bool active = t < L;
  float* qw = Qs + warp * hd;
  for (int64_t c = lane; c < hd; c += 32) qw[c] = active ? a.q[(row * H + h) * hd + c] : 0.0f;
  const int64_t nk_block = d.causal ? (t0 + kWarps < L ? t0 + kWarps : L) : L;
  const int64_t nk = !active ? 0 : (d.causal ? t + 1 : L);

  float m = -INFINITY, s = 0.0f, o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.0f;
  for (int64_t j0 = 0; j0 < nk_block; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and qw written, on the first pass)
    load_kv_tile(a.k, d, b, kvh, j0, Ks, ks);
    load_kv_tile(a.v, d, b, kvh, j0, Vs, hd);
    __syncthreads();
    float sc = -INFINITY;
    if (j0 + lane < nk) {
      const float* kr = Ks + lane * ks;
      float dot = 0.0f;
      for (int64_t c = 0; c < hd; ++c) dot += qw[c] * kr[c];
      sc = dot * d.scale;
    }
    const float m_new = fmaxf(m, warp_max(sc));
    if (m_new == -INFINITY) continue;  // warp-uniform: no visible key yet (an idle warp)
    const float corr = expf(m - m_new);  // 0 while m = −inf
    const float p = expf(sc - m_new);    // 0 for masked keys
    s = s * corr + warp_sum(p);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] *= corr;
    for (int jj = 0; jj < kTile; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      const float* vr = Vs + jj * hd;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t c = lane + 32 * i;
        if (c < hd) o[i] += pj * vr[c];
      }
    }
    m = m_new;
  }
  if (!active) return;
  const float inv = 1.0f / s;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < hd) a.o[row * a.o_ld + h * hd + c] = o[i] * inv;
  }
  if (lane == 0) a.lse[row * H + h] = m + logf(s);
}

// dvec[r, h] = dout[r, h]·o[r, h], channels in order (the CPU's do_t·o_t). Cost: 2·B·L·H·hd reads.
__global__ void dvec_kernel(CoreArgs a) {
  pdl_wait();
  const Dims& d = a.d;
  const int64_t n = d.B * d.L * d.H;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / d.H, h = i - r * d.H;
    const float* g = a.dout + r * a.dout_ld + h * d.hd;
    const float* o = a.o + r * a.o_ld + h * d.hd;
    float acc = 0.0f;
    for (int64_t c = 0; c < d.hd; ++c) acc += g[c] * o[c];
    a.dvec[i] = acc;
  }
}

// dq[t] = scale·Σ_j p_tj·(dout_t·v_j − dvec_t)·k_j, p_tj = exp(scale·q_t·k_j − lse_t). Grid and tiles as the
// forward. Cost per (query, head): 6·nk·hd FLOPs.
__global__ void __launch_bounds__(kWarps * 32) dq_kernel(CoreArgs a) {
  pdl_wait();
  extern __shared__ float smem[];
  const Dims& d = a.d;
  const int64_t hd = d.hd, ks = padded(hd), H = d.H, L = d.L;
  float* Ks = smem;             // (kTile, ks)
  float* Vs = Ks + kTile * ks;  // (kTile, ks)
  float* Qs = Vs + kTile * ks;  // (kWarps, hd)
  float* Gs = Qs + kWarps * hd;  // (kWarps, hd) dout rows
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int64_t b = blockIdx.z, h = blockIdx.y, t0 = int64_t(blockIdx.x) * kWarps, t = t0 + warp;
  const int64_t kvh = h / (H / d.Hkv), row = b * L + t;
  const bool active = t < L;
  float* qw = Qs + warp * hd;
  float* gw = Gs + warp * hd;
  for (int64_t c = lane; c < hd; c += 32) {
    qw[c] = active ? a.q[(row * H + h) * hd + c] : 0.0f;
    gw[c] = active ? a.dout[row * a.dout_ld + h * hd + c] : 0.0f;
  }
  const float lse = active ? a.lse[row * H + h] : 0.0f, dt = active ? a.dvec[row * H + h] : 0.0f;
  const int64_t nk_block = d.causal ? (t0 + kWarps < L ? t0 + kWarps : L) : L;
  const int64_t nk = !active ? 0 : (d.causal ? t + 1 : L);

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  for (int64_t j0 = 0; j0 < nk_block; j0 += kTile) {
    __syncthreads();
    load_kv_tile(a.k, d, b, kvh, j0, Ks, ks);
    load_kv_tile(a.v, d, b, kvh, j0, Vs, ks);
    __syncthreads();
    float ds = 0.0f;
    if (j0 + lane < nk) {
      const float* kr = Ks + lane * ks;
      const float* vr = Vs + lane * ks;
      float dot = 0.0f, dp = 0.0f;
      for (int64_t c = 0; c < hd; ++c) dot += qw[c] * kr[c];
      for (int64_t c = 0; c < hd; ++c) dp += gw[c] * vr[c];
      const float p = expf(dot * d.scale - lse);
      ds = p * (dp - dt) * d.scale;
    }
    for (int jj = 0; jj < kTile; ++jj) {
      const float dsj = __shfl_sync(0xffffffffu, ds, jj);
      const float* kr = Ks + jj * ks;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t c = lane + 32 * i;
        if (c < hd) acc[i] += dsj * kr[c];
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < hd) a.dq[(row * H + h) * hd + c] = acc[i];
  }
}

// dv[j] = Σ_{h ∈ group} Σ_t p_tj·dout_t, dk[j] = scale·Σ_h Σ_t p_tj·(dout_t·v_j − dvec_t)·q_t. Grid
// (⌈L/kWarps⌉, Hkv, B); warp w owns key j = blockIdx.x·kWarps + w; the group's query heads, then query tiles
// (from the tile holding the block's first key when causal), stream through shared memory in a fixed order.
// Cost per (key, kv head): 8·group·nq·hd FLOPs.
__global__ void __launch_bounds__(kWarps * 32) dkdv_kernel(CoreArgs a) {
  pdl_wait();
  extern __shared__ float smem[];
  const Dims& d = a.d;
  const int64_t hd = d.hd, ks = padded(hd), H = d.H, L = d.L, group = H / d.Hkv;
  float* Kw = smem;              // (kWarps, hd) the block's keys
  float* Vw = Kw + kWarps * hd;  // (kWarps, hd)
  float* Qs = Vw + kWarps * hd;  // (kTile, ks) query tile
  float* Gs = Qs + kTile * ks;   // (kTile, ks) dout tile
  float* Ls = Gs + kTile * ks;   // (kTile) lse
  float* Ds = Ls + kTile;        // (kTile) dvec
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int64_t b = blockIdx.z, kvh = blockIdx.y, j0 = int64_t(blockIdx.x) * kWarps, j = j0 + warp;
  const bool active = j < L;
  const int64_t krow = b * L + j;
  float* kw = Kw + warp * hd;
  float* vw = Vw + warp * hd;
  for (int64_t c = lane; c < hd; c += 32) {
    kw[c] = active ? a.k[(krow * d.Hkv + kvh) * hd + c] : 0.0f;
    vw[c] = active ? a.v[(krow * d.Hkv + kvh) * hd + c] : 0.0f;
  }
  const int64_t i_start = d.causal ? j0 / kTile * kTile : 0;

  float gk[kPerLane], gv[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) gk[i] = gv[i] = 0.0f;
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int64_t i0 = i_start; i0 < L; i0 += kTile) {
      __syncthreads();  // the previous tile is consumed (and kw, vw written, on the first pass)
      for (int64_t idx = threadIdx.x; idx < kTile * hd; idx += blockDim.x) {
        const int64_t ii = idx / hd, c = idx - ii * hd, t = i0 + ii, r = b * L + t;
        Qs[ii * ks + c] = t < L ? a.q[(r * H + h) * hd + c] : 0.0f;
        Gs[ii * ks + c] = t < L ? a.dout[r * a.dout_ld + h * hd + c] : 0.0f;
      }
      if (threadIdx.x < kTile) {
        const int64_t t = i0 + threadIdx.x, r = b * L + t;
        Ls[threadIdx.x] = t < L ? a.lse[r * H + h] : 0.0f;
        Ds[threadIdx.x] = t < L ? a.dvec[r * H + h] : 0.0f;
      }
      __syncthreads();
      const int64_t t = i0 + lane;
      float p = 0.0f, ds = 0.0f;
      if (active && t < L && (!d.causal || t >= j)) {
        const float* qr = Qs + lane * ks;
        const float* gr = Gs + lane * ks;
        float dot = 0.0f, dp = 0.0f;
        for (int64_t c = 0; c < hd; ++c) dot += qr[c] * kw[c];
        for (int64_t c = 0; c < hd; ++c) dp += gr[c] * vw[c];
        p = expf(dot * d.scale - Ls[lane]);
        ds = p * (dp - Ds[lane]) * d.scale;
      }
      for (int ii = 0; ii < kTile; ++ii) {
        const float pi = __shfl_sync(0xffffffffu, p, ii), dsi = __shfl_sync(0xffffffffu, ds, ii);
        const float* qr = Qs + ii * ks;
        const float* gr = Gs + ii * ks;
#pragma unroll
        for (int x = 0; x < kPerLane; ++x) {
          const int64_t c = lane + 32 * x;
          if (c < hd) {
            gv[x] += pi * gr[c];
            gk[x] += dsi * qr[c];
          }
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int x = 0; x < kPerLane; ++x) {
    const int64_t c = lane + 32 * x;
    if (c < hd) {
      a.dk[(krow * d.Hkv + kvh) * hd + c] = gk[x];
      a.dv[(krow * d.Hkv + kvh) * hd + c] = gv[x];
    }
  }
}

// Launches kernel on grid (⌈L/kWarps⌉, heads, B) with `floats` of dynamic shared memory (opting in past 48 KiB).
template <typename Kernel>
void launch_rows(cudaStream_t s, Kernel kernel, const CoreArgs& a, int64_t heads, int64_t floats) {
  const size_t bytes = size_t(floats) * sizeof(float);
  if (bytes > 48 * 1024)
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  const dim3 grid(unsigned((a.d.L + kWarps - 1) / kWarps), unsigned(heads), unsigned(a.d.B));
  launch_train(kernel, grid, kWarps * 32, bytes, s, a);
  MAMBA3_LAUNCH_CHECK();
}

void check_dims(const Dims& d) {
  MAMBA3_CHECK(d.hd >= 1 && d.hd <= kMaxHeadDim, "attention training: head_dim {} outside [1, {}]", d.hd,
               kMaxHeadDim);
  MAMBA3_CHECK(d.Hkv >= 1 && d.H % d.Hkv == 0 && d.H <= 65535 && d.B <= 65535,
               "attention training: heads {} / kv heads {} / batch {} unsupported", d.H, d.Hkv, d.B);
  MAMBA3_CHECK((d.L + kWarps - 1) / kWarps <= int64_t(0x7fffffff), "attention training: L {} too long", d.L);
}

}  // namespace

void attention_forward(cudaStream_t s, const Dims& d, const float* q, const float* k, const float* v, float* o,
                       int64_t o_ld, float* lse) {
  if (d.B * d.L == 0) return;
  check_dims(d);
  CoreArgs a{};
  a.d = d, a.q = q, a.k = k, a.v = v, a.o = o, a.o_ld = o_ld, a.lse = lse;
  launch_rows(s, forward_kernel, a, d.H, kTile * padded(d.hd) + kTile * d.hd + kWarps * d.hd);
}

void attention_backward(cudaStream_t s, const Dims& d, const float* q, const float* k, const float* v,
                        const float* o, int64_t o_ld, const float* lse, const float* dout, int64_t dout_ld,
                        float* dvec, float* dq, float* dk, float* dv) {
  if (d.B * d.L == 0) return;
  check_dims(d);
  CoreArgs a{};
  a.d = d, a.q = q, a.k = k, a.v = v, a.o = const_cast<float*>(o), a.o_ld = o_ld;
  a.lse = const_cast<float*>(lse), a.dout = dout, a.dout_ld = dout_ld, a.dvec = dvec;
  a.dq = dq, a.dk = dk, a.dv = dv;
  const int64_t n = d.B * d.L * d.H;
  const int64_t blocks = (n + 255) / 256;
  launch_train(dvec_kernel, unsigned(blocks < 65536 ? blocks : 65536), 256, 0, s, a);
  MAMBA3_LAUNCH_CHECK();
  const int64_t ks = padded(d.hd);
  launch_rows(s, dq_kernel, a, d.H, 2 * kTile * ks + 2 * kWarps * d.hd);
  launch_rows(s, dkdv_kernel, a, d.Hkv, 2 * kWarps * d.hd + 2 * kTile * ks + 2 * kTile);
}

}  // namespace mamba3::cuda::attn_train
