#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_pipeline.h>

#include <fmt/format.h>

#include "cuda/mamba3_gpu.h"
#include "cuda/mamba3_gpu_math.cuh"
#include "cuda/mamba3_stage_gpu.h"

namespace mamba3::cuda {
namespace {

constexpr int kRowsPerWarp = 8;  // head channels p per warp; the lanes of a warp split the state channels n
constexpr int kMaxThreads = 512;

struct KernelArgs : Mamba3KernelShape {
  Mamba3GpuParams p;
  const float* zx;
  Mamba3GpuState st;
  void* o;
};


// Shared floats the kernel needs (see the layout at the top of the kernel).
size_t shared_floats(int N, int P, int S, int rmax) { return size_t(3 * rmax * N + 3 * P + 4 * rmax * P + 3 * S + 16); }

// Shared-memory views of one block: the head's per-token staging area (see carve()).
struct Stage {
  float* kbuf;  // [2][RMAX][N] keys: current and previous token (double buffer)
  float* qbuf;  // [RMAX][N] queries
  float* xbuf;  // [2][P] x of the current and previous token
  float* zbuf;  // [P] gate
  float* ybuf;  // [RMAX][P] y before the output stage
  float* mx;    // [RMAX][P] mimo_x (1 for SISO)
  float* mz;    // [RMAX][P] mimo_z
  float* mo;    // [RMAX][P] mimo_o
  float* phi;   // [S] cumulative angles
  float* cs;    // [S]
  float* sn;    // [S]
  float* misc;  // [16]: Δ, α, β, γ, rstd of the 2R B/C vectors (4…), rstd of y_r (12…)
};

template <int RMAX>
__device__ Stage carve(float* smem, const KernelArgs& a) {
  Stage s;
  s.kbuf = smem;
  s.qbuf = s.kbuf + 2 * RMAX * a.N;
  s.xbuf = s.qbuf + RMAX * a.N;
  s.zbuf = s.xbuf + 2 * a.P;
  s.ybuf = s.zbuf + a.P;
  s.mx = s.ybuf + RMAX * a.P;
  s.mz = s.mx + RMAX * a.P;
  s.mo = s.mz + RMAX * a.P;
  s.phi = s.mo + RMAX * a.P;
  s.cs = s.phi + a.S;
  s.sn = s.cs + a.S;
  s.misc = s.sn + a.S;
  return s;
}

// MIMO vectors, the carried angles, and the previous token's k and x (the cache) into shared memory.
template <int RMAX>
__device__ void load_head(const KernelArgs& a, const Stage& s, int b, int h) {
  const int P = a.P, N = a.N, R = a.R, tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t bh = int64_t(b) * a.H + h;
  for (int i = tid; i < RMAX * P; i += nthreads) {
    const int r = i / P, q = i % P;
    const bool use = a.mimo && r < R;
    s.mx[i] = use ? a.p.mimo_x[(h * R + r) * P + q] : 1.0f;
    s.mz[i] = use ? a.p.mimo_z[(h * R + r) * P + q] : 1.0f;
    s.mo[i] = use ? a.p.mimo_o[(h * R + r) * P + q] : 1.0f;
  }
  for (int i = tid; i < a.S; i += nthreads) s.phi[i] = a.st.angle[bh * a.S + i];
  for (int i = tid; i < R * N; i += nthreads) {
    const int r = i / N, n = i % N;
    s.kbuf[RMAX * N + r * N + n] = a.st.k[((int64_t(b) * R + r) * a.H + h) * N + n];
  }
  for (int i = tid; i < P; i += nthreads) s.xbuf[P + i] = a.st.v[bh * P + i];
}

// Everything of one token before the state update (spec §2): raw B, C, x, z into shared memory; Δ, α, β, γ; the
// B/C RMSNorm (one warp per vector); the angle update (wrapped, as on the CPU); weight, bias, rotation (spec §3).
// Ends with the block synchronised.
template <int RMAX>
__device__ void stage_token(const KernelArgs& a, const Stage& s, const float* row, float* kc, float* xc, int h,
                            int g) {
  const int H = a.H, P = a.P, N = a.N, R = a.R, S = a.S;
  const int tid = threadIdx.x, nthreads = blockDim.x, warp = tid / 32, lane = tid % 32, warps = nthreads / 32;
  for (int i = tid; i < R * N; i += nthreads) {
    const int r = i / N, n = i % N;
    kc[i] = row[a.off_B + (r * a.G + g) * N + n];
    s.qbuf[i] = row[a.off_C + (r * a.G + g) * N + n];
  }
  for (int i = tid; i < P; i += nthreads) {
    xc[i] = row[a.off_x + h * P + i];
    s.zbuf[i] = row[h * P + i];
  }
  if (tid == 0) {
    const TokenScalars t = token_scalars(row, a.off_dt, H, h, a.p.dt_bias[h], a.heavy_tail, a.A_floor, a.euler);
    s.misc[0] = t.dt;
    s.misc[1] = t.alpha;
    s.misc[2] = t.beta;
    s.misc[3] = t.gamma;
  }
  __syncthreads();
  for (int vec = warp; vec < 2 * R; vec += warps) {
    const float* v = vec < R ? kc + vec * N : s.qbuf + (vec - R) * N;
    float ss = 0.0f;
    for (int n = lane; n < N; n += 32) ss += v[n] * v[n];
    ss = warp_sum(ss);
    if (lane == 0) s.misc[4 + vec] = rsqrtf(ss / float(N) + kMamba3NormEps);
  }
  for (int i = tid; i < S; i += nthreads) {
    float ang = a.no_rotary ? s.phi[i] : s.phi[i] + kMamba3Pi * tanhf(row[a.off_angles + i]) * s.misc[0];
    ang -= kMamba3TwoPi * floorf(ang / kMamba3TwoPi);
    s.phi[i] = ang;
    sincosf(ang, &s.sn[i], &s.cs[i]);
  }
  __syncthreads();
  for (int i = tid; i < R * N; i += nthreads) {
    const int r = i / N, n = i % N;
    kc[i] = kc[i] * s.misc[4 + r] * a.p.B_norm[n] + a.p.B_bias[(h * R + r) * N + n];
    s.qbuf[i] = s.qbuf[i] * s.misc[4 + R + r] * a.p.C_norm[n] + a.p.C_bias[(h * R + r) * N + n];
  }
  __syncthreads();
  const bool halves = a.mimo;  // rotary pairing: MIMO (i, i + N/2), SISO (2i, 2i + 1)
  for (int i = tid; i < R * S; i += nthreads) {
    const int r = i / S, j = i % S;
    const int ia = r * N + (halves ? j : 2 * j), ib = ia + (halves ? N / 2 : 1);
    const float c = s.cs[j], sv = s.sn[j];
    const float k0 = kc[ia], k1 = kc[ib];
    kc[ia] = k0 * c - k1 * sv;
    kc[ib] = k0 * sv + k1 * c;
    const float q0 = s.qbuf[ia], q1 = s.qbuf[ib];
    s.qbuf[ia] = q0 * c - q1 * sv;
    s.qbuf[ib] = q0 * sv + q1 * c;
  }
  __syncthreads();
}

// Output stage (spec §7) of one token from s.ybuf: optional per-head RMSNorm of each y_r, gate, MIMO contraction.
template <int RMAX>
__device__ void output_token(const KernelArgs& a, const Stage& s, int h, int64_t o_base) {
  const int P = a.P, R = a.R;
  const int tid = threadIdx.x, nthreads = blockDim.x, warp = tid / 32, lane = tid % 32, warps = nthreads / 32;
  if (a.p.norm) {
    for (int r = warp; r < R; r += warps) {
      float ss = 0.0f;
      for (int q = lane; q < P; q += 32) ss += s.ybuf[r * P + q] * s.ybuf[r * P + q];
      ss = warp_sum(ss);
      if (lane == 0) s.misc[12 + r] = rsqrtf(ss / float(P) + kMamba3NormEps);
    }
    __syncthreads();
  }
  for (int q = tid; q < P; q += nthreads) {
    const float acc = gated_output(
        R, a.mimo, s.zbuf[q],
        [&](int r) {
          const float y = s.ybuf[r * P + q];
          return a.p.norm ? y * s.misc[12 + r] * a.p.norm[h * P + q] : y;
        },
        [&](int r) { return s.mz[r * P + q]; }, [&](int r) { return s.mo[r * P + q]; });
    store_output(a.o, o_base + q, acc, a.o_bf16);
  }
}

// The last token's angles, k (rotated, biased) and x become the cache (spec §5.4).
template <int RMAX>
__device__ void store_tail(const KernelArgs& a, const Stage& s, int b, int h, const float* klast, const float* xlast) {
  const int tid = threadIdx.x, nthreads = blockDim.x, N = a.N, R = a.R;
  const int64_t bh = int64_t(b) * a.H + h;
  for (int i = tid; i < a.S; i += nthreads) a.st.angle[bh * a.S + i] = s.phi[i];
  for (int i = tid; i < R * N; i += nthreads) {
    const int r = i / N, n = i % N;
    a.st.k[((int64_t(b) * R + r) * a.H + h) * N + n] = klast[i];
  }
  for (int i = tid; i < a.P; i += nthreads) a.st.v[bh * a.P + i] = xlast[i];
}

// Prefill (and decode when the decode kernel does not apply): one block per (sequence b, head h); warp w owns head
// channels [8w, 8w + 8), lane l owns state channels n = l + 32j (j < NPT). The P×N state lives in registers for the
// whole token loop. RMAX ≥ R (ranks beyond R are masked).
template <int NPT, int RMAX>
__global__ void __launch_bounds__(kMaxThreads) mamba3_recurrent_kernel(KernelArgs a) {
  extern __shared__ float smem[];
  const int H = a.H, P = a.P, N = a.N, R = a.R;
  const int b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / a.G);
  if (mamba3_row_skipped(a.st, a.L, b)) return;  // an inactive decode row (block-uniform, before any barrier)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Stage s = carve<RMAX>(smem, a);
  const int64_t bh = int64_t(b) * H + h;
  load_head<RMAX>(a, s, b, h);

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

