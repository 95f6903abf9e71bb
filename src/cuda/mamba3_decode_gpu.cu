#include <cuda_bf16.h>
#include <cuda_pipeline.h>

#include "cuda/mamba3_decode_gpu.h"
#include "cuda/mamba3_gpu_math.cuh"

#include "cuda/cuda_check.h"
#include "cuda/mamba3_stage_gpu.h"
#include "cuda/pdl.h"

namespace mamba3::cuda {
namespace {

constexpr int kMaxP = 128;
constexpr int kMaxN = 256;

// The warp sums of R per-lane partials with fewer shuffles than R separate butterflies (MIMO R = 4: 6 instead of 20):
// the first exchanges halve the values each lane carries, then a plain butterfly finishes. Returns, in every lane, the
// full sum of rank rank_of_lane<R>(lane); ranks ≥ R come out as 0.
template <int R>
__host__ __device__ constexpr int rank_span() {  // lanes per rank after the exchanges
  return R == 1 ? 32 : (R == 2 ? 16 : 8);
}
template <int R>
__device__ __forceinline__ int rank_of_lane(int lane) {
  return lane / rank_span<R>();
}
template <int R>
__device__ __forceinline__ float reduce_ranks(const float (&part)[R], int lane) {
  constexpr unsigned full = 0xffffffffu;
  if constexpr (R == 1) {
    return warp_sum(part[0]);
  } else if constexpr (R == 2) {
    const bool hi = lane & 16;
    float c = (hi ? part[1] : part[0]) + __shfl_xor_sync(full, hi ? part[0] : part[1], 16);
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) c += __shfl_xor_sync(full, c, o);
    return c;
  } else {
    const float p0 = part[0], p1 = part[1], p2 = part[2], p3 = R > 3 ? part[R - 1] : 0.0f;
    const bool hi = lane & 16, mid = lane & 8;
    const float x = (hi ? p2 : p0) + __shfl_xor_sync(full, hi ? p0 : p2, 16);
    const float y = (hi ? p3 : p1) + __shfl_xor_sync(full, hi ? p1 : p3, 16);
    float c = (mid ? y : x) + __shfl_xor_sync(full, mid ? x : y, 8);
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) c += __shfl_xor_sync(full, c, o);
    return c;
  }
}

// How a block covers a head (P rows of N state floats): 8 warps, one warp per row, a lane holding float4s
// (n = 4·lane + 128·v, v < VPL); RG = 8 rows in flight per warp, all requested before the first FMA; ≤ 80 registers
// (3 blocks per SM) for SISO, ≤ 128 (2 blocks) for MIMO, whose k_{−1}, k, q take 12·R registers.
// Measured on an H200 (1.5B, b128, ncu): SISO 158 µs per layer (70 % of DRAM bandwidth), MIMO R = 4 292 µs. Tried
// and dropped: 4 warps with 16–32 rows each (more bytes in flight per warp, fewer warps): 185 / 323 µs; per-row
// scalars staged in shared memory: 174 µs; MIMO with 2 warps per row on float2 slices (half the k/q registers,
// 3 blocks per SM): 9.12 vs 9.10 ms per step, no gain.
template <int R, int VPL>
struct DecodeLayout {
  static constexpr int kWarps = 8;
  static constexpr int kRows = VPL == 1 ? 8 : (R == 1 ? 4 : (R == 2 ? 2 : 1));
  static constexpr int kMinBlocks = R == 1 ? 3 : 2;
};

__device__ __forceinline__ void load_vec(const float* p, float (&d)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  d[0] = t.x, d[1] = t.y, d[2] = t.z, d[3] = t.w;
}
__device__ __forceinline__ void load_vec_stream(const float* p, float (&d)[4]) {  // read once: evict first
  const float4 t = __ldcs(reinterpret_cast<const float4*>(p));
  d[0] = t.x, d[1] = t.y, d[2] = t.z, d[3] = t.w;
}
__device__ __forceinline__ void store_vec_stream(float* p, const float (&d)[4]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(d[0], d[1], d[2], d[3]));
}

