// The streaming decode kernel (mamba3_decode_gpu.h): a persistent grid whose blocks walk (sequence, head) items, each
// item's inputs — its P×N state above all — copied by cp.async into a ring of shared-memory stages while the block
// computes an earlier item. See the header for why.
#include <cuda_bf16.h>

#include <algorithm>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_check.h"
#include "cuda/cuda_context.h"
#include "cuda/mamba3_decode_gpu.h"
#include "cuda/mamba3_gpu_math.cuh"
#include "cuda/pdl.h"

namespace mamba3::cuda {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kMaxP = 128, kMaxN = 256, kMaxR = 4;

__host__ __device__ constexpr int up4(int n) { return (n + 3) & ~3; }

// Float offsets of one item's inputs inside a stage (every section starts on 16 bytes).
struct StageLayout {
  int h, kp, raw, z, x, xp, ang, angin, sc, floats;
};

__host__ __device__ inline StageLayout stage_layout(int P, int N, int R, int S) {
  StageLayout l{};
  int o = 0;
  auto take = [&](int n) {
    const int at = o;
    o += up4(n);
    return at;
  };
  l.h = take(P * N);
  l.kp = take(R * N);
  l.raw = take(2 * R * N);  // B ranks, then C ranks
  l.z = take(P);
  l.x = take(P);
  l.xp = take(P);
  l.ang = take(S);
  l.angin = take(S);
  l.sc = take(4);  // the token's raw Δ, A and λ entries of the in_proj row, the slot mask's word (int bits)
  l.floats = o;
  return l;
}

// Float offsets of the block's own buffers (its head's parameters and per-item scratch), counted from the ring's start
// (the host adds the stages).
struct BlockLayout {
  int bias, mx, mz, mo, nw, wn, kq, coef, dskip, ybuf, cs, sn, floats;
};
__host__ __device__ inline BlockLayout block_layout(int P, int N, int R, bool mimo) {
  BlockLayout l{};
  int o = 0;
  auto take = [&](int n) {
    const int at = o;
    o += up4(n);
    return at;
  };
  l.bias = take(2 * R * N);  // B_bias ranks, then C_bias ranks
  l.mx = take(mimo ? R * P : 0);
  l.mz = take(mimo ? R * P : 0);
  l.mo = take(mimo ? R * P : 0);
  l.nw = take(P);             // output norm weight
  l.wn = take(2 * N);         // B_norm, C_norm
  l.kq = take(2 * R * N);     // (B/C, r, n): the new k and q
  l.coef = take(P * coef_stride_of(R));  // (p, vp_0..vp_{R−1}, vc_0..vc_{R−1})
  l.dskip = take(R * P);      // (r, p): D·mx_r·x
  l.ybuf = take(R * P);       // (r, p)
  l.cs = take(N / 2);         // cos and sin of the angles; entries from S on stay 1 and 0 (no rotation)
  l.sn = take(N / 2);
  l.floats = o;
  return l;
}

template <int STAGES>
size_t shared_bytes(int P, int N, int R, int S) {
  return size_t(STAGES * stage_layout(P, N, R, S).floats + block_layout(P, N, R, R > 1).floats) * sizeof(float);
}

__device__ __forceinline__ void copy16(float* dst, const float* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void copy4(float* dst, const float* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void wait_pending() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
}
__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// n floats from global src to shared dst (16-byte aligned) by one warp: 16-byte copies where src allows.
__device__ __forceinline__ void copy_warp(float* dst, const float* src, int n, int lane) {
  if ((n & 3) == 0 && aligned16(src)) {
    if (n == 128) {  // the common d_state: one copy per lane
      copy16(dst + 4 * lane, src + 4 * lane);
      return;
    }
    for (int i = 4 * lane; i < n; i += 128) copy16(dst + i, src + i);
  } else {
    for (int i = lane; i < n; i += 32) copy4(dst + i, src + i);
  }
}

// One short input of an item: n floats at base + b·bstride (b the item's sequence) into stage offset dst.
struct Segment {
  const float* base;
  int64_t bstride;
  int dst, n;
};
constexpr int kMaxSegments = 3 * kMaxR + 9;

// The block's segments for head h (built once by one thread): the cached k of each rank, the raw B and C rows of each
// rank, z, x, x_{−1}, the angle state and inputs, Δ, A, λ (not for euler, whose rows have no λ section) and the slot
// mask's word (its int bits). Returns their count.
__device__ int build_segments(const Mamba3DecodeArgs& a, const StageLayout& l, int h, Segment* seg) {
  const int H = a.H, P = a.P, N = a.N, R = a.R, S = a.S, g = h / (H / a.G);
  int c = 0;
  auto add = [&](const float* base, int64_t bstride, int dst, int n) { seg[c++] = Segment{base, bstride, dst, n}; };
  for (int r = 0; r < R; ++r) add(a.st.k + (int64_t(r) * H + h) * N, int64_t(R) * H * N, l.kp + r * N, N);
  for (int v = 0; v < 2 * R; ++v) {
    const int r = v < R ? v : v - R;
    add(a.zx + (v < R ? a.off_B : a.off_C) + int64_t(r * a.G + g) * N, a.d_in, l.raw + v * N, N);
  }
  add(a.zx + int64_t(h) * P, a.d_in, l.z, P);
  add(a.zx + a.off_x + int64_t(h) * P, a.d_in, l.x, P);
  add(a.st.v + int64_t(h) * P, int64_t(H) * P, l.xp, P);
  add(a.st.angle + int64_t(h) * S, int64_t(H) * S, l.ang, S);
  add(a.zx + a.off_angles, a.d_in, l.angin, S);
  for (int i = 0; i < (a.euler ? 2 : 3); ++i) add(a.zx + a.off_dt + int64_t(i) * H + h, a.d_in, l.sc + i, 1);
  if (a.st.active) add(reinterpret_cast<const float*>(a.st.active), 1, l.sc + 3, 1);
  return c;
}

// Requests the inputs of item (b, h) into stage sb: the state by the bulk copy engine (one thread), the segments one
// warp each. The caller commits the cp.async group.
__device__ __forceinline__ void request_item(const Mamba3DecodeArgs& a, const StageLayout& l, const Segment* seg,
                                             int segments, int b, int h, float* sb, uint64_t* bar, int tid,
                                             uint64_t policy) {
  const int warp = tid / 32, lane = tid % 32;
  const float* state = a.st.ssm + (int64_t(b) * a.H + h) * a.P * a.N;
  if (tid == 0) {  // the state: 16-byte aligned, P·N a multiple of 4 (checked by the host)
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the stage's last reads were generic-proxy loads
    bulk_copy(sb + l.h, state, unsigned(a.P * a.N) * 4u, bar, policy);
  }
  for (int s = warp; s < segments; s += kWarps) {  // warp-uniform
    const Segment g = seg[s];
    copy_warp(sb + g.dst, g.base + b * g.bstride, g.n, lane);
  }
}

__device__ __forceinline__ void load4(const float* p, float (&d)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  d[0] = t.x, d[1] = t.y, d[2] = t.z, d[3] = t.w;
}

// Block (h, j) of a grid of H·nb blocks takes head h of sequences j, j + nb, …: its head's parameters are read once,
// and STAGES − 1 items' inputs are in flight while one is computed. Per item (spec §2–§7, the same expressions in the
// same order as the head decode kernel):
//  1. angles (the block's last S threads) update in place and tabulate sine and cosine; warps w < 2R norm their
//     B/C vector (rank w/2, B for even w); one thread computes α, β, γ. Barrier.
//  2. Bias and rotation → the new k and q in shared memory, the new k into the cache; per-channel coefficients
//     β·mx_r·x_{−1}, γ·mx_r·x and the D skip. Barrier.
//  3. Rows: h' = α·h + Σ_r vp_r·k_{−1,r} + vc_r·k_r from the staged h, streamed to global; y_r = h'·q_r. Barrier.
//  4. Per-head output norm and the gated output (spec §7); x becomes x_{−1}.
template <int R, int VPL, int STAGES>
__global__ void __launch_bounds__(kThreads, R == 1 ? 3 : 2)
    mamba3_stream_decode_kernel(Mamba3DecodeArgs a, int batch, int nb, StageLayout l, BlockLayout bl) {
  // The layouts come from the host as parameters: read from the constant bank where used, they take no registers.
  extern __shared__ __align__(16) float ring[];
  __shared__ __align__(8) uint64_t full[STAGES];  // stage s's state has landed (bulk copy)
  __shared__ Segment seg[kMaxSegments];
  __shared__ int segments;
  __shared__ float scal[3], misc[R];
  constexpr bool kMimo = R > 1;
  constexpr int CS = coef_stride<R>();
  const int H = a.H, P = a.P, N = a.N, S = a.S;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.x % H, j0 = blockIdx.x / H;
  float *const kq = ring + bl.kq, *const coef = ring + bl.coef, *const dskip = ring + bl.dskip,
               *const ybuf = ring + bl.ybuf, *const ang_cs = ring + bl.cs, *const ang_sn = ring + bl.sn;
  const float *const wn = ring + bl.wn, *const bb = ring + bl.bias;
  uint64_t policy;  // the state is read once per step: L2 evicts it first, keeping the weights' and activations' lines
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) mbar_init(&full[s]);
    mbar_init_fence();
    segments = build_segments(a, l, h, seg);
  }
  __syncthreads();
  pdl_wait();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    const int b = j0 + s * nb;
    if (b < batch) request_item(a, l, seg, segments, b, h, ring + s * l.floats, &full[s], tid, policy);
    commit();
  }
  // The head's parameters, once (plain loads: the first item's barrier publishes them).
  for (int i = tid; i < N; i += kThreads) ring[bl.wn + i] = a.p.B_norm[i], ring[bl.wn + N + i] = a.p.C_norm[i];
  for (int i = tid; i < R * N; i += kThreads) {
    ring[bl.bias + i] = a.p.B_bias[int64_t(h) * R * N + i];
    ring[bl.bias + R * N + i] = a.p.C_bias[int64_t(h) * R * N + i];
  }
  for (int i = tid; i < R * P; i += kThreads) {
    if constexpr (kMimo) {
      ring[bl.mx + i] = a.p.mimo_x[int64_t(h) * R * P + i];
      ring[bl.mz + i] = a.p.mimo_z[int64_t(h) * R * P + i];
      ring[bl.mo + i] = a.p.mimo_o[int64_t(h) * R * P + i];
    }
  }
  if (a.p.norm)
    for (int i = tid; i < P; i += kThreads) ring[bl.nw + i] = a.p.norm[int64_t(h) * P + i];
  for (int i = S + tid; i < N / 2; i += kThreads) ang_cs[i] = 1.0f, ang_sn[i] = 0.0f;
  const float dt_bias = a.p.dt_bias[h], Dh = a.p.D[h];

  int nv[VPL];
  bool on[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    nv[v] = 4 * lane + 128 * v;
    on[v] = nv[v] < N;
  }
  const int half = N / 2;
  const bool stager = warp < 2 * R;
  const int vr = warp / 2;
  const bool is_c = warp & 1;
  const int vi = int(is_c) * R + vr;  // the stager's vector in raw, bias and kq
  const int cp = (tid + kThreads - 96) % kThreads;  // coefficient channel (away from the stagers when R is small)
  // Rows as unchecked groups of 4 per warp.
  const bool whole = P % (4 * kWarps) == 0 && N == 128 * VPL;

  for (int k = 0;; ++k) {
    const int b = j0 + k * nb;
    if (b >= batch) break;
    wait_pending<STAGES - 2>();
    mbar_wait(&full[k % STAGES], unsigned(k / STAGES) & 1u);  // the state; each stage's barrier completes once per use
    __syncthreads();  // item k's stage is complete for every thread; item k − 1 is done with its stage and buffers
    // Item k + STAGES − 1 into the stage item k − 1 left; requested after this item's first phase has started its
    // dependent chains (angles, α/β/γ, norms), whose latency the request's instructions then fill.
    auto request_next = [&] {
      const int next = b + (STAGES - 1) * nb, s = (k + STAGES - 1) % STAGES;
      if (next < batch) request_item(a, l, seg, segments, next, h, ring + s * l.floats, &full[s], tid, policy);
      commit();
    };
    float* const sb = ring + (k % STAGES) * l.floats;
    if (a.st.active && __float_as_int(sb[l.sc + 3]) == 0) {  // skipped slot (block-uniform); staged mask word
      request_next();
      continue;
    }
    const int64_t item = int64_t(b) * H + h;

    // 1. Angles, norms, scalars.
    if (const int j = tid - (kThreads - S); j >= 0) {
      const float dt = softplus_f(sb[l.sc + 0] + dt_bias);
      const float phi = sb[l.ang + j];
      float ang = a.no_rotary ? phi : phi + kMamba3Pi * tanhf(sb[l.angin + j]) * dt;
      ang -= kMamba3TwoPi * floorf(ang / kMamba3TwoPi);
      a.st.angle[item * S + j] = ang;
      sincosf(ang, &ang_sn[j], &ang_cs[j]);
    }
    if (tid == (2 * R * 32) % kThreads) {
      const TokenScalars t = token_scalars_of(sb[l.sc + 0], sb[l.sc + 1], a.euler ? 0.0f : sb[l.sc + 2], dt_bias,
                                              a.heavy_tail, a.A_floor, a.euler);
      scal[0] = t.alpha, scal[1] = t.beta, scal[2] = t.gamma;
    }
    float rnorm = 0.0f;
    float raw[VPL][4] = {};
    if (stager) {
      float ss = 0.0f;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        if (!on[v]) continue;
        load4(sb + l.raw + vi * N + nv[v], raw[v]);
#pragma unroll
        for (int e = 0; e < 4; ++e) ss += raw[v][e] * raw[v][e];
      }
      rnorm = rsqrtf(warp_sum(ss) / float(N) + kMamba3NormEps);
    }
    request_next();
    __syncthreads();

    // 2. Bias and rotation (pairs (n, n + N/2) for MIMO, (2i, 2i + 1) for SISO); coefficients.
    if (stager) {
      const float* w = wn + int(is_c) * N;
      const float* bias = bb + vi * N;
      const float* rs = sb + l.raw + vi * N;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        if (!on[v]) continue;
        const int n0 = nv[v];
        float ws[4], bs[4], self[4], other[4], cs[4], sn[4], out[4];
        load4(w + n0, ws);
        load4(bias + n0, bs);
#pragma unroll
        for (int e = 0; e < 4; ++e) self[e] = raw[v][e] * rnorm * ws[e] + bs[e];
        bool low[4];
        if constexpr (kMimo) {
          if (half % 4 == 0) {  // the partners are the float4 at the same place in the other half
            const int m0 = n0 < half ? n0 + half : n0 - half;
            float rm[4], wm[4], bm[4];
            load4(rs + m0, rm);
            load4(w + m0, wm);
            load4(bias + m0, bm);
            load4(ang_cs + (n0 < half ? n0 : m0), cs);
            load4(ang_sn + (n0 < half ? n0 : m0), sn);
#pragma unroll
            for (int e = 0; e < 4; ++e) other[e] = rm[e] * rnorm * wm[e] + bm[e], low[e] = n0 < half;
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int n = n0 + e, m = n < half ? n + half : n - half;
              other[e] = rs[m] * rnorm * w[m] + bias[m];
              low[e] = n < m;
              cs[e] = ang_cs[low[e] ? n : m], sn[e] = ang_sn[low[e] ? n : m];
            }
          }
        } else {
          const float2 c2 = *reinterpret_cast<const float2*>(ang_cs + n0 / 2);
          const float2 s2 = *reinterpret_cast<const float2*>(ang_sn + n0 / 2);
          cs[0] = cs[1] = c2.x, cs[2] = cs[3] = c2.y, sn[0] = sn[1] = s2.x, sn[2] = sn[3] = s2.y;
#pragma unroll
          for (int e = 0; e < 4; ++e) other[e] = self[e ^ 1], low[e] = (e & 1) == 0;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = low[e] ? self[e] * cs[e] - other[e] * sn[e] : other[e] * sn[e] + self[e] * cs[e];
        const float4 o4 = make_float4(out[0], out[1], out[2], out[3]);
        *reinterpret_cast<float4*>(kq + vi * N + n0) = o4;
        if (!is_c) *reinterpret_cast<float4*>(a.st.k + (int64_t(b) * R + vr) * H * N + int64_t(h) * N + n0) = o4;
      }
    }
    const float alpha = scal[0], beta = scal[1], gamma = scal[2];
    if (cp < P) {
      const float xp = sb[l.xp + cp], xc = sb[l.x + cp];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float mx = kMimo ? ring[bl.mx + r * P + cp] : 1.0f;
        coef[cp * CS + r] = beta * mx * xp;
        coef[cp * CS + R + r] = gamma * mx * xc;
        dskip[r * P + cp] = Dh * mx * xc;
      }
    }
    __syncthreads();

    // 3. Rows.
    float* ssm = a.st.ssm + item * P * N;
    float kp[R][VPL][4], kc[R][VPL][4], qc[R][VPL][4];
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int e = 0; e < 4; ++e) kp[r][v][e] = kc[r][v][e] = qc[r][v][e] = 0.0f;
        if (!on[v]) continue;
        load4(sb + l.kp + r * N + nv[v], kp[r][v]);
        load4(kq + r * N + nv[v], kc[r][v]);
        load4(kq + (R + r) * N + nv[v], qc[r][v]);
      }
    }
    // One row from its staged values: the update streamed back, y_r by warp reduction into ybuf.
    auto row = [&](int p, const float (&hs)[VPL][4], auto checked) {
      constexpr bool kChecked = decltype(checked)::value;
      float vp[R], vc[R], part[R];
      load_coefs<R>(coef + p * CS, vp, vc);
#pragma unroll
      for (int r = 0; r < R; ++r) part[r] = 0.0f;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        if constexpr (kChecked) {
          if (!on[v]) continue;
        }
        float hn[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          hn[e] = alpha * hs[v][e];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            hn[e] = fmaf(vp[r], kp[r][v][e], hn[e]);
            hn[e] = fmaf(vc[r], kc[r][v][e], hn[e]);
          }
        }
        __stcs(reinterpret_cast<float4*>(ssm + int64_t(p) * N + nv[v]), make_float4(hn[0], hn[1], hn[2], hn[3]));
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int e = 0; e < 4; ++e) part[r] = fmaf(hn[e], qc[r][v][e], part[r]);
        }
      }
      const float y = reduce_ranks<R>(part, lane);
      const int r = rank_of_lane<R>(lane);
      if (lane % rank_span<R>() == 0 && r < R) ybuf[r * P + p] = y + dskip[r * P + p];
    };
    if (whole) {  // groups of 4 rows, their staged values read before the first FMA
      for (int p0 = 4 * warp; p0 < P; p0 += 4 * kWarps) {
        float hs[4][VPL][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int v = 0; v < VPL; ++v) load4(sb + l.h + (p0 + i) * N + nv[v], hs[i][v]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) row(p0 + i, hs[i], std::false_type{});
      }
    } else {
      for (int p = warp; p < P; p += kWarps) {
        float hs[VPL][4] = {};
#pragma unroll
        for (int v = 0; v < VPL; ++v) {
          if (on[v]) load4(sb + l.h + p * N + nv[v], hs[v]);
        }
        row(p, hs, std::true_type{});
      }
    }
    __syncthreads();

    // 4. Output stage.
    auto y_at = [&](int i) { return ybuf[i]; };
    if (a.p.norm) {
      output_norm_scales(y_at, R, P, warp, kWarps, lane, misc);
      __syncthreads();
    }
    if (tid < P) {
      const int p = tid;
      const float acc = gated_output(
          R, kMimo, sb[l.z + p],
          [&](int r) {
            const float y = y_at(r * P + p);
            return a.p.norm ? y * misc[r] * ring[bl.nw + p] : y;
          },
          [&](int r) { return ring[bl.mz + (r % R) * P + p]; }, [&](int r) { return ring[bl.mo + (r % R) * P + p]; });
      store_output(a.o, int64_t(b) * a.d_inner + int64_t(h) * P + p, acc, a.o_bf16);
      a.st.v[item * P + p] = sb[l.x + p];
    }
  }
  wait_pending<0>();  // no copy outlives the block
}