  int cur = 0;  // kbuf/xbuf half holding the current token; 1 − cur holds the previous one
  for (int t = 0; t < a.L; ++t) {
    const float* row = a.zx + (int64_t(b) * a.L + t) * a.d_in;
    float* kc = s.kbuf + cur * RMAX * N;
    const float* kp = s.kbuf + (1 - cur) * RMAX * N;
    float* xc = s.xbuf + cur * P;
    const float* xp = s.xbuf + (1 - cur) * P;
    stage_token<RMAX>(a, s, row, kc, xc, h, g);

    // h ← α h + β Σ_r v_prev,r k_prev,rᵀ + γ Σ_r v_r k_rᵀ and y_r = h q_r + D v_r (spec §4.1).
    const float alpha = s.misc[1], beta = s.misc[2], gamma = s.misc[3], Dh = a.p.D[h];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int p = warp * kRowsPerWarp + i;
      if (p >= P) break;  // warp-uniform
      float vprev[RMAX], vcur[RMAX], part[RMAX];
#pragma unroll
      for (int r = 0; r < RMAX; ++r) {
        vprev[r] = r < R ? beta * s.mx[r * P + p] * xp[p] : 0.0f;
        vcur[r] = r < R ? gamma * s.mx[r * P + p] * xc[p] : 0.0f;
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
            if (r < R) part[r] += hv * s.qbuf[r * N + n];
        }
      }
#pragma unroll
      for (int r = 0; r < RMAX; ++r) {
        if (r < R) {
          const float y = warp_sum(part[r]);
          if (lane == 0) s.ybuf[r * P + p] = y + Dh * s.mx[r * P + p] * xc[p];
        }
      }
    }
    __syncthreads();
    output_token<RMAX>(a, s, h, (int64_t(b) * a.L + t) * a.d_inner + int64_t(h) * P);
    cur ^= 1;
    __syncthreads();  // the next token overwrites zbuf, qbuf and the buffers read above
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
  store_tail<RMAX>(a, s, b, h, s.kbuf + (1 - cur) * RMAX * N, s.xbuf + (1 - cur) * P);
}

