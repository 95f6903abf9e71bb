#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_pipeline.h>

#include "cuda/bulk_copy.cuh"
#include "cuda/mamba3_decode_gpu.h"
#include "cuda/mamba3_gpu_math.cuh"
#include "cuda/mamba3_head_decode_tc.cuh"

#include "cuda/cuda_check.h"
#include "cuda/mamba3_stage_gpu.h"
#include "cuda/pdl.h"

namespace mamba3::cuda {
namespace {

constexpr int kMaxP = 128;
constexpr int kMaxN = 256;

// The deferred writes' weights of entries 0 … m (m ≤ MAXW; w zero past m) and, returned, A: from the newest entry
// back, w_j gets γ_j·Π α_{j+1..m}, w_{j−1} gets β_j·Π α_{j+1..m}, then the product takes α_j; A is the product over
// every entry after the base. At m = 1: A = α, w_0 = β, w_1 = γ exactly. scalars(j) gives entry j's (α, β, γ).
template <int MAXW, typename Scalars>
__device__ __forceinline__ float deferred_weights(int m, float (&w)[MAXW + 1], Scalars scalars) {
  float prod = 1.0f;
#pragma unroll
  for (int i = 0; i <= MAXW; ++i) w[i] = 0.0f;
#pragma unroll
  for (int j = MAXW; j >= 1; --j) {
    if (j > m) continue;
    const float3 s = scalars(j);
    w[j] += s.z * prod;
    w[j - 1] += s.y * prod;
    prod *= s.x;
  }
  return prod;
}

// A ring entry: k of every rank (R·N), x (P), α, β, γ; rounded up to 16 bytes so that every entry's k is aligned.
__host__ __device__ constexpr int64_t ring_entry_floats(int R, int N, int P) {
  return (int64_t(R) * N + P + 3 + 3) / 4 * 4;
}

// How a block covers a head (P rows of N state floats): 8 warps, one warp per row, a lane holding float4s
// (n = 4·lane + 128·v, v < VPL); RG = 8 rows in flight per warp, all requested before the first FMA; ≤ 80 registers
// (3 blocks per SM) for SISO, ≤ 128 (2 blocks) for MIMO, whose k_{−1}, k, q take 12·R registers.
// Measured on an H200 (1.5B, b128, ncu), with the staging of the head in the kernel: SISO 173 µs per layer (64 % of
// DRAM bandwidth; before: 158 µs + 21.5 µs of staging launch), MIMO R = 4 293 µs (before: 266 + 68 + 6.4 µs). Tried
// and dropped: 4 warps with 16–32 rows each (more bytes in flight per warp, fewer warps): 185 / 323 µs; per-row
// scalars staged in shared memory: 174 µs; MIMO with 2 warps per row on float2 slices (half the k/q registers,
// 3 blocks per SM): 9.12 vs 9.10 ms per step, no gain.
// TC: MIMO rows on tensor cores (mamba3_head_decode_tc.cuh; P = 64, N = 128): the state bulk-copied into shared
// memory, no k/q registers: 64 registers, 4 blocks per SM (at 3 blocks, 79 registers: 6.03–6.07 ms per step of the
// 1.5B MIMO b128 against 5.73).
template <int R, int VPL, bool TC = false>
struct DecodeLayout {
  static constexpr int kWarps = 8;
  static constexpr int kRows = VPL == 1 ? 8 : (R == 1 ? 4 : (R == 2 ? 2 : 1));
  static constexpr int kMinBlocks = TC ? 4 : (R == 1 ? 3 : 2);
};

__device__ __forceinline__ void load_vec(const float* p, float (&d)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  d[0] = t.x, d[1] = t.y, d[2] = t.z, d[3] = t.w;
}
__device__ __forceinline__ void store_vec(float* p, const float (&d)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(d[0], d[1], d[2], d[3]);
}

// Four consecutive state elements held between their streamed load and their use: f32 as loaded, bf16 packed (two
// per register, widened exactly at use), so that the bf16-state mode holds half the registers for its rows in flight.
template <typename T>
struct StateQuad;
template <>
struct StateQuad<float> {
  float4 v;
  __device__ __forceinline__ void load_stream(const float* p) { v = __ldcs(reinterpret_cast<const float4*>(p)); }
  __device__ __forceinline__ float at(int e) const { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }
};
template <>
struct StateQuad<__nv_bfloat16> {
  uint2 u;
  __device__ __forceinline__ void load_stream(const __nv_bfloat16* p) { u = __ldcs(reinterpret_cast<const uint2*>(p)); }
  __device__ __forceinline__ float at(int e) const {
    const unsigned w = e < 2 ? u.x : u.y;
    return __uint_as_float(e % 2 == 0 ? w << 16 : w & 0xffff0000u);
  }
};

// One block per (b, h): the whole decode step of one head (spec §2–§7), nothing staged by an earlier kernel.
//  1. Requests at once: the warp's first RG state rows, the cached k_{−1} (R·N), the raw B/C rows of its rank
//     (warps w < 2R: rank w/2, B or C) with their norm weights and biases, the angle state and θ, x, x_{−1} and the
//     MIMO x vectors, and (cp.async) z, x, norm and MIMO z/o vectors for the output stage.
//  2. One thread per angle (the block's last S threads) updates it in place (it alone reads and writes it) and
//     tabulates its sine and cosine; warps w < 2R norm their vector (warp sum); one thread computes α, β, γ. Barrier.
//  3. Bias and rotation → the new k and q of every rank in shared memory; warps w < 2R with B cache the new k (every
//     read of the old one was issued before the barrier); the per-row coefficients vp, vc and the D skip. Barrier.
//  4. Per row: h' = α·h + Σ_r vp_r·k_{−1,r} + vc_r·k_r (streamed back), y_r = h'·q_r (warp reduction) + D·mx_r·x.
//  5. Output stage of spec §7 over the head (per-head norm, gate, MIMO contraction); x becomes x_{−1}.
// BF16S: the bf16-state mode (the ssm state read from and written to st.ssm16 as bf16; arithmetic in f32).
// LW > 1: deferred state writes every LW-th step (mamba3_decode_gpu.h): the pending tokens' k in registers beside
// k_{−1}, their coefficients in the row table after vp, the state stored only when the head's turn comes.
template <int R, int VPL, bool TC, bool BF16S, int LW = 1>
__global__ void __launch_bounds__(DecodeLayout<R, VPL, TC>::kWarps * 32, DecodeLayout<R, VPL, TC>::kMinBlocks)
    mamba3_head_decode_kernel(Mamba3DecodeArgs a, bool early_state) {
  using StateT = std::conditional_t<BF16S, __nv_bfloat16, float>;
  using Layout = DecodeLayout<R, VPL, TC>;
  constexpr int kP = TC ? kHeadTcP : kMaxP;  // the channels the per-channel arrays hold
  static_assert(!TC || (R > 1 && VPL == 1), "the tensor-core rows are MIMO's at N = 128");
  static_assert(LW == 1 || R == 1 || TC, "deferred writes: SISO on the FMA rows, MIMO on the tensor-core rows");
  constexpr bool kLazy = LW > 1;
  // Row table: (vp, vc) per rank, or with deferred writes entry i's w_i·mx_r·x_i at column i·R + r (i < LW: the
  // base and the ring, zero past the pending ones) and the new token's at LW·R + r (TC: padded to whole k-steps).
  constexpr int VW = 4, RG = Layout::kRows, kThreads = Layout::kWarps * 32;
  constexpr int CS = !kLazy ? coef_stride<R>() : (TC ? head_tc_kpad(R, LW) : head_tc_terms(R, LW));
  constexpr bool kMimo = R > 1;  // the host sends MIMO layers of rank 1 elsewhere
  __shared__ float ybuf[R * kP];  // (r, p)
  __shared__ float dskip[R * kP];  // (r, p): D·mx_r·x
  __shared__ __align__(16) float coef[kP * CS];  // (p, vp_0..vp_{R−1}, vc_0..vc_{R−1})
  __shared__ __align__(16) float kq[TC ? 4 : 2 * R * kMaxN];  // (B/C, r, n): the new k and q
  // TC: K (cached and new k of every rank) and Q rows in the products' bank-spread layout; the right column half's y.
  __shared__ __align__(16) float ktab[TC ? head_tc_kpad(R, LW) * kHeadTcPitch : 4], qtab[TC ? kHeadTcQFloats : 4];
  __shared__ float yhalf[TC ? R * kP : 4];
  // TC, deferred writes, a step without the head's write: the K rows' dot products with the Q rows (term j, rank r).
  __shared__ float gtab[TC && kLazy ? head_tc_terms(R, LW) * R : 1];
  extern __shared__ __align__(128) float hstage[];  // TC: the head's P × N state (dynamic shared memory)
  __shared__ __align__(8) uint64_t hstage_full;     // TC: the state's bulk copy has landed
  __shared__ float ang_cs[kMaxN / 2], ang_sn[kMaxN / 2];
  __shared__ float scal[kLazy ? LW + 2 : 3];  // α, β, γ; deferred: A, w_0 … w_m (m ≤ LW)
  __shared__ float misc[R];
  // The output stage's per-channel inputs (channel p = tid; P ≤ kP ≤ the block's threads), copied by cp.async at
  // the start so that they arrive with the state rows.
  static_assert(kP <= kThreads, "the output stage takes one channel per thread");
  __shared__ float zx_own[3 * kP];  // z, x, norm weight of channel p at p, kP + p, 2·kP + p
  __shared__ float mzo[2 * R * kP];  // MIMO z and o vectors (2, r, p)
  pdl_trigger();
  if (!early_state) pdl_wait();
  const int item = blockIdx.x, H = a.H, P = a.P, N = a.N, S = a.S;
  const int b = item / H, h = item % H;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, warps = kThreads / 32;
  const int group = warp, groups = warps;
  const float* zrow = a.zx + int64_t(b) * a.d_in;
  const float* xrow = zrow + a.off_x + int64_t(h) * P;
  float* vstate = a.st.v + int64_t(item) * P;
  StateT* ssm;
  if constexpr (BF16S)
    ssm = reinterpret_cast<StateT*>(a.st.ssm16) + int64_t(item) * P * N;
  else
    ssm = a.st.ssm + int64_t(item) * P * N;
  StateT* const hst = reinterpret_cast<StateT*>(hstage);
  int nv[VPL];
  bool on[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    nv[v] = VW * lane + 128 * v;
    on[v] = nv[v] < N;
  }

  // 1. Loads. The warp's first row group (TC: the whole state, by one bulk copy): in flight through the staging.
  if constexpr (TC) {
    if (tid == 0) {
      uint64_t policy;  // read once per step: L2 evicts it first
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
      mbar_init(&hstage_full);
      mbar_init_fence();
      bulk_copy(hstage, reinterpret_cast<const float*>(ssm), unsigned(kHeadTcP * kHeadTcN * sizeof(StateT)),
                &hstage_full, policy);
    }
  }
  StateQuad<StateT> hs[RG][VPL];
  auto load_rows = [&](int p0) {
#pragma unroll
    for (int i = 0; i < RG; ++i) {
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        if (p0 + i < P && on[v]) hs[i][v].load_stream(ssm + int64_t(p0 + i) * N + nv[v]);
      }
    }
  };
  if constexpr (!TC) load_rows(group * RG);
  const int64_t rhn = int64_t(R) * H * N;
  float* kcache = a.st.k + int64_t(b) * rhn + int64_t(h) * N;  // rank r at + r·H·N
  // The vector of warps w < 2R: rank w/2, B (even w) or C. A lane's elements n and, for the rotation, their pair
  // partners: SISO (2j, 2j + 1) inside the lane's float4, MIMO (j, j + N/2) in another lane's (loaded as well).
  const bool stager = warp < 2 * R;
  const int vr = warp / 2;
  const bool is_c = warp & 1;
  float kp[R][VPL][VW], kc[R][VPL][VW], qc[R][VPL][VW];
  float kown[VW] = {};  // TC: the B warp's cached k of its rank (into the K table in phase 3)
  if constexpr (TC) {
    if (stager && !is_c) load_vec(kcache + int64_t(vr) * H * N + nv[0], kown);
  } else {
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int e = 0; e < VW; ++e) kp[r][v][e] = kc[r][v][e] = qc[r][v][e] = 0.0f;
        if (on[v]) load_vec(kcache + int64_t(r) * H * N + nv[v], kp[r][v]);
      }
    }
  }
  // Deferred writes: the head's count of pending tokens (m_prev, in ring entries 0 … m_prev − 1) and its step phase;
  // this token is entry m = m_prev + 1 counting the base (k_{−1}, x_{−1} in the k and v states) as entry 0. The
  // ring's k and x are loaded for the pending entries only (requesting every entry with the count word and masking
  // after it arrived spilled at W = 4: 1.5B SISO b128 5.45 → 5.70 ms on an H100). The scalars thread copies every
  // entry's α, β, γ into ring_scal at once (its deferred weights were a chain of dependent loads).
  int m_prev = 0, phase = 0;
  bool flush = true;
  float* ring = nullptr;
  float kr[LW > 1 ? LW - 1 : 1][VPL][VW];
  const int64_t ring_entry = kLazy ? ring_entry_floats(R, N, P) : 0;
  const bool scalars_thread = tid == (2 * R * 32) % kThreads;  // α, β, γ and the deferred weights (step 2)
  __shared__ __align__(16) float ring_scal[kLazy ? 4 * (LW - 1) : 4];
  if constexpr (kLazy) {
    const int word = a.st.lazy[item];
    m_prev = min(word & 0xff, LW - 1);
    phase = (word >> 8) & 0xff;
    flush = (phase + h) % LW == LW - 1 || m_prev == LW - 1;
    ring = a.st.ring + int64_t(item) * (LW - 1) * ring_entry;
    if (scalars_thread) {
#pragma unroll
      for (int j = 0; j < LW - 1; ++j) {
#pragma unroll
        for (int c = 0; c < 3; ++c)  // α, β, γ (at R·N + P: 4-byte aligned only, P may be odd)
          __pipeline_memcpy_async(ring_scal + 4 * j + c, ring + j * ring_entry + R * N + P + c, 4);
      }
    }
#pragma unroll
    for (int j = 0; j < LW - 1; ++j) {
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
#pragma unroll
        for (int e = 0; e < VW; ++e) kr[j][v][e] = 0.0f;
        // FMA rows (SISO): every lane; tensor-core rows: the B warp of rank vr, for the K table.
        if ((!TC || (stager && !is_c)) && on[v] && j < m_prev)
          load_vec(ring + j * ring_entry + (TC ? vr : 0) * N + nv[v], kr[j][v]);
      }
    }
  }
  // early_state: the state rows and the cached k above were requested before waiting for the kernel before this one
  // (in_proj, which writes zx): under PDL they stream beside its last blocks. The host sets it only for a state its
  // caller marks settled: last written before the step began, which a graph replay or a plain launch at the step's
  // start (the embedding) has seen finish (pdl.h, Mamba3GpuState::settled).
  if (early_state) pdl_wait();
  const bool own = tid < P;
  if (own) {
    __pipeline_memcpy_async(zx_own + tid, zrow + int64_t(h) * P + tid, 4);
    __pipeline_memcpy_async(zx_own + kP + tid, xrow + tid, 4);
    if (a.p.norm) __pipeline_memcpy_async(zx_own + 2 * kP + tid, a.p.norm + int64_t(h) * P + tid, 4);
    if constexpr (kMimo) {
      for (int r = 0; r < R; ++r) {
        const int64_t m = (int64_t(h) * R + r) * P + tid;
        __pipeline_memcpy_async(mzo + r * kP + tid, a.p.mimo_z + m, 4);
        __pipeline_memcpy_async(mzo + (R + r) * kP + tid, a.p.mimo_o + m, 4);
      }
    }
  }
  __pipeline_commit();
  // Everything the staging reads from global memory is requested here, before the first barrier, so that the
  // block waits for one round trip (with its state rows) instead of one per phase.
  float raw[VPL][VW], mate[VPL][VW], wself[VPL][VW], wmate[VPL][VW], bself[VPL][VW], bmate[VPL][VW];
  const int half = N / 2;
  auto mate_of = [&](int n) { return kMimo ? (n < half ? n + half : n - half) : (n ^ 1); };
  if (stager) {
    const float* src = zrow + (is_c ? a.off_C : a.off_B) + int64_t(vr * a.G + h / (H / a.G)) * N;
    const float* w = is_c ? a.p.C_norm : a.p.B_norm;
    const float* bias = (is_c ? a.p.C_bias : a.p.B_bias) + (int64_t(h) * R + vr) * N;
    const bool src_vec = reinterpret_cast<uintptr_t>(src) % 16 == 0;  // in_proj rows are not 16-byte aligned in general
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
#pragma unroll
      for (int e = 0; e < VW; ++e) raw[v][e] = mate[v][e] = wself[v][e] = wmate[v][e] = bself[v][e] = bmate[v][e] = 0.0f;
      if (!on[v]) continue;
      load_vec(w + nv[v], wself[v]);
      load_vec(bias + nv[v], bself[v]);
      if (src_vec) {
        load_vec(src + nv[v], raw[v]);
      } else {
#pragma unroll
        for (int e = 0; e < VW; ++e) raw[v][e] = src[nv[v] + e];
      }
      if constexpr (kMimo && !TC) {  // SISO partners are in the lane's own float4; TC: by shuffle in phase 3
        if (half % 4 == 0) {  // the float4's partners are the float4 at the same place in the other half
          const int m0 = mate_of(nv[v]);
          load_vec(w + m0, wmate[v]);
          load_vec(bias + m0, bmate[v]);
          if (src_vec) {
            load_vec(src + m0, mate[v]);
          } else {
#pragma unroll
            for (int e = 0; e < VW; ++e) mate[v][e] = src[m0 + e];
          }
        } else {
#pragma unroll
          for (int e = 0; e < VW; ++e) {
            const int m = mate_of(nv[v] + e);
            mate[v][e] = src[m];
            wmate[v][e] = w[m];
            bmate[v][e] = bias[m];
          }
        }
      }
    }
  }
  // Row coefficients' inputs: channel cp of the thread (threads from the fourth warp on, away from the warps that
  // stage B/C, the angles and the scalars when R is small), all ranks.
  const int cp = (tid + kThreads - 96) % kThreads;
  const bool coef_owner = cp < P;
  float cmx[R], cxp = 0.0f, cxc = 0.0f, cxr[LW > 1 ? LW - 1 : 1] = {};
