#pragma once
// The head decode kernel's MIMO rows on tensor cores (P = 64, N = 128, 2 ≤ R ≤ 4), with the state held in the
// products' accumulator registers from its load to its store:
//   h' = α·h + V·K   V (P × 2R): vp_r = β·mx_r·x_{−1}, vc_r = γ·mx_r·x;  K (2R × N): cached k of rank r, new k of r
//   y  = h'·Qᵀ       Q (R × N): the new q of every rank
// Both as m16n8k8 TF32 products with 3×TF32 (each operand split into a TF32 head and remainder, the remainders'
// product dropped: relative error ~2^-21 per term against ~2^-24 for an f32 FMA). The split rounds by integer add and
// mask (five instructions for both parts) instead of cvt.rna.tf32, which sm_90 emulates in ~10. y by f32 FMAs on the
// accumulators (2R per lane and tile, q of every rank from shared memory, no splits: 10 % fewer instructions) was
// measured 8 % slower in the step (H100, 1.5B b128 6.76 against 6.23 ms): the shared-memory pipe became the bound.
// Why: the FMA rows hold k_{−1}, k and q of every rank in registers (12·R per lane) next to the state rows, which
// caps MIMO R = 4 at two blocks per SM (128 registers) — too few state bytes in flight (1.5B b128: 179 µs per layer
// in the streaming kernel, 74 % of copy, while SISO's head kernel at three blocks per SM reaches 91 %). Here the
// state arrives in shared memory by one bulk copy issued at the block's start (held in registers from its load, part
// of it was spilled, and the spill stores waited for the loads: 28 % of the stall samples), a lane reads 32 values of
// it for the products, and K and Q come from shared memory per tile.
//
// Layout. Warp w takes the 16-row tile rt = w % 4 (rows 16·rt … + 15) and the column half nh = w / 4 (columns
// 64·nh … + 63). Lane (g, t) = (lane / 4, lane % 4) holds rows 16·rt + g and + 8 at the physical columns
// 64·nh + 16·m + 4·t … + 3 (m < 4) as one float4 each — 8 float4 loads and stores per lane, whole 64-byte row pieces
// per warp. Column order inside a product is free as long as K and Q use the same one: tile nt = 2m + s takes the
// float4's pair s, so the accumulator (g, 2t + e) of tile nt is physical column 16·m + 4·t + 2·s + e.
// For y the accumulators become the A fragment of the next product with k-index t ↔ column 2t, t + 4 ↔ 2t + 1.
#include <cstdint>

#include <cuda_bf16.h>

#include "cuda/mamba3_gpu_math.cuh"