template <int R, int VPL, int STAGES>
bool launch(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch, int blocks_per_head) {
  const auto kernel = mamba3_stream_decode_kernel<R, VPL, STAGES>;
  const size_t bytes = shared_bytes<STAGES>(a.P, a.N, R, a.S);
  // The dynamic limit is raised once per instantiation to what the device allows; shapes beyond it fall back.
  static int limit = [&] {
    int device = 0, optin = 0;
    MAMBA3_CUDA_CHECK(cudaGetDevice(&device));
    MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attr{};
    MAMBA3_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const int dyn = optin - int(attr.sharedSizeBytes);
    MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn));
    return dyn;
  }();
  if (bytes > size_t(limit)) return false;
  thread_local size_t known_bytes = 0;  // the occupancy of the last shape asked (a model asks for one or two)
  thread_local int per_sm = 0;
  if (bytes != known_bytes) {
    MAMBA3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, bytes));
    known_bytes = bytes;
  }
  if (per_sm < 1) return false;
  static const int sms = device_info().sm_count;
  // Blocks per head: as many as fill the device once (every block resident), at most one per sequence.
  int64_t nb = blocks_per_head > 0 ? blocks_per_head : std::max<int64_t>(1, int64_t(per_sm) * std::max(sms, 1) / a.H);
  nb = std::min<int64_t>(nb, batch);
  const StageLayout sl = stage_layout(a.P, a.N, R, a.S);
  BlockLayout bl = block_layout(a.P, a.N, R, R > 1);
  for (int* f :
       {&bl.bias, &bl.mx, &bl.mz, &bl.mo, &bl.nw, &bl.wn, &bl.kq, &bl.coef, &bl.dskip, &bl.ybuf, &bl.cs, &bl.sn})
    *f += STAGES * sl.floats;
  launch_pdl(false, kernel, int(int64_t(a.H) * nb), kThreads, bytes, s, a, int(batch), int(nb), sl, bl);
  return true;
}