#pragma unroll
  for (int r = 0; r < R; ++r) cmx[r] = 1.0f;
  if (coef_owner) {
    if constexpr (kMimo) {
#pragma unroll
      for (int r = 0; r < R; ++r) cmx[r] = a.p.mimo_x[(int64_t(h) * R + r) * P + cp];
    }
    cxp = vstate[cp];
    cxc = xrow[cp];
    if constexpr (kLazy) {
#pragma unroll
      for (int j = 0; j < LW - 1; ++j) cxr[j] = j < m_prev ? ring[j * ring_entry + R * N + cp] : 0.0f;
    }
  }
  const float Dh = a.p.D[h];

  // A row the slot mask skips returns here, block-uniform and before the first write and barrier: its mask word is read
  // after every load above was issued, so that its round trip overlaps theirs instead of delaying them (the copies
  // into shared memory are waited for: none may land after the block has gone).
  if (mamba3_row_skipped(a.st, 1, b)) {
    __pipeline_wait_prior(0);
    if (TC && tid == 0) mbar_wait(&hstage_full, 0);  // the thread that initialised the barrier and issued the copy
    return;
  }
  // 2. Angles (the block's last S threads: angle j = tid − (kThreads − S)), the norm of the warp's vector, the
  // token's scalars (one thread of the first warp that does not stage): spread over warps, so that the chains before
  // the first barrier run side by side rather than one after another in one warp.
  if (const int j = tid - (kThreads - S); j >= 0) {
    const float dt = softplus_f(zrow[a.off_dt + h] + a.p.dt_bias[h]);
    float* angle = a.st.angle + int64_t(item) * S + j;
    const float phi = *angle;
    float ang = a.no_rotary ? phi : phi + kMamba3Pi * tanhf(zrow[a.off_angles + j]) * dt;
    ang -= kMamba3TwoPi * floorf(ang / kMamba3TwoPi);
    *angle = ang;
    sincosf(ang, &ang_sn[j], &ang_cs[j]);
  }
  if (scalars_thread) {
    const TokenScalars t = token_scalars(zrow, a.off_dt, H, h, a.p.dt_bias[h], a.heavy_tail, a.A_floor, a.euler);
    if constexpr (kLazy) {
      const int m = m_prev + 1;
      float w[LW + 1];
      __pipeline_wait_prior(0);  // ring_scal (and this thread's output-stage copies, issued with them)
      scal[0] = deferred_weights<LW>(m, w, [&](int j) {  // entry j's α, β, γ: the ring's, this token's at j = m
        const float* sj = ring_scal + 4 * (j - 1);
        return j == m ? make_float3(t.alpha, t.beta, t.gamma) : make_float3(sj[0], sj[1], sj[2]);
      });
#pragma unroll
      for (int i = 0; i <= LW; ++i) scal[1 + i] = w[i];
      if (!flush) {
        float* sm = ring + m_prev * ring_entry + R * N + P;
        sm[0] = t.alpha, sm[1] = t.beta, sm[2] = t.gamma;
      }
    } else {
      scal[0] = t.alpha, scal[1] = t.beta, scal[2] = t.gamma;
    }
  }
  float rnorm = 0.0f;
  if (stager) {
    float ss = 0.0f;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
#pragma unroll
      for (int e = 0; e < VW; ++e) ss += raw[v][e] * raw[v][e];
    }
    rnorm = rsqrtf(warp_sum(ss) / float(N) + kMamba3NormEps);
  }
  __syncthreads();

  // 3. Bias and rotation → k, q in shared memory; the new k into the cache; per-row coefficients.
  if (stager) {
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      if (!on[v]) continue;
      float out[VW];
#pragma unroll
      for (int e = 0; e < VW; ++e) {
        const int n = nv[v] + e, m = mate_of(n);
        const float self = raw[v][e] * rnorm * wself[v][e] + bself[v][e];
        // TC (N = 128, one float4 per lane): element n's partner n ± 64 is the same element of lane ± 16, normed and
        // biased there (three fewer vector loads per warp, and their registers).
        const float other = TC      ? __shfl_xor_sync(0xffffffffu, self, 16)
                            : kMimo ? mate[v][e] * rnorm * wmate[v][e] + bmate[v][e]
                                    : raw[v][e ^ 1] * rnorm * wself[v][e ^ 1] + bself[v][e ^ 1];
        const bool low = n < m;
        const int j = kMimo ? (low ? n : m) : (n >> 1);
        if (j < S) {
          const float sn = ang_sn[j], cs = ang_cs[j];
          out[e] = low ? self * cs - other * sn : other * sn + self * cs;
        } else {
          out[e] = self;
        }
      }
      if constexpr (TC) {  // N = 128: v = 0; rows at even offsets, so float2 stores
        auto put = [&](float* row, const float (&d)[VW]) {
          *reinterpret_cast<float2*>(row + nv[v]) = make_float2(d[0], d[1]);
          *reinterpret_cast<float2*>(row + nv[v] + 2) = make_float2(d[2], d[3]);
        };
        if (is_c) {
          put(qtab + head_tc_row(vr), out);
        } else {
          put(ktab + head_tc_row(vr), kown);
          if constexpr (kLazy) {
#pragma unroll
            for (int j = 0; j < LW - 1; ++j) put(ktab + head_tc_row((j + 1) * R + vr), kr[j][0]);  // zero past m_prev
            put(ktab + head_tc_row(LW * R + vr), out);
          } else {
            put(ktab + head_tc_row(R + vr), out);
          }
        }
      } else {
        store_vec(kq + (int(is_c) * R + vr) * kMaxN + nv[v], out);
      }
      if (!is_c) store_vec((flush ? kcache + int64_t(vr) * H * N : ring + m_prev * ring_entry + vr * N) + nv[v], out);
    }
  }
  const float alpha = scal[0], beta = scal[1], gamma = scal[2];
  if (coef_owner) {
    if constexpr (kLazy) {
      const int m = m_prev + 1;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        coef[cp * CS + r] = scal[1] * cmx[r] * cxp;
#pragma unroll
        for (int j = 1; j < LW; ++j) coef[cp * CS + j * R + r] = scal[1 + j] * cmx[r] * cxr[j - 1];  // 0 past m_prev
        coef[cp * CS + LW * R + r] = scal[1 + m] * cmx[r] * cxc;
        dskip[r * P + cp] = Dh * cmx[r] * cxc;
      }
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        coef[cp * CS + r] = beta * cmx[r] * cxp;
        coef[cp * CS + R + r] = gamma * cmx[r] * cxc;
        dskip[r * P + cp] = Dh * cmx[r] * cxc;
      }
    }
  }
  __syncthreads();
  if constexpr (!TC) {
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      if (!on[v]) continue;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        load_vec(kq + r * kMaxN + nv[v], kc[r][v]);
        load_vec(kq + (R + r) * kMaxN + nv[v], qc[r][v]);
      }
    }
  }
  // Deferred writes, a step in which the head does not write its state: y = A·(H_b·q) + Σ_i coef_i·(k_i·q), so the
  // rows only read H_b (one FMA per element instead of the update's 3 + W). The k_i·q of the base (entry 0), the
  // ring's entries and the new token (at LW): FMA rows, per warp (every lane holds its columns of every k); the
  // tensor-core rows, from the K and Q tables into gtab. Entries past the pending ones are zero, as are their coefs.
  [[maybe_unused]] float gk[kLazy ? LW + 1 : 1];
  if constexpr (kLazy) {
    if (!flush) {
      if constexpr (TC) {
        // Thread (j, s): K row j's column segment s against every Q row (k read once for the R ranks), Q segments per
        // row summed over Q adjacent lanes: a few pipelined loads and shuffles per thread, not a warp per product.
        constexpr int KK = head_tc_terms(R, LW);
        constexpr int Q = KK * 32 <= kThreads ? 32 : KK * 16 <= kThreads ? 16 : KK * 8 <= kThreads ? 8 : 4;
        constexpr int SEG = kHeadTcN / Q;
        static_assert(KK * Q <= kThreads, "one thread per (K row, segment)");
        const bool act = tid < KK * Q;
        const int j = act ? tid / Q : 0, c0 = (tid % Q) * SEG;
        const float* kt = ktab + head_tc_row(j) + c0;  // rows at even offsets: float2 loads
        float g[R];
#pragma unroll
        for (int r = 0; r < R; ++r) g[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < SEG; c += 2) {
          const float2 k = *reinterpret_cast<const float2*>(kt + c);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float2 q = *reinterpret_cast<const float2*>(qtab + head_tc_row(r) + c0 + c);
            g[r] = fmaf(k.y, q.y, fmaf(k.x, q.x, g[r]));
          }
        }
#pragma unroll
        for (int o = 1; o < Q; o <<= 1) {
#pragma unroll
          for (int r = 0; r < R; ++r) g[r] += __shfl_xor_sync(0xffffffffu, g[r], o);
        }
        if (act && tid % Q == 0) {
#pragma unroll
          for (int r = 0; r < R; ++r) gtab[j * R + r] = g[r];
        }
        __syncthreads();  // block-uniform: flush is the head's
      } else {
        float sk[LW + 1];
#pragma unroll
        for (int i = 0; i <= LW; ++i) sk[i] = 0.0f;
#pragma unroll
        for (int v = 0; v < VPL; ++v) {
#pragma unroll
          for (int e = 0; e < VW; ++e) {  // lanes past N hold zeros
            const float q = qc[0][v][e];
            sk[0] = fmaf(kp[0][v][e], q, sk[0]);
#pragma unroll
            for (int j = 0; j < LW - 1; ++j) sk[1 + j] = fmaf(kr[j][v][e], q, sk[1 + j]);
            sk[LW] = fmaf(kc[0][v][e], q, sk[LW]);
          }
        }
#pragma unroll
        for (int i = 0; i <= LW; ++i) gk[i] = warp_sum(sk[i]);
      }
    }
  }

  // 4. Rows. Group g takes rows [RG·g, RG·g + RG), then the same RG·groups further on. Whole groups of whole float4
  // rows (P a multiple of RG·groups, N = 128·VPL: the common shapes) run without per-row bound checks, as straight-line
  // code in which the compiler can overlap one row's warp reduction with the next row's FMAs.
  auto rows = [&](auto checked, auto read_only) {
    constexpr bool kChecked = decltype(checked)::value;
    constexpr bool kReadOnly = decltype(read_only)::value;  // deferred, not this head's write: y from H_b and gk
    for (int p0 = group * RG; p0 < P; p0 += groups * RG) {
      if (p0 != group * RG) load_rows(p0);
#pragma unroll
      for (int i = 0; i < RG; ++i) {
        const int p = p0 + i;
        if constexpr (kChecked) {
          if (p >= P) break;  // warp-uniform
        }
        float vp[R], vc[R], part[R];
        [[maybe_unused]] float cr[LW > 1 ? LW - 1 : 1];
        if constexpr (kLazy) {  // R = 1 here
          vp[0] = coef[p * CS], vc[0] = coef[p * CS + LW];
#pragma unroll
          for (int j = 0; j < LW - 1; ++j) cr[j] = coef[p * CS + 1 + j];
        } else {
          load_coefs<R>(coef + p * CS, vp, vc);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) part[r] = 0.0f;
#pragma unroll
        for (int v = 0; v < VPL; ++v) {
          if constexpr (kChecked) {
            if (!on[v]) continue;
          }
          if constexpr (kReadOnly) {
#pragma unroll
            for (int e = 0; e < VW; ++e) part[0] = fmaf(hs[i][v].at(e), qc[0][v][e], part[0]);
          } else {
            float hn[VW];
#pragma unroll
            for (int e = 0; e < VW; ++e) {
              hn[e] = alpha * hs[i][v].at(e);
#pragma unroll
              for (int r = 0; r < R; ++r) {
                hn[e] = fmaf(vp[r], kp[r][v][e], hn[e]);
                if constexpr (kLazy) {
#pragma unroll
                  for (int j = 0; j < LW - 1; ++j) hn[e] = fmaf(cr[j], kr[j][v][e], hn[e]);
                }
                hn[e] = fmaf(vc[r], kc[r][v][e], hn[e]);
              }
            }
            state_store4_stream(ssm + int64_t(p) * N + nv[v], hn);  // deferred: this step is the head's write
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
              for (int e = 0; e < VW; ++e) part[r] = fmaf(hn[e], qc[r][v][e], part[r]);
            }
          }
        }
        float y = reduce_ranks<R>(part, lane);
        if constexpr (kReadOnly) {  // R = 1
          float c = vc[0] * gk[LW];
#pragma unroll
          for (int j = LW - 2; j >= 0; --j) c = fmaf(cr[j], gk[1 + j], c);
          y = fmaf(alpha, y, fmaf(vp[0], gk[0], c));
        }
        const int r = rank_of_lane<R>(lane);
        if (lane % rank_span<R>() == 0 && r < R) ybuf[r * P + p] = y + dskip[r * P + p];
      }
    }
  };
  if constexpr (TC) {
    mbar_wait(&hstage_full, 0);  // its initialisation was published by the barriers above
    bool read_only = false;
    if constexpr (kLazy) {
      read_only = !flush;
      if (read_only)
        head_tc_read_only_y<R, CS, head_tc_terms(R, LW)>(hst, head_tc_lane(warp, lane), alpha, coef, gtab, qtab, dskip,
                                                         ybuf, yhalf);
    }
    if (!read_only)
      head_tc_rows<R, CS, head_tc_terms(R, LW)>(hst, ssm, head_tc_lane(warp, lane), alpha, coef, ktab, qtab, dskip,
                                                ybuf, yhalf);
  } else {
    const bool whole = P % (groups * RG) == 0 && N == 128 * VPL;
    bool read_only = false;
    if constexpr (kLazy) {
      read_only = !flush;
      if (read_only) whole ? rows(std::false_type{}, std::true_type{}) : rows(std::true_type{}, std::true_type{});
    }
    if (!read_only) whole ? rows(std::false_type{}, std::false_type{}) : rows(std::true_type{}, std::false_type{});
  }
  __pipeline_wait_prior(0);
  __syncthreads();

  // 5. Output stage (spec §7), as the other decode kernels compute it. TC: y in two column halves (ybuf holds the
  // D skip).
  auto y_at = [&](int i) { return TC ? ybuf[i] + yhalf[i] : ybuf[i]; };
  if (a.p.norm) {
    output_norm_scales(y_at, R, P, warp, warps, lane, misc);
    __syncthreads();
  }
  const int64_t o_base = int64_t(b) * a.d_inner + int64_t(h) * P;
  if (own) {
    const int p = tid;
    const float acc = gated_output(
        R, kMimo, zx_own[p],
        [&](int r) {
          const float y = y_at(r * P + p);
          return a.p.norm ? y * misc[r] * zx_own[2 * kP + p] : y;
        },
        [&](int r) { return mzo[(r % R) * kP + p]; }, [&](int r) { return mzo[(R + r % R) * kP + p]; });
    store_output(a.o, o_base + p, acc, a.o_bf16);
    // every read of x_{−1} (and of the ring's x) happened before the second barrier
    (flush ? vstate : ring + m_prev * ring_entry + R * N)[p] = zx_own[kP + p];
  }
  if (kLazy && tid == 0) a.st.lazy[item] = (flush ? 0 : m_prev + 1) | (((phase + 1) % LW) << 8);
}