namespace mamba3::cuda {

constexpr int kHeadTcP = 64, kHeadTcN = 128;
// K rows (8: cached k of ranks 0..R−1, new k of ranks 0..R−1, zero-padded) and Q rows (R) in shared memory at a pitch
// of 160 floats plus a per-row shift (0, 2, 16, 18 floats by row mod 4): a fragment's 32 lanes read rows t (or t + 4)
// at columns 4·(g / 2) + g % 2 + const, which the shifts spread over all 32 banks.
constexpr int kHeadTcPitch = 160;
__host__ __device__ constexpr int head_tc_row(int j) {
  return j * kHeadTcPitch + (j & 1) * 2 + (j & 2) * 8;
}
constexpr int kHeadTcKFloats = 8 * kHeadTcPitch, kHeadTcQFloats = 4 * kHeadTcPitch;
// The update's k-dimension: 2R rank terms, or with deferred writes every W steps (W + 1)·R (the base token's k, the
// W − 1 ring entries', the new token's), padded to whole k-steps of 8.
__host__ __device__ constexpr int head_tc_terms(int R, int W) { return W > 1 ? (W + 1) * R : 2 * R; }
__host__ __device__ constexpr int head_tc_kpad(int R, int W) { return (head_tc_terms(R, W) + 7) / 8 * 8; }

// x = head + rest, head rounded to TF32 (to nearest, ties away: add half an ulp of TF32, clear the low 13 bits) and
// rest (exact in f32, |rest| ≤ 2^-11·|x|) rounded the same way: each a TF32 value, the pair within ~2^-22·|x| of x.
__device__ __forceinline__ uint32_t round_tf32(uint32_t bits) { return (bits + 0x1000u) & 0xffffe000u; }
__device__ __forceinline__ void split_tf32(float x, uint32_t& head, uint32_t& rest) {
  head = round_tf32(__float_as_uint(x));
  rest = round_tf32(__float_as_uint(x - __uint_as_float(head)));
}
// c += a·b for one m16n8k8 tile (A row-major 16 × 8, B column-major 8 × 8, f32 accumulators).
__device__ __forceinline__ void head_mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// c += a·b in 3×TF32 (remainders' terms first, the heads' product last).
__device__ __forceinline__ void mma_3xtf32(float (&c)[4], const uint32_t (&ah)[4], const uint32_t (&ar)[4],
                                           const uint32_t (&bh)[2], const uint32_t (&br)[2]) {
  head_mma_tf32(c, ar, bh);
  head_mma_tf32(c, ah, br);
  head_mma_tf32(c, ah, bh);
}

struct HeadTcLane {
  int rt, nh, g, t;
};
__device__ __forceinline__ HeadTcLane head_tc_lane(int warp, int lane) {
  return {warp & 3, warp >> 2, lane >> 2, lane & 3};
}

// Rows of the warp's tile from the staged state hsm (P × N, row-major; bulk-copied by the kernel): the update
// (streamed to ssm) and its y. coef: (p, vp_0..vp_{R−1}, vc_0..vc_{R−1}) rows
// of stride CS; ktab/qtab: the tables above. The left column half writes y + D skip into ybuf (r, p), the right half
// its y into yhalf; the consumer adds them after the block's barrier.
// The state's element in memory: f32, or bf16 (the bf16-state mode: read as f32, written rounded to nearest even).
__device__ __forceinline__ void state_load4(const float* p, float (&d)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
}
__device__ __forceinline__ void state_load4(const __nv_bfloat16* p, float (&d)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  d[0] = a.x, d[1] = a.y, d[2] = b.x, d[3] = b.y;
}
__device__ __forceinline__ void state_load4_stream(const float* p, float (&d)[4]) {  // read once: evict first
  const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
  d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
}
__device__ __forceinline__ void state_load4_stream(const __nv_bfloat16* p, float (&d)[4]) {
  const uint2 u = __ldcs(reinterpret_cast<const uint2*>(p));
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  d[0] = a.x, d[1] = a.y, d[2] = b.x, d[3] = b.y;
}
__device__ __forceinline__ void state_store4_stream(float* p, const float (&d)[4]) {
  __stcs(reinterpret_cast<float4*>(p), make_float4(d[0], d[1], d[2], d[3]));
}
__device__ __forceinline__ void state_store4_stream(__nv_bfloat16* p, const float (&d)[4]) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(d[0], d[1]), b = __floats2bfloat162_rn(d[2], d[3]);
  __stcs(reinterpret_cast<uint2*>(p),
         make_uint2(*reinterpret_cast<const unsigned*>(&a), *reinterpret_cast<const unsigned*>(&b)));
}

// The update's B element of K row r0 + t (t < 4) at column kn, zero from row KK on: r0 is a compile-time k-step offset
// in the unrolled loops, so that a whole fragment half in range or past KK costs no compare (W = 2, R = 4: KK = 12, the
// second k-step's upper half is zero). Kept as a function with early returns: the same predicate spelled as a
// select around the load (`in ? ktab[…] : 0`) made the 1.5B MIMO b128 step 1 % slower on an H100 (6.24 → 6.31 ms).
template <int KK>
__device__ __forceinline__ float head_tc_k_term(const float* ktab, int r0, int t, int kn) {
  if (r0 >= KK) return 0.0f;
  if (r0 + 3 < KK || r0 + t < KK) return ktab[head_tc_row(r0 + t) + kn];
  return 0.0f;
}