// Decode (L = 1), memory-bound: every state is read and written once. One block per (sequence, head, chunk of
// `rows` head channels): the block copies its rows × N slice of the state into shared memory asynchronously
// (cp.async, 16-byte pieces) at start, so the copy is in flight while the token is staged and takes no registers.
// Small blocks (a chunk of 16 channels when the output has no per-head norm) keep many blocks, and so many state
// copies, in flight per SM; the token staging (B/C norm, rotation) is repeated per chunk, which costs little.
template <int RMAX>
__global__ void __launch_bounds__(256) mamba3_decode_kernel(KernelArgs a, int rows) {
  extern __shared__ float smem[];
  const int H = a.H, P = a.P, N = a.N, R = a.R;
  const int chunks = P / rows, item = blockIdx.x / chunks, p0 = (blockIdx.x % chunks) * rows;
  const int b = item / H, h = item % H, g = h / (H / a.G);
  // An inactive row: every chunk of its heads returns here (block-uniform, before any barrier), so none reads or
  // writes its state nor counts itself into arrivals[item], which stays 0.
  if (mamba3_row_skipped(a.st, a.L, b)) return;
  const int tid = threadIdx.x, nthreads = blockDim.x, warp = tid / 32, lane = tid % 32, warps = nthreads / 32;
  float* hsm = smem;  // [rows][N]
  const Stage s = carve<RMAX>(smem + rows * N, a);
  const int64_t base = (int64_t(item) * P + p0) * N;
  const float4* src = reinterpret_cast<const float4*>(a.st.ssm + base);
  for (int i = tid; i < rows * N / 4; i += nthreads) __pipeline_memcpy_async(hsm + 4 * i, src + i, 16);
  __pipeline_commit();
  load_head<RMAX>(a, s, b, h);
  float* kc = s.kbuf;
  const float* kp = s.kbuf + RMAX * N;
  float* xc = s.xbuf;
  const float* xp = s.xbuf + P;
  stage_token<RMAX>(a, s, a.zx + int64_t(b) * a.d_in, kc, xc, h, g);
  // Every read of this head's old angle, k and v is done (stage_token ends synchronised): count this chunk in.
  __shared__ int last_chunk;
  if (tid == 0) last_chunk = chunks == 1 || atomicAdd(&a.st.arrivals[item], 1) == chunks - 1;
  __pipeline_wait_prior(0);
  __syncthreads();

  const float alpha = s.misc[1], beta = s.misc[2], gamma = s.misc[3], Dh = a.p.D[h];
  float* ssm_out = a.st.ssm + base;
  for (int i = warp; i < rows; i += warps) {
    const int p = p0 + i;
    float vprev[RMAX], vcur[RMAX], part[RMAX];
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      vprev[r] = r < R ? beta * s.mx[r * P + p] * xp[p] : 0.0f;
      vcur[r] = r < R ? gamma * s.mx[r * P + p] * xc[p] : 0.0f;
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
        if (r < R) part[r] += hv * s.qbuf[r * N + n];
    }
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      if (r < R) {
        const float y = warp_sum(part[r]);
        if (lane == 0) s.ybuf[r * P + p] = y + Dh * s.mx[r * P + p] * xc[p];
      }
    }
  }
  __syncthreads();
  // The output stage of this chunk's channels (the per-head norm needs all P, so it implies one chunk).
  const int64_t o_base = int64_t(b) * a.d_inner + int64_t(h) * P;
  if (rows == P) {
    output_token<RMAX>(a, s, h, o_base);
  } else {
    for (int q = p0 + tid; q < p0 + rows; q += nthreads) {
      const float z = s.zbuf[q];
      float acc = 0.0f;
      for (int r = 0; r < R; ++r) {
        const float y = s.ybuf[r * P + q];
        if (a.mimo) {
          const float zz = s.mz[r * P + q] * z;
          acc += s.mo[r * P + q] * y * (zz * sigmoid_f(zz));
        } else {
          acc = y * (z * sigmoid_f(z));
        }
      }
      if (a.o_bf16)
        static_cast<__nv_bfloat16*>(a.o)[o_base + q] = __float2bfloat16(acc);
      else
        static_cast<float*>(a.o)[o_base + q] = acc;
    }
  }
  // Every chunk computed the same angles, k and x; the last to arrive writes them and re-arms the counter.
  if (last_chunk) {
    store_tail<RMAX>(a, s, b, h, kc, xc);
    if (tid == 0 && chunks > 1) a.st.arrivals[item] = 0;
  }
}