template <int R, int VPL, bool BF16S, bool TC = false, int LW = 1>
void launch(cudaStream_t s, const Mamba3DecodeArgs& a, int blocks, bool early_state) {
  const auto kernel = mamba3_head_decode_kernel<R, VPL, TC, BF16S, LW>;
  size_t dynamic = 0;
  if constexpr (TC) {
    dynamic = size_t(kHeadTcP) * kHeadTcN * (BF16S ? 2 : 4);
    static const bool raised = [&] {  // past the 48 KB default with the static arrays
      MAMBA3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic)));
      return true;
    }();
    (void)raised;
  }
  launch_pdl(pdl_small(blocks / a.H) || a.st.pdl_any_batch, kernel, blocks, DecodeLayout<R, VPL, TC>::kWarps * 32,
             dynamic, s, a, early_state);
}

template <int VPL, bool BF16S>
void launch_rank(cudaStream_t s, const Mamba3DecodeArgs& a, int blocks, bool early) {
  switch (a.R) {
    case 1:
      launch<1, VPL, BF16S>(s, a, blocks, early);
      break;
    case 2:
      launch<2, VPL, BF16S>(s, a, blocks, early);
      break;
    case 3:
      launch<3, VPL, BF16S>(s, a, blocks, early);
      break;
    default:
      launch<4, VPL, BF16S>(s, a, blocks, early);
      break;
  }
}