template <int VPL, int STAGES>
bool launch_rank(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch, int blocks_per_head) {
  switch (a.R) {
    case 1: return launch<1, VPL, STAGES>(s, a, batch, blocks_per_head);
    case 2: return launch<2, VPL, STAGES>(s, a, batch, blocks_per_head);
    case 3: return launch<3, VPL, STAGES>(s, a, batch, blocks_per_head);
    default: return launch<4, VPL, STAGES>(s, a, batch, blocks_per_head);
  }
}

}  // namespace

bool mamba3_stream_decode_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch, int blocks_per_head,
                              int stages) {
  if (batch < 1 || batch * a.H >= (int64_t(1) << 31)) return false;
  if (a.N % 4 != 0 || a.N > kMaxN || a.P > kMaxP || a.R < 1 || a.R > kMaxR || a.S > a.N / 2) return false;
  if (a.G < 1 || a.H % a.G != 0 || a.mimo != (a.R > 1)) return false;
  if (reinterpret_cast<uintptr_t>(a.st.ssm) % 16 != 0 || reinterpret_cast<uintptr_t>(a.st.k) % 16 != 0) return false;
  const bool deep = stages >= 3;
  if (a.N <= 128)
    return deep ? launch_rank<1, 3>(s, a, batch, blocks_per_head) : launch_rank<1, 2>(s, a, batch, blocks_per_head);
  // N > 128: SISO only (MIMO's k, q and rows of two float4 slices per lane spill past 128 registers).
  if (a.R > 1) return false;
  return deep ? launch<1, 2, 3>(s, a, batch, blocks_per_head) : launch<1, 2, 2>(s, a, batch, blocks_per_head);
}

}  // namespace mamba3::cuda
