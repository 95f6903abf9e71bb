#pragma once
// A SISO chunk's q and k tiles formed in shared memory from the group's normalised B/C rows in zx, the head's biases
// and the angles φ, exactly as the SISO build forms and stores them (rotated_pair: the same bits), for the cores that
// would otherwise read them back from the build's per-head copies (BatchedParams::form_qk). Per 64-row chunk and head
// that replaces 32 KB of q and k (2 × 64 × 128 bf16 at N 128) by φ's 8 KB (64 × 32 floats at S 32) and B/C rows that
// every head of a group reads (from L2 after the first).
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_math.cuh"

namespace mamba3::cuda::train_detail {

// Rows [0, kRows) of chunk `chunk`'s q and k into sQ and sK (bf16, row pitch ld; 8-byte aligned rows), every thread of
// the block taking part: a thread takes kE = max(N/32, 2) consecutive elements (kE/2 rotary pairs) of one row per pass,
// kAhead passes' loads issued before their arithmetic. Rows past the sequence's end are zeros, as the build writes
// them. Needs the SISO build's shapes (qk_formable): rows = T = kRows, zx rows 16-byte aligned.
template <int N, int kThreads, int kRows>
__device__ __forceinline__ void form_qk_tiles(const BatchedParams& p, int64_t chunk, __nv_bfloat16* sQ,
                                              __nv_bfloat16* sK, int ld) {
  constexpr int kE = N >= 64 ? N / 32 : 2, kLanes = N / kE, kRowsPerPass = kThreads / kLanes;
  constexpr int kPasses = kRows / kRowsPerPass, kAhead = kPasses < 8 ? kPasses : 8;
  static_assert(kThreads % kLanes == 0 && kRows % kRowsPerPass == 0 && kPasses % kAhead == 0, "whole passes");
  using V = std::conditional_t<kE == 4, float4, float2>;
  const MixerDims& d = p.d;
  const int64_t bh = chunk / p.nc;
  const int h = int(bh % d.H), b = int(bh / d.H), c0 = int(chunk % p.nc) * p.T;
  const int Tc = min(p.T, d.L - c0), g = h / (d.H / d.G);
  const int n0 = int(threadIdx.x) % kLanes * kE, r0 = int(threadIdx.x) / kLanes;
  float bq[kE], bk[kE];
#pragma unroll
  for (int e = 0; e < kE; ++e) bq[e] = p.C_bias[int64_t(h) * N + n0 + e], bk[e] = p.B_bias[int64_t(h) * N + n0 + e];
  bool rot[kE / 2];
#pragma unroll
  for (int m = 0; m < kE / 2; ++m) rot[m] = n0 / 2 + m < d.S;
  const float* zc = p.zx + (int64_t(b) * d.L + c0 + r0) * d.din + d.off_C + int64_t(g) * N + n0;
  const float* ph = p.phi + (bh * d.L + c0 + r0) * d.S + n0 / 2;
  const int bc_off = d.off_B - d.off_C, z_step = kRowsPerPass * d.din, ph_step = kRowsPerPass * d.S;
  const auto unpack = [](const V& v, float* out) {
    if constexpr (kE == 4) out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    else out[0] = v.x, out[1] = v.y;
  };
#pragma unroll 1
  for (int pass0 = 0; pass0 < kPasses; pass0 += kAhead) {
    float c[kAhead][kE], k[kAhead][kE], cs[kAhead][kE / 2][2];
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const bool real = r0 + (pass0 + a) * kRowsPerPass < Tc;
      const float* zca = zc + a * z_step;
      if (real) {
        unpack(*reinterpret_cast<const V*>(zca), c[a]), unpack(*reinterpret_cast<const V*>(zca + bc_off), k[a]);
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) c[a][e] = k[a][e] = 0.0f;
      }
#pragma unroll
      for (int m = 0; m < kE / 2; ++m) {
        const float2 r = real && rot[m] ? rotary_cos_sin(ph[a * ph_step + m]) : make_float2(1.0f, 0.0f);
        cs[a][m][0] = r.x, cs[a][m][1] = r.y;
      }
    }
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const int row = r0 + (pass0 + a) * kRowsPerPass;
      __nv_bfloat162 qo[kE / 2], ko[kE / 2];
#pragma unroll
      for (int m = 0; m < kE / 2; ++m) {
        qo[m] = ko[m] = __floats2bfloat162_rn(0.0f, 0.0f);  // padding rows: zeros
        if (row < Tc) {
          qo[m] = rotated_pair(c[a][2 * m], c[a][2 * m + 1], bq[2 * m], bq[2 * m + 1], cs[a][m][0], cs[a][m][1], rot[m]);
          ko[m] = rotated_pair(k[a][2 * m], k[a][2 * m + 1], bk[2 * m], bk[2 * m + 1], cs[a][m][0], cs[a][m][1], rot[m]);
        }
      }
      if constexpr (kE == 4) {
        *reinterpret_cast<uint2*>(sQ + row * ld + n0) = *reinterpret_cast<const uint2*>(qo);
        *reinterpret_cast<uint2*>(sK + row * ld + n0) = *reinterpret_cast<const uint2*>(ko);
      } else {
        *reinterpret_cast<uint32_t*>(sQ + row * ld + n0) = *reinterpret_cast<const uint32_t*>(qo);
        *reinterpret_cast<uint32_t*>(sK + row * ld + n0) = *reinterpret_cast<const uint32_t*>(ko);
      }
    }
    zc += kAhead * z_step, ph += kAhead * ph_step;
  }
}

}  // namespace mamba3::cuda::train_detail