template <bool BF16S, int LW = 1>
void launch_tc(cudaStream_t s, const Mamba3DecodeArgs& a, int blocks, bool early) {
  switch (a.R) {
    case 2:
      launch<2, 1, BF16S, true, LW>(s, a, blocks, early);
      break;
    case 3:
      launch<3, 1, BF16S, true, LW>(s, a, blocks, early);
      break;
    default:
      launch<4, 1, BF16S, true, LW>(s, a, blocks, early);
      break;
  }
}

template <int VPL, bool BF16S>
void launch_deferred(cudaStream_t s, const Mamba3DecodeArgs& a, int blocks, bool early) {
  if (a.st.write_every == 2)
    launch<1, VPL, BF16S, false, 2>(s, a, blocks, early);
  else
    launch<1, VPL, BF16S, false, 4>(s, a, blocks, early);
}

template <bool BF16S>
void launch_head(cudaStream_t s, const Mamba3DecodeArgs& a, int blocks, bool tensor_cores, bool early) {
  if (a.st.write_every > 1 && a.R > 1) {  // MIMO: the tensor-core rows (mamba3_head_decode_gpu checked the shape)
    if (a.st.write_every == 2)
      launch_tc<BF16S, 2>(s, a, blocks, early);
    else
      launch_tc<BF16S, 4>(s, a, blocks, early);
  } else if (a.st.write_every > 1) {  // SISO, N ≤ 128
    launch_deferred<1, BF16S>(s, a, blocks, early);
  } else if (tensor_cores && head_decode_tc_fits(a))
    launch_tc<BF16S>(s, a, blocks, early);
  else if (a.N <= 128)
    launch_rank<1, BF16S>(s, a, blocks, early);
  else
    launch_rank<2, BF16S>(s, a, blocks, early);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// One block per (row, head): the pending tokens folded into the base state (the expressions of the head kernel's
// deferred rows, without a new token), the newest entry's k and x made the k and v states, the count cleared.
template <typename StateT>
__global__ void mamba3_settle_kernel(Mamba3GpuState st, const float* mimo_x, int H, int P, int N, int R) {
  const int item = blockIdx.x, b = item / H, h = item % H, tid = threadIdx.x;
  const int LW = st.write_every, word = st.lazy[item];
  const int m = min(word & 0xff, LW - 1);
  if (m == 0) return;
  const int64_t E = ring_entry_floats(R, N, P);
  const float* ring = st.ring + int64_t(item) * (LW - 1) * E;
  __shared__ float w[kMaxStateWriteEvery + 1];
  __shared__ float A;
  if (tid == 0) {
    float wl[kMaxStateWriteEvery + 1];
    A = deferred_weights<kMaxStateWriteEvery>(m, wl, [&](int j) {
      const float* sj = ring + (j - 1) * E + R * N + P;
      return make_float3(sj[0], sj[1], sj[2]);
    });
    for (int i = 0; i <= m; ++i) w[i] = wl[i];
  }
  __syncthreads();
  StateT* ssm;
  if constexpr (std::is_same_v<StateT, float>)
    ssm = st.ssm + int64_t(item) * P * N;
  else
    ssm = reinterpret_cast<StateT*>(st.ssm16) + int64_t(item) * P * N;
  const int64_t rhn = int64_t(R) * H * N;
  float* k0 = st.k + int64_t(b) * rhn + int64_t(h) * N;  // rank r at + r·H·N
  float* x0 = st.v + int64_t(item) * P;
  for (int idx = tid; idx < P * N; idx += blockDim.x) {
    const int p = idx / N, n = idx % N;
    float acc = A * float(ssm[idx]);
    for (int r = 0; r < R; ++r) {
      const float mx = mimo_x ? mimo_x[(int64_t(h) * R + r) * P + p] : 1.0f;
      acc = fmaf(w[0] * mx * x0[p], k0[r * H * N + n], acc);
      for (int i = 1; i <= m; ++i) {
        const float* ei = ring + (i - 1) * E;
        acc = fmaf(w[i] * mx * ei[R * N + p], ei[r * N + n], acc);
      }
    }
    if constexpr (std::is_same_v<StateT, float>)
      ssm[idx] = acc;
    else
      ssm[idx] = __float2bfloat16_rn(acc);
  }
  __syncthreads();  // every read of the old k and x is done
  const float* newest = ring + (m - 1) * E;
  for (int i = tid; i < R * N; i += blockDim.x) k0[(i / N) * H * N + i % N] = newest[i];
  for (int p = tid; p < P; p += blockDim.x) x0[p] = newest[R * N + p];
  if (tid == 0) st.lazy[item] = word & ~0xff;
}

}  // namespace