template <int NPT, int RMAX>
void launch(cudaStream_t s, const KernelArgs& a, int blocks) {
  const int threads = ((a.P + kRowsPerWarp - 1) / kRowsPerWarp) * 32;
  const size_t bytes = shared_floats(a.N, a.P, a.S, RMAX) * sizeof(float);
  mamba3_recurrent_kernel<NPT, RMAX><<<blocks, threads < 64 ? 64 : threads, bytes, s>>>(a);
  MAMBA3_LAUNCH_CHECK();
}

// Head channels per decode block. Whole heads: chunks of 16 channels (4× the blocks, each repeating the token
// staging) measured slower on an H200 (1.5B SISO, b128: 8.6 ms/step against 7.1 ms for whole heads), as did a
// persistent grid that prefetches the next head's state (8.2 ms): the per-head staging chain, not the state
// bandwidth, bounds this kernel today (docs/perf.md). Chunked blocks stay supported (tested) for a later staging
// design; a chunk needs P % rows == 0 and no output norm.
int decode_rows(const KernelArgs& a) { return a.P; }

// Shared bytes of the decode kernel (its state slice plus the staging area), or 0 when it does not apply.
size_t decode_shared_bytes(const KernelArgs& a, int rmax) {
  const int rows = decode_rows(a);
  const size_t bytes = (size_t(rows) * a.N + shared_floats(a.N, a.P, a.S, rmax)) * sizeof(float);
  const bool aligned = reinterpret_cast<uintptr_t>(a.st.ssm) % 16 == 0 && (size_t(rows) * a.N) % 4 == 0;
  return a.L == 1 && aligned && bytes <= size_t(200) * 1024 ? bytes : 0;
}