// KK: the update's rank terms (head_tc_terms; coef columns and ktab rows from KK on are not read).
template <int R, int CS, int KK, typename T>
__device__ __forceinline__ void head_tc_rows(const T* hsm, T* ssm, const HeadTcLane& l, float alpha, const float* coef,
                                             const float* ktab, const float* qtab, const float* dskip, float* ybuf,
                                             float* yhalf) {
  static_assert(R >= 2 && R <= 4, "MIMO ranks");
  constexpr int P = kHeadTcP, N = kHeadTcN, KS = (KK + 7) / 8;  // k-steps of the update
  static_assert(CS >= KK, "the coefficient rows hold every term");
  const int p0 = 16 * l.rt + l.g, p1 = p0 + 8;
  // V's fragment per k-step: (p0, t), (p1, t), (p0, t + 4), (p1, t + 4); columns from KK on are 0.
  uint32_t vh[KS][4], vr[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int c0 = 8 * ks + l.t, c1 = c0 + 4;
    const bool in0 = 8 * ks + 3 < KK || c0 < KK, in1 = (8 * ks + 4 < KK) && (8 * ks + 7 < KK || c1 < KK);
    split_tf32(in0 ? coef[p0 * CS + c0] : 0.0f, vh[ks][0], vr[ks][0]);
    split_tf32(in0 ? coef[p1 * CS + c0] : 0.0f, vh[ks][1], vr[ks][1]);
    split_tf32(in1 ? coef[p0 * CS + c1] : 0.0f, vh[ks][2], vr[ks][2]);
    split_tf32(in1 ? coef[p1 * CS + c1] : 0.0f, vh[ks][3], vr[ks][3]);
  }
  float yacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // y of rows p0 / p1, ranks 2t and 2t + 1
  const bool q_row = l.g < R;                // the y product's B columns are ranks; g ≥ R are zero
  // The lane's 8 float4 of the state (i: row p0 or p1; m: 16-column piece) in two halves of 4 (16 registers each).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float hs[2][2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int mm = 0; mm < 2; ++mm) {
        const int m = 2 * half + mm;
        state_load4(hsm + (p0 + 8 * i) * N + 64 * l.nh + 16 * m + 4 * l.t, hs[i][mm]);
      }
    }
#pragma unroll
    for (int mm = 0; mm < 2; ++mm) {
      const int m = 2 * half + mm;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int base = 64 * l.nh + 16 * m + 2 * s;
        // B of the update: K rows 8·ks + t and + 4 at this lane's column g of the tile.
        const int kn = base + 4 * (l.g >> 1) + (l.g & 1);
        float(&h0)[4] = hs[0][mm];
        float(&h1)[4] = hs[1][mm];
        float c[4] = {alpha * h0[2 * s], alpha * h0[2 * s + 1], alpha * h1[2 * s], alpha * h1[2 * s + 1]};
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          uint32_t bh[2], br[2];
          split_tf32(head_tc_k_term<KK>(ktab, 8 * ks, l.t, kn), bh[0], br[0]);
          split_tf32(head_tc_k_term<KK>(ktab, 8 * ks + 4, l.t, kn), bh[1], br[1]);
          mma_3xtf32(c, vh[ks], vr[ks], bh, br);
        }
        h0[2 * s] = c[0], h0[2 * s + 1] = c[1], h1[2 * s] = c[2], h1[2 * s + 1] = c[3];
        // y: A = h' (k-index t ↔ column 2t, t + 4 ↔ 2t + 1), B = q of rank g at the same two columns.
        uint32_t ah[4], ar[4], qh[2], qr[2];
        split_tf32(c[0], ah[0], ar[0]);
        split_tf32(c[2], ah[1], ar[1]);
        split_tf32(c[1], ah[2], ar[2]);
        split_tf32(c[3], ah[3], ar[3]);
        const float2 q = q_row ? *reinterpret_cast<const float2*>(qtab + head_tc_row(l.g) + base + 4 * l.t)
                               : make_float2(0.0f, 0.0f);
        split_tf32(q.x, qh[0], qr[0]);
        split_tf32(q.y, qh[1], qr[1]);
        mma_3xtf32(yacc, ah, ar, qh, qr);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int mm = 0; mm < 2; ++mm)
        state_store4_stream(ssm + (p0 + 8 * i) * N + 64 * l.nh + 16 * (2 * half + mm) + 4 * l.t, hs[i][mm]);
    }
  }
  // yacc: (p0, 2t), (p0, 2t + 1), (p1, 2t), (p1, 2t + 1).
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = 2 * l.t + e;
    if (r >= R) continue;
    if (l.nh == 0) {
      ybuf[r * P + p0] = yacc[e] + dskip[r * P + p0];
      ybuf[r * P + p1] = yacc[2 + e] + dskip[r * P + p1];
    } else {
      yhalf[r * P + p0] = yacc[e];
      yhalf[r * P + p1] = yacc[2 + e];
    }
  }
}