// One block per (b, h). Per row: h' = α·h + Σ_r (β·mx_r·x_{−1})·k_{−1,r} + (γ·mx_r·x)·k_r, stored; y_r = h'·q_r
// summed over the row's lanes; then the spec §7 output stage over the head (per-head norm, gate, MIMO contraction).
template <int R, int VPL>
__global__ void __launch_bounds__(DecodeLayout<R, VPL>::kWarps * 32, DecodeLayout<R, VPL>::kMinBlocks)
    mamba3_head_decode_kernel(Mamba3DecodeArgs a) {
  using Layout = DecodeLayout<R, VPL>;
  constexpr int VW = 4, RG = Layout::kRows, kThreads = Layout::kWarps * 32;
  __shared__ float ybuf[R * kMaxP];  // (r, p)
  __shared__ float misc[R];
  pdl_trigger();
  pdl_wait();
  const int item = blockIdx.x, H = a.H, P = a.P, N = a.N;
  const int b = item / H, h = item % H;
  if (mamba3_row_skipped(a.st, 1, b)) return;  // block-uniform, before the barrier
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, warps = kThreads / 32;
  const int group = warp, groups = warps;

  const int64_t rhn = int64_t(R) * H * N;
  const float* k0 = a.sg.k + int64_t(b) * 2 * rhn + int64_t(h) * N;  // slot 0 = k_{−1}; slot 1 = k follows
  const float* q0 = a.sg.q + int64_t(b) * rhn + int64_t(h) * N;
  float kp[R][VPL][VW], kc[R][VPL][VW], qc[R][VPL][VW];
  int nv[VPL];
  bool on[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    nv[v] = VW * lane + 128 * v;
    on[v] = nv[v] < N;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t off = int64_t(r) * H * N + nv[v];
#pragma unroll
      for (int e = 0; e < VW; ++e) kp[r][v][e] = kc[r][v][e] = qc[r][v][e] = 0.0f;
      if (on[v]) {
        load_vec(k0 + off, kp[r][v]);
        load_vec(k0 + rhn + off, kc[r][v]);
        load_vec(q0 + off, qc[r][v]);
      }
    }
  }
  const float4 sc = reinterpret_cast<const float4*>(a.sg.scal)[item];
  const float alpha = sc.x, beta = sc.y, gamma = sc.z, Dh = a.p.D[h];
  const float* zrow = a.zx + int64_t(b) * a.d_in;
  const float* xrow = zrow + a.off_x + int64_t(h) * P;
  float* vstate = a.st.v + int64_t(item) * P;
  float* ssm = a.st.ssm + int64_t(item) * P * N;
  const float* mimo_x = a.mimo ? a.p.mimo_x + int64_t(h) * R * P : nullptr;
  // The output stage's per-channel inputs (channel p = tid; P ≤ kMaxP ≤ the block's threads) copied to shared memory
  // asynchronously now (cp.async: no registers held over the state loop), so that they arrive with the state rows
  // instead of costing one more round trip at the end.
  static_assert(kMaxP <= kThreads, "the output stage takes one channel per thread");
  __shared__ float zx_own[3 * kMaxP];  // z, x, norm weight of channel p at p, kMaxP + p, 2·kMaxP + p
  const bool own = tid < P;
  if (own) {
    __pipeline_memcpy_async(zx_own + tid, zrow + int64_t(h) * P + tid, 4);
    __pipeline_memcpy_async(zx_own + kMaxP + tid, xrow + tid, 4);
    if (a.p.norm) __pipeline_memcpy_async(zx_own + 2 * kMaxP + tid, a.p.norm + int64_t(h) * P + tid, 4);
  }
  __pipeline_commit();
  // Row group g takes rows [RG·g, RG·g + RG), then the same RG·groups further on. Per-row scalars are read straight
  // from global memory (L1 broadcasts): staging them in shared memory first (one more barrier) measured slower,
  // 174 vs 158 µs per layer (H200, 1.5B SISO b128).
  for (int p0 = group * RG; p0 < P; p0 += groups * RG) {
    float hs[RG][VPL][VW];
#pragma unroll
    for (int i = 0; i < RG; ++i) {
      const int p = p0 + i;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        if (p < P && on[v]) load_vec_stream(ssm + int64_t(p) * N + nv[v], hs[i][v]);
      }
    }