int64_t mamba3_ring_entry_floats(const Mamba3Config& c) {
  return ring_entry_floats(int(c.rank()), int(c.d_state), int(c.headdim));
}

int64_t mamba3_ring_floats_per_head(const Mamba3Config& c, int write_every) {
  return write_every > 1 ? (write_every - 1) * mamba3_ring_entry_floats(c) : 0;
}

void mamba3_settle_gpu(cudaStream_t s, const Mamba3Config& c, const float* mimo_x, const Mamba3GpuState& st,
                       int64_t batch) {
  if (st.write_every <= 1 || batch <= 0) return;
  const int64_t blocks = batch * c.nheads();
  MAMBA3_CHECK(blocks < (int64_t(1) << 31), "mamba3_settle_gpu: batch {} too large", batch);
  const int H = int(c.nheads()), P = int(c.headdim), N = int(c.d_state), R = int(c.rank());
  if (st.ssm16)
    mamba3_settle_kernel<__nv_bfloat16><<<unsigned(blocks), 256, 0, s>>>(st, mimo_x, H, P, N, R);
  else
    mamba3_settle_kernel<float><<<unsigned(blocks), 256, 0, s>>>(st, mimo_x, H, P, N, R);
  MAMBA3_LAUNCH_CHECK();
}

bool head_decode_tc_fits(const Mamba3DecodeArgs& a) { return a.R > 1 && a.P == kHeadTcP && a.N == kHeadTcN; }