// A deferred-writes step of a head that does not write its state this step (mamba3_decode_gpu.cu): y from the
// stored base state H_b without forming h' = A·H_b + V·K, as y_r = A·(H_b·q_r) + Σ_j V_j·(K_j·q_r). gtab (KK × R):
// the K rows' dot products with the Q rows, formed by the kernel; the product is the y product of head_tc_rows on
// H_b, so a step costs a third of the tensor work of one that writes (W = 2: KK = 12, two update k-steps).
template <int R, int CS, int KK, typename T>
__device__ __forceinline__ void head_tc_read_only_y(const T* hsm, const HeadTcLane& l, float A, const float* coef,
                                                    const float* gtab, const float* qtab, const float* dskip,
                                                    float* ybuf, float* yhalf) {
  static_assert(R >= 2 && R <= 4, "MIMO ranks");
  constexpr int P = kHeadTcP, N = kHeadTcN;
  static_assert(CS >= KK, "the coefficient rows hold every term");
  const int p0 = 16 * l.rt + l.g, p1 = p0 + 8;
  float yacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // y of rows p0 / p1, ranks 2t and 2t + 1
  const bool q_row = l.g < R;                // the y product's B columns are ranks; g ≥ R are zero
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    float h0[4], h1[4];
    state_load4(hsm + p0 * N + 64 * l.nh + 16 * m + 4 * l.t, h0);
    state_load4(hsm + p1 * N + 64 * l.nh + 16 * m + 4 * l.t, h1);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int base = 64 * l.nh + 16 * m + 2 * s;
      uint32_t ah[4], ar[4], qh[2], qr[2];
      split_tf32(h0[2 * s], ah[0], ar[0]);
      split_tf32(h1[2 * s], ah[1], ar[1]);
      split_tf32(h0[2 * s + 1], ah[2], ar[2]);
      split_tf32(h1[2 * s + 1], ah[3], ar[3]);
      const float2 q =
          q_row ? *reinterpret_cast<const float2*>(qtab + head_tc_row(l.g) + base + 4 * l.t) : make_float2(0.0f, 0.0f);
      split_tf32(q.x, qh[0], qr[0]);
      split_tf32(q.y, qh[1], qr[1]);
      mma_3xtf32(yacc, ah, ar, qh, qr);
    }
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = 2 * l.t + e;
    if (r >= R) continue;
    if (l.nh == 0) {  // the left half adds the pending tokens' terms and the D skip
      float c0 = dskip[r * P + p0], c1 = dskip[r * P + p1];
#pragma unroll
      for (int j = 0; j < KK; ++j) {
        c0 = fmaf(coef[p0 * CS + j], gtab[j * R + r], c0);
        c1 = fmaf(coef[p1 * CS + j], gtab[j * R + r], c1);
      }
      ybuf[r * P + p0] = fmaf(A, yacc[e], c0);
      ybuf[r * P + p1] = fmaf(A, yacc[2 + e], c1);
    } else {
      yhalf[r * P + p0] = A * yacc[e];
      yhalf[r * P + p1] = A * yacc[2 + e];
    }
  }
}

}  // namespace mamba3::cuda