#pragma unroll
    for (int i = 0; i < RG; ++i) {
      const int p = p0 + i;
      if (p >= P) break;  // warp-uniform
      const float xp = vstate[p], xc = xrow[p];
      float vp[R], vc[R], part[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float mx = a.mimo ? mimo_x[r * P + p] : 1.0f;
        vp[r] = beta * mx * xp;
        vc[r] = gamma * mx * xc;
        part[r] = 0.0f;
      }
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        if (!on[v]) continue;
        float hn[VW];
#pragma unroll
        for (int e = 0; e < VW; ++e) {
          hn[e] = alpha * hs[i][v][e];
#pragma unroll
          for (int r = 0; r < R; ++r) hn[e] += vp[r] * kp[r][v][e] + vc[r] * kc[r][v][e];
        }
        store_vec_stream(ssm + int64_t(p) * N + nv[v], hn);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int e = 0; e < VW; ++e) part[r] += hn[e] * qc[r][v][e];
        }
      }
      const float y = reduce_ranks<R>(part, lane);
      const int r = rank_of_lane<R>(lane);
      if (lane % rank_span<R>() == 0 && r < R) ybuf[r * P + p] = y;
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  // The D skip: y_r + D·mx_r·x.
  for (int idx = tid; idx < R * P; idx += kThreads) {
    const int r = idx / P, p = idx % P;
    ybuf[idx] = ybuf[idx] + Dh * (a.mimo ? mimo_x[r * P + p] : 1.0f) * xrow[p];
  }
  __syncthreads();

  // Output stage (spec §7), as the other decode kernels compute it.
  if (a.p.norm) {
    for (int r = warp; r < R; r += warps) {
      float ss = 0.0f;
      for (int q = lane; q < P; q += 32) ss += ybuf[r * P + q] * ybuf[r * P + q];
      ss = warp_sum(ss);
      if (lane == 0) misc[r] = rsqrtf(ss / float(P) + kMamba3NormEps);
    }
    __syncthreads();
  }
  const int64_t o_base = int64_t(b) * a.d_inner + int64_t(h) * P;
  if (own) {
    const int p = tid;
    const int64_t m0 = int64_t(h) * R * P + p;  // (h, r, p) of the MIMO vectors at r = 0
    const float acc = gated_output(
        R, a.mimo, zx_own[p],
        [&](int r) {
          const float y = ybuf[r * P + p];
          return a.p.norm ? y * misc[r] * zx_own[2 * kMaxP + p] : y;
        },
        [&](int r) { return a.p.mimo_z[m0 + int64_t(r) * P]; }, [&](int r) { return a.p.mimo_o[m0 + int64_t(r) * P]; });
    store_output(a.o, o_base + p, acc, a.o_bf16);
    vstate[p] = zx_own[kMaxP + p];  // every read of x_{−1} happened before the first barrier
  }
}

template <int R, int VPL>
void launch(cudaStream_t s, const Mamba3DecodeArgs& a, int blocks) {
  launch_pdl(pdl_small(blocks / a.H), mamba3_head_decode_kernel<R, VPL>, blocks, DecodeLayout<R, VPL>::kWarps * 32, 0,
             s, a);
}

template <int VPL>
void launch_rank(cudaStream_t s, const Mamba3DecodeArgs& a, int blocks) {
  switch (a.R) {
    case 1: launch<1, VPL>(s, a, blocks); break;
    case 2: launch<2, VPL>(s, a, blocks); break;
    case 3: launch<3, VPL>(s, a, blocks); break;
    default: launch<4, VPL>(s, a, blocks); break;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool mamba3_head_decode_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch) {
  const int64_t blocks = batch * a.H;
  if (a.N % 4 != 0 || a.N > kMaxN || a.P > kMaxP || a.R < 1 || a.R > 4 || blocks >= (int64_t(1) << 31)) return false;
  if (!aligned16(a.st.ssm) || !aligned16(a.sg.k) || !aligned16(a.sg.q) || !aligned16(a.sg.scal)) return false;
  if (a.N <= 128)
    launch_rank<1>(s, a, int(blocks));
  else
    launch_rank<2>(s, a, int(blocks));
  return true;
}

}  // namespace mamba3::cuda