template <int RMAX>
void launch_decode(cudaStream_t s, const KernelArgs& a, int items, size_t bytes) {
  static bool raised = false;  // the dynamic shared-memory limit (48 KB by default), raised once per instance
  if (!raised) {
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(mamba3_decode_kernel<RMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(200 * 1024)));
    raised = true;
  }
  const int rows = decode_rows(a), threads = rows == a.P ? 256 : 128;
  mamba3_decode_kernel<RMAX><<<items * (a.P / rows), threads, bytes, s>>>(a, rows);
  MAMBA3_LAUNCH_CHECK();
}

template <int RMAX>
void launch_for_state(cudaStream_t s, const KernelArgs& a, int blocks) {
  if (a.N <= 32)
    launch<1, RMAX>(s, a, blocks);
  else if (a.N <= 64)
    launch<2, RMAX>(s, a, blocks);
  else if (a.N <= 128)
    launch<4, RMAX>(s, a, blocks);
  else
    launch<8, RMAX>(s, a, blocks);
}

}  // namespace

std::string mamba3_gpu_supported(const Mamba3Config& c) {
  if (c.rank() > kMamba3GpuMaxRank) return fmt::format("mimo_rank {} > {}", c.rank(), kMamba3GpuMaxRank);
  if (c.d_state > kMamba3GpuMaxState) return fmt::format("d_state {} > {}", c.d_state, kMamba3GpuMaxState);
  if (c.headdim > kMamba3GpuMaxHeaddim) return fmt::format("headdim {} > {}", c.headdim, kMamba3GpuMaxHeaddim);
  return "";
}

Mamba3KernelShape mamba3_kernel_shape(const Mamba3Config& c, int64_t L, Precision o_precision) {
  Mamba3KernelShape k{};
  k.H = int(c.nheads());
  k.P = int(c.headdim);
  k.N = int(c.d_state);
  k.R = int(c.rank());
  k.G = int(c.ngroups);
  k.S = int(c.num_angles());
  k.L = int(L);
  k.d_in = int(c.d_in_proj());
  k.d_inner = int(c.d_inner());
  k.off_x = int(c.off_x());
  k.off_B = int(c.off_B());
  k.off_C = int(c.off_C());
  k.off_dt = int(c.off_dt());
  k.off_angles = int(c.off_angles());
  k.A_floor = float(c.A_floor);
  k.heavy_tail = c.a_activation == AActivation::HeavyTail;
  k.mimo = c.is_mimo;
  k.no_rotary = c.no_rotary;
  k.euler = c.euler;
  k.o_bf16 = o_precision == Precision::BF16;
  return k;
}

void mamba3_recurrent_gpu(cudaStream_t s, const Mamba3Config& c, const Mamba3GpuParams& p, int64_t batch, int64_t L,
                          const float* zx, Mamba3GpuState state, void* o, Precision o_precision,
                          Mamba3GpuPath path, const Mamba3GpuStage& prefill_stage) {
  const std::string why = mamba3_gpu_supported(c);
  MAMBA3_CHECK(why.empty(), "Mamba-3 CUDA kernel: unsupported configuration ({})", why);
  if (batch == 0 || L == 0) return;
  MAMBA3_CHECK(batch * c.nheads() < (int64_t(1) << 31), "Mamba-3 CUDA kernel: batch {} too large", batch);
  if (path == Mamba3GpuPath::Staged || path == Mamba3GpuPath::Chunked) {
    // Chunked: the staged kernels with the tensor-core chunk kernel for bf16 prefills (f32 keeps the exact stream).
    mamba3_staged_gpu(s, c, p, batch, L, zx, state, o, o_precision, prefill_stage,
                      path == Mamba3GpuPath::Chunked && o_precision == Precision::BF16);
    return;
  }
  KernelArgs a{};
  static_cast<Mamba3KernelShape&>(a) = mamba3_kernel_shape(c, L, o_precision);
  a.p = p;
  a.zx = zx;
  a.st = state;
  a.o = o;
  const int blocks = int(batch * c.nheads());
  if (const size_t bytes = decode_shared_bytes(a, a.R == 1 ? 1 : 4)) {
    if (a.R == 1)
      launch_decode<1>(s, a, blocks, bytes);
    else
      launch_decode<4>(s, a, blocks, bytes);
    return;
  }
  if (a.R == 1)
    launch_for_state<1>(s, a, blocks);
  else
    launch_for_state<4>(s, a, blocks);
}

}  // namespace mamba3::cuda