bool mamba3_head_decode_reaches(const Mamba3KernelShape& a) {
  if (a.N % 4 != 0 || a.N > kMaxN || a.P > kMaxP || a.R < 1 || a.R > 4) return false;
  return a.S <= a.N / 2 && a.G >= 1 && a.H % a.G == 0 && a.mimo == (a.R > 1);
}

bool mamba3_head_decode_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch, bool tensor_cores,
                            bool early_state) {
  const int64_t blocks = batch * a.H;
  if (!mamba3_head_decode_reaches(a) || blocks >= (int64_t(1) << 31)) return false;
  if (!aligned16(a.st.ssm16 ? static_cast<const void*>(a.st.ssm16) : a.st.ssm) || !aligned16(a.st.k)) return false;
  const bool early = early_state && a.st.settled;  // see Mamba3GpuState::settled
  if (a.st.write_every > 1) {
    MAMBA3_CHECK(((a.R == 1 && a.N <= 128) || head_decode_tc_fits(a)) &&
                     (a.st.write_every == 2 || a.st.write_every == kMaxStateWriteEvery) && a.st.lazy && a.st.ring &&
                     aligned16(a.st.ring),
                 "mamba3_head_decode_gpu: deferred state writes need SISO at N ≤ 128 or MIMO at P = 64, N = 128, W 2 "
                 "or 4 and the state's ring");
  }
  if (a.st.ssm16)
    launch_head<true>(s, a, int(blocks), tensor_cores, early);
  else
    launch_head<false>(s, a, int(blocks), tensor_cores, early);
  return true;
}

}  // namespace mamba3::cuda
