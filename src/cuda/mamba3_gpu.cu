#include <cuda_bf16.h>

#include <fmt/format.h>

#include "cuda/mamba3_gpu.h"

namespace mamba3::cuda {
namespace {

constexpr int kRowsPerWarp = 8;  // head channels p per warp; the lanes of a warp split the state channels n
constexpr int kMaxThreads = 512;
constexpr float kPi = 3.14159265358979323846f;
constexpr float kTwoPi = 6.28318530717958647692f;
constexpr float kNormEps = 1e-5f;

struct KernelArgs {
  int H, P, N, R, G, S, L, d_in, d_inner;
  int off_x, off_B, off_C, off_dt, off_angles;
  float A_floor;
  bool heavy_tail, mimo, no_rotary, euler, o_bf16;
  Mamba3GpuParams p;
  const float* zx;
  Mamba3GpuState st;
  void* o;
};

__device__ __forceinline__ float softplus_f(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Shared floats the kernel needs (see the layout at the top of the kernel).
size_t shared_floats(int N, int P, int S, int rmax) { return size_t(3 * rmax * N + 3 * P + 4 * rmax * P + 3 * S + 16); }

// One block per (sequence b, head h); warp w owns head channels [8w, 8w + 8), lane l owns state channels
// n = l + 32j (j < NPT). The P×N state lives in registers for the whole token loop; per token, the block stages the
// head's normalised, biased, rotated keys and queries in shared memory. RMAX ≥ R (ranks beyond R are masked).
template <int NPT, int RMAX>
__global__ void __launch_bounds__(kMaxThreads) mamba3_recurrent_kernel(KernelArgs a) {
  extern __shared__ float smem[];
  const int H = a.H, P = a.P, N = a.N, R = a.R, S = a.S;
  const int b = blockIdx.x / H, h = blockIdx.x % H, g = h / (H / a.G);
  const int tid = threadIdx.x, nthreads = blockDim.x, warp = tid / 32, lane = tid % 32, warps = nthreads / 32;

  float* kbuf = smem;                   // [2][RMAX][N] keys: current and previous token (double buffer)
  float* qbuf = kbuf + 2 * RMAX * N;    // [RMAX][N] queries
  float* xbuf = qbuf + RMAX * N;        // [2][P] x of the current and previous token
  float* zbuf = xbuf + 2 * P;           // [P] gate
  float* ybuf = zbuf + P;               // [RMAX][P] y before the output stage
  float* mx = ybuf + RMAX * P;          // [RMAX][P] mimo_x (1 for SISO)
  float* mz = mx + RMAX * P;            // [RMAX][P] mimo_z
  float* mo = mz + RMAX * P;            // [RMAX][P] mimo_o
  float* phi = mo + RMAX * P;           // [S] cumulative angles
  float* cs = phi + S;                  // [S]
  float* sn = cs + S;                   // [S]
  float* misc = sn + S;                 // [16]: Δ, α, β, γ, rstd of the 2R B/C vectors (4…), rstd of y_r (12…)

  const int64_t bh = int64_t(b) * H + h;
  for (int i = tid; i < RMAX * P; i += nthreads) {
    const int r = i / P, q = i % P;
    const bool use = a.mimo && r < R;
    mx[i] = use ? a.p.mimo_x[(h * R + r) * P + q] : 1.0f;
    mz[i] = use ? a.p.mimo_z[(h * R + r) * P + q] : 1.0f;
    mo[i] = use ? a.p.mimo_o[(h * R + r) * P + q] : 1.0f;
  }
  for (int i = tid; i < S; i += nthreads) phi[i] = a.st.angle[bh * S + i];
  int cur = 0;  // kbuf/xbuf half holding the current token; 1 − cur holds the previous one (the cache's k, v)
  for (int i = tid; i < R * N; i += nthreads) {
    const int r = i / N, n = i % N;
    kbuf[RMAX * N + r * N + n] = a.st.k[((int64_t(b) * R + r) * H + h) * N + n];
  }
  for (int i = tid; i < P; i += nthreads) xbuf[P + i] = a.st.v[bh * P + i];

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

  const bool halves = a.mimo;  // rotary pairing: MIMO (i, i + N/2), SISO (2i, 2i + 1) (spec §3)
  for (int t = 0; t < a.L; ++t) {
    const float* row = a.zx + (int64_t(b) * a.L + t) * a.d_in;
    float* kc = kbuf + cur * RMAX * N;
    const float* kp = kbuf + (1 - cur) * RMAX * N;
    float* xc = xbuf + cur * P;
    const float* xp = xbuf + (1 - cur) * P;

    // Raw B, C of the head's group, x, z, and the per-head scalars (spec §2.2).
    for (int i = tid; i < R * N; i += nthreads) {
      const int r = i / N, n = i % N;
      kc[i] = row[a.off_B + (r * a.G + g) * N + n];
      qbuf[i] = row[a.off_C + (r * a.G + g) * N + n];
    }
    for (int i = tid; i < P; i += nthreads) {
      xc[i] = row[a.off_x + h * P + i];
      zbuf[i] = row[h * P + i];
    }
    if (tid == 0) {
      const float dt = softplus_f(row[a.off_dt + h] + a.p.dt_bias[h]);
      const float al = row[a.off_dt + H + h];
      const float f = a.heavy_tail ? (al >= 0.0f ? 1.0f + al : 1.0f / (1.0f - al)) : softplus_f(al);
      const float A = fminf(-f, -a.A_floor);
      const float lam = a.euler ? 1.0f : sigmoid_f(row[a.off_dt + 2 * H + h]);
      const float alpha = expf(A * dt);
      misc[0] = dt;
      misc[1] = alpha;
      misc[2] = (1.0f - lam) * dt * alpha;
      misc[3] = lam * dt;
    }
    __syncthreads();

    // RMS of each B/C vector (one warp per vector) and the angle update (spec §2.3, wrapped as on the CPU).
    for (int vec = warp; vec < 2 * R; vec += warps) {
      const float* v = vec < R ? kc + vec * N : qbuf + (vec - R) * N;
      float ss = 0.0f;
      for (int n = lane; n < N; n += 32) ss += v[n] * v[n];
      ss = warp_sum(ss);
      if (lane == 0) misc[4 + vec] = rsqrtf(ss / float(N) + kNormEps);
    }
    for (int i = tid; i < S; i += nthreads) {
      float ang = a.no_rotary ? phi[i] : phi[i] + kPi * tanhf(row[a.off_angles + i]) * misc[0];
      ang -= kTwoPi * floorf(ang / kTwoPi);
      phi[i] = ang;
      sincosf(ang, &sn[i], &cs[i]);
    }
    __syncthreads();

    // Normalise, weight and bias (spec §2.4) ...
    for (int i = tid; i < R * N; i += nthreads) {
      const int r = i / N, n = i % N;
      kc[i] = kc[i] * misc[4 + r] * a.p.B_norm[n] + a.p.B_bias[(h * R + r) * N + n];
      qbuf[i] = qbuf[i] * misc[4 + R + r] * a.p.C_norm[n] + a.p.C_bias[(h * R + r) * N + n];
    }
    __syncthreads();
    // ... then rotate (spec §3).
    for (int i = tid; i < R * S; i += nthreads) {
      const int r = i / S, s = i % S;
      const int ia = r * N + (halves ? s : 2 * s), ib = ia + (halves ? N / 2 : 1);
      const float c = cs[s], sv = sn[s];
      float k0 = kc[ia], k1 = kc[ib];
      kc[ia] = k0 * c - k1 * sv;
      kc[ib] = k0 * sv + k1 * c;
      float q0 = qbuf[ia], q1 = qbuf[ib];
      qbuf[ia] = q0 * c - q1 * sv;
      qbuf[ib] = q0 * sv + q1 * c;
    }
    __syncthreads();

    // State update h ← α h + β Σ_r v_prev,r k_prev,rᵀ + γ Σ_r v_r k_rᵀ and y_r = h q_r + D v_r (spec §4.1).
    const float alpha = misc[1], beta = misc[2], gamma = misc[3], Dh = a.p.D[h];
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
            if (r < R) part[r] += hv * qbuf[r * N + n];
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

    // Output stage (spec §7): optional per-head RMSNorm of each y_r, gate, MIMO contraction.
    if (a.p.norm) {
      for (int r = warp; r < R; r += warps) {
        float ss = 0.0f;
        for (int q = lane; q < P; q += 32) ss += ybuf[r * P + q] * ybuf[r * P + q];
        ss = warp_sum(ss);
        if (lane == 0) misc[12 + r] = rsqrtf(ss / float(P) + kNormEps);
      }
      __syncthreads();
    }
    const int64_t o_base = (int64_t(b) * a.L + t) * a.d_inner + int64_t(h) * P;
    for (int q = tid; q < P; q += nthreads) {
      const float z = zbuf[q];
      float acc = 0.0f;
      for (int r = 0; r < R; ++r) {
        float y = ybuf[r * P + q];
        if (a.p.norm) y = y * misc[12 + r] * a.p.norm[h * P + q];
        if (a.mimo) {
          const float zz = mz[r * P + q] * z;
          acc += mo[r * P + q] * y * (zz * sigmoid_f(zz));
        } else {
          acc = y * (z * sigmoid_f(z));
        }
      }
      if (a.o_bf16)
        static_cast<__nv_bfloat16*>(a.o)[o_base + q] = __float2bfloat16(acc);
      else
        static_cast<float*>(a.o)[o_base + q] = acc;
    }
    cur ^= 1;
    __syncthreads();  // the next token overwrites zbuf, qbuf and the buffers read above
  }

  // Final decode state (spec §5.4): h, φ, and the last token's k (rotated, biased) and x.
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
  for (int i = tid; i < S; i += nthreads) a.st.angle[bh * S + i] = phi[i];
  const float* klast = kbuf + (1 - cur) * RMAX * N;
  for (int i = tid; i < R * N; i += nthreads) {
    const int r = i / N, n = i % N;
    a.st.k[((int64_t(b) * R + r) * H + h) * N + n] = klast[i];
  }
  for (int i = tid; i < P; i += nthreads) a.st.v[bh * P + i] = xbuf[(1 - cur) * P + i];
}

template <int NPT, int RMAX>
void launch(cudaStream_t s, const KernelArgs& a, int blocks) {
  const int threads = ((a.P + kRowsPerWarp - 1) / kRowsPerWarp) * 32;
  const size_t bytes = shared_floats(a.N, a.P, a.S, RMAX) * sizeof(float);
  mamba3_recurrent_kernel<NPT, RMAX><<<blocks, threads < 64 ? 64 : threads, bytes, s>>>(a);
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

void mamba3_recurrent_gpu(cudaStream_t s, const Mamba3Config& c, const Mamba3GpuParams& p, int64_t batch, int64_t L,
                          const float* zx, Mamba3GpuState state, void* o, Precision o_precision) {
  const std::string why = mamba3_gpu_supported(c);
  MAMBA3_CHECK(why.empty(), "Mamba-3 CUDA kernel: unsupported configuration ({})", why);
  if (batch == 0 || L == 0) return;
  MAMBA3_CHECK(batch * c.nheads() < (int64_t(1) << 31), "Mamba-3 CUDA kernel: batch {} too large", batch);
  KernelArgs a{};
  a.H = int(c.nheads());
  a.P = int(c.headdim);
  a.N = int(c.d_state);
  a.R = int(c.rank());
  a.G = int(c.ngroups);
  a.S = int(c.num_angles());
  a.L = int(L);
  a.d_in = int(c.d_in_proj());
  a.d_inner = int(c.d_inner());
  a.off_x = int(c.off_x());
  a.off_B = int(c.off_B());
  a.off_C = int(c.off_C());
  a.off_dt = int(c.off_dt());
  a.off_angles = int(c.off_angles());
  a.A_floor = float(c.A_floor);
  a.heavy_tail = c.a_activation == AActivation::HeavyTail;
  a.mimo = c.is_mimo;
  a.no_rotary = c.no_rotary;
  a.euler = c.euler;
  a.o_bf16 = o_precision == Precision::BF16;
  a.p = p;
  a.zx = zx;
  a.st = state;
  a.o = o;
  const int blocks = int(batch * c.nheads());
  if (a.R == 1)
    launch_for_state<1>(s, a, blocks);
  else
    launch_for_state<4>(s, a, blocks);
}

}  // namespace mamba3::cuda
