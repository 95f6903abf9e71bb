#pragma once
// The rows of a MIMO decode item on tensor cores (the streaming decode kernel's phase 3 for P = 64, N = 128):
//   h' = α·h + V·K, V (P × 2R) the per-row coefficients (vp_r = β·mx_r·x_{−1}, vc_r = γ·mx_r·x), K (2R × N) the
//   cached and the new k of every rank — a rank-2R update, one m16n8k8 TF32 product per 16 × 8 tile (K = 8 covers
//   2R ≤ 8). Three products per tile (the operands split into a TF32 head and a TF32 remainder, the remainders'
//   product dropped) keep f32 accuracy (relative error ~2^-21 per product against ~2^-24 for an f32 FMA).
//   y_r = h'·q_r with f32 FMAs on the products' accumulator registers, summed over the 4 lanes of a row group and
//   (by the consumer) over the two warps of each 16-row tile.
// Why: with FMAs the rows are 6.35 k of the 10.5 k instructions of a MIMO R = 4 item (ncu, 1.5B b128), 2R FMAs per
// state value for the update alone; here the update is 3 tensor-core instructions per 4 values of a lane.
#include <cstdint>

#include "cuda/mamba3_gpu_math.cuh"

namespace mamba3::cuda {

constexpr int kTcRowsP = 64, kTcRowsN = 128;  // the shape this path serves (8 warps: 4 row tiles × 2 column halves)
constexpr int kTcGroupPad = 8;  // floats after each staged group of 8 state rows: a fragment's rows in 8 groups hit
                                // 8 different bank offsets

// K (2R × N, zero rows up to 8): row j < R the cached k of rank j, R ≤ j < 2R the new k of rank j − R, at a row
// pitch of N + 8 floats, so that a fragment's reads (row t or t + 4, column n + g) and phase 2's float4 row writes
// both spread over all banks. q: (r, n) rows at pitch N (a fragment's lanes read 4 float2 per rank, broadcast).
constexpr int kTcKPitch = kTcRowsN + 8;
__host__ __device__ constexpr int tc_k_floats() { return 8 * kTcKPitch; }
__host__ __device__ constexpr int tc_q_floats(int R) { return R * kTcRowsN; }

__device__ __forceinline__ uint32_t tf32_of(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
// Not volatile: a pure function of its operands, so the compiler may hoist the next tiles' loads above it.
__device__ __forceinline__ void tf32_split(float x, uint32_t& head, uint32_t& rest) {
  head = tf32_of(x);
  rest = tf32_of(x - __uint_as_float(head));
}
// c += a·b for one m16n8k8 tile (A row-major 16 × 8, B column-major 8 × 8, f32 accumulators).
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Warp `warp` (of 8) takes the rows p ≡ 2·(warp % 4) and 2·(warp % 4) + 1 (mod 8) — the mma tile's row g is state
// row 8g + 2·(warp % 4), row g + 8 the next one, so that a fragment's 8 rows sit in 8 padded groups — and columns
// 64·(warp / 4) … + 63. h: the staged state (groups of 8 rows at pitch hg), coef: (p, vp_0..vp_{R−1},
// vc_0..vc_{R−1}) rows, kf/qf: the tables above, dskip: (r, p).
// The left column half writes y + D skip into ybuf (r, p), the right half its y into yhalf: the consumer adds them
// after the block's barrier.
// The new state replaces the old one in the stage (each lane overwrites only what it has read); the caller stores it.
template <int R>
__device__ __forceinline__ void tc_item_rows(float* h, int hg, const float* coef, const float* kf, const float* qf,
                                             const float* dskip, float* ybuf, float* yhalf, float alpha, int warp,
                                             int lane) {
  constexpr int P = kTcRowsP, N = kTcRowsN, CS = coef_stride<R>();
  const int g = lane >> 2, t = lane & 3, nh = warp >> 2;
  const int p0 = 8 * g + 2 * (warp & 3), p1 = p0 + 1;
  float* const h0row = h + g * hg + 2 * (warp & 3) * N;  // row p0 in its group; row p1 follows at + N
  uint32_t ah[4], ar[4];  // V's fragment: (p0, t), (p1, t), (p0, t + 4), (p1, t + 4); columns from 2R on are 0
  {
    const int rows[4] = {p0, p1, p0, p1}, cols[4] = {t, t, t + 4, t + 4};
#pragma unroll
    for (int i = 0; i < 4; ++i) tf32_split(cols[i] < 2 * R ? coef[rows[i] * CS + cols[i]] : 0.0f, ah[i], ar[i]);
  }
  // Every tile's operands requested before the first product (8 tiles: 48 registers).
  float2 hv[8][2], kv[8];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int n = 64 * nh + 8 * nt;
    hv[nt][0] = *reinterpret_cast<const float2*>(h0row + n + 2 * t);
    hv[nt][1] = *reinterpret_cast<const float2*>(h0row + N + n + 2 * t);
    kv[nt] = make_float2(kf[t * kTcKPitch + n + g], kf[(t + 4) * kTcKPitch + n + g]);
  }
  float y0[R], y1[R];
#pragma unroll
  for (int r = 0; r < R; ++r) y0[r] = y1[r] = 0.0f;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const int n = 64 * nh + 8 * nt;
    uint32_t bh[2], br[2];
    tf32_split(kv[nt].x, bh[0], br[0]);
    tf32_split(kv[nt].y, bh[1], br[1]);
    const float2 h0 = hv[nt][0], h1 = hv[nt][1];
    float c[4] = {alpha * h0.x, alpha * h0.y, alpha * h1.x, alpha * h1.y};
    mma_tf32(c, ar, bh);  // the remainders' terms first, then the heads' product
    mma_tf32(c, ah, br);
    mma_tf32(c, ah, bh);
    *reinterpret_cast<float2*>(h0row + n + 2 * t) = make_float2(c[0], c[1]);
    *reinterpret_cast<float2*>(h0row + N + n + 2 * t) = make_float2(c[2], c[3]);
#pragma unroll
    for (int r = 0; r < R; ++r) {  // q_r[n + 2t], q_r[n + 2t + 1]
      const float2 q = *reinterpret_cast<const float2*>(qf + r * N + n + 2 * t);
      y0[r] = fmaf(c[1], q.y, fmaf(c[0], q.x, y0[r]));
      y1[r] = fmaf(c[3], q.y, fmaf(c[2], q.x, y1[r]));
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    y0[r] += __shfl_xor_sync(0xffffffffu, y0[r], 1);
    y0[r] += __shfl_xor_sync(0xffffffffu, y0[r], 2);
    y1[r] += __shfl_xor_sync(0xffffffffu, y1[r], 1);
    y1[r] += __shfl_xor_sync(0xffffffffu, y1[r], 2);
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (nh == 0) {
        ybuf[r * P + p0] = y0[r] + dskip[r * P + p0];
        ybuf[r * P + p1] = y1[r] + dskip[r * P + p1];
      } else {
        yhalf[r * P + p0] = y0[r];
        yhalf[r * P + p1] = y1[r];
      }
    }
  }
}

}  // namespace mamba3::cuda
