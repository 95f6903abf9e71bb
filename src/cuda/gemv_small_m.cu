#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/cuda_check.h"
#include "cuda/env_switch.h"
#include "cuda/gated_silu.cuh"
#include "cuda/gemv_small_m.h"
#include "cuda/l2_prefetch.cuh"
#include "cuda/pdl.h"

namespace mamba3::cuda {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ void accumulate(const uint4& wv, const uint4& xv, float& acc) {
  const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv);
  const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __bfloat1622float2(w2[i]), b = __bfloat1622float2(x2[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

// Pieces (16 bytes of a weight row) each lane requests at once. A window of 8–16 (to fill the memory pipe with few
// warps) measured slower on an H200 (1.5B decode b1 1.76 vs 1.58 ms with the other changes of that run): its 97
// registers cut the blocks per SM to 2, and the GEMVs of a batch-1 step are too short to make up for that. Kept at 2.
template <int M>
__host__ __device__ constexpr int pieces_in_flight() {
  return 2;
}

// Warps per output column (KS, "split K"): block b's warp w computes column b·(8/KS) + w/KS over its share of K,
// pieces i = lane + 32·slice + 32·KS·t, and the KS partial sums meet in shared memory in slice order. With KS = 1
// (one warp per column) the narrow products of a decode step (out_proj and fc2 of the 1.5B model: N = 2048, K = 4096,
// 256 blocks for 132 SMs) keep only ~16 warps per SM busy, at 36 % of DRAM bandwidth under ncu; KS = 4 gives 4×
// the warps. Each row's terms are added in an order fixed by (N, K, KS) alone, so a row's result does not depend on
// its batch. U pieces per lane are requested at once.
// Pairs: W's rows are (value, gate) pairs (2j, 2j + 1) and the kernel writes act (M, n/2) bf16 = value ⊙ silu(gate),
// rounded as gated_silu() rounds, instead of y: a block's kCols columns are whole pairs, met in shared memory.
// pf_blocks > 0: the first pf_blocks blocks (those resident at once) first ask L2 for an equal share each of W's first
// pf_bytes (bulk prefetch by warp 0; a multiple of 16, at most all of W: launch caps it at three quarters of L2 so
// that the early requests are not evicted before their rows are read), so that under PDL the product's weights stream
// while the kernel before it runs, not only each resident lane's first window (and nothing of the later waves' rows).
// Norm (one row, M = 1; gemv_small_m.h, "RMSNorm folded into the products at one row"):
//  kNormOut: instead of y, column c's v = y_c + residual_c goes back to residual, bf16(v · weight_c) to out16, and
//    the block's Σ v² over its columns (in column order) to partials_out[block];
//  kNormIn: y (or each pair value) is multiplied by rstd = 1/√(Σ partials_in / d + eps), the sum taken by every
//    block in one fixed order (thread t: parts t, t + 256, …; then lanes by xor shuffles; then warps in order).
enum : int { kNormNone = 0, kNormOut = 1, kNormIn = 2 };

// The norm instances are held to 32 registers (8 blocks per SM, as the plain one-row instances reach; a few bytes of
// their epilogue spill to the stack): uncapped they took 38–54, one to three blocks per SM fewer.
template <int M, int KS, bool Pairs, int Norm = kNormNone>
__global__ void __launch_bounds__(kWarps * 32, Norm == kNormNone ? 1 : 8)
    gemv_kernel(const __nv_bfloat16* __restrict__ w, int64_t n, int64_t k, const __nv_bfloat16* __restrict__ x,
                int64_t x_stride, float* __restrict__ y, int64_t y_stride, __nv_bfloat16* __restrict__ act,
                int64_t pf_blocks, uint64_t pf_bytes, GemvNormArgs na) {
  constexpr int U = pieces_in_flight<M>(), kCols = kWarps / KS;
  static_assert(!Pairs || kCols % 2 == 0, "a block's columns must be whole pairs");
  static_assert(Norm == kNormNone || M == 1, "the norm epilogues are for one row");
  static_assert(Norm != kNormOut || !Pairs, "a residual is added to plain products");
  __shared__ float partial[KS > 1 ? kWarps * M : 1];
  __shared__ float pair_values[Pairs ? kCols * M : 1];
  __shared__ float norm_shared[Norm != kNormNone ? kWarps : 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slice = warp % KS;
  const int64_t col = int64_t(blockIdx.x) * kCols + warp / KS;
  // Before any memory access: safe under PDL (KS > 1, Pairs and the norms have a barrier ahead, so no warp leaves
  // early there).
  if (KS == 1 && !Pairs && Norm == kNormNone && col >= n) return;
  const bool live = col < n;
  const uint4* wrow = reinterpret_cast<const uint4*>(w + (live ? col : 0) * k);
  const int64_t pieces = live ? k / 8 : 0, first = lane + 32 * slice, step = 32 * KS;
  float acc[M];
#pragma unroll
  for (int r = 0; r < M; ++r) acc[r] = 0.0f;
  pdl_trigger();
  if (warp == 0 && blockIdx.x < pf_blocks) {  // whole 16-byte units (K % 8 == 0), shares rounded up: all of pf_bytes
    const uint64_t blocks = uint64_t(pf_blocks);
    const uint64_t share = ((pf_bytes + blocks - 1) / blocks + 15) / 16 * 16, start = blockIdx.x * share;
    if (start < pf_bytes)
      l2_prefetch_pieces(reinterpret_cast<const char*>(w) + start, pf_bytes - start < share ? pf_bytes - start : share,
                         lane, 32);
  }
  // The first window of weights is requested before waiting for the kernel that writes x (weights never change).
  uint4 wv[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t i = first + step * u;
    wv[u] = i < pieces ? __ldcs(wrow + i) : make_uint4(0, 0, 0, 0);  // streamed: read once, keep out of L1
  }
  pdl_wait();
  float part_sum = 0.0f;  // kNormIn: this thread's share of the row's Σ v², requested beside the first x loads
  if constexpr (Norm == kNormIn) {
    for (int64_t i = threadIdx.x; i < na.parts; i += kWarps * 32) part_sum += na.partials_in[i];
  }
  for (int64_t base = first; base < pieces; base += step * U) {
    if (base != first) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + step * u;
        wv[u] = i < pieces ? __ldcs(wrow + i) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + step * u;
      if (i < pieces) {
#pragma unroll
        for (int r = 0; r < M; ++r)
          accumulate(wv[u], __ldg(reinterpret_cast<const uint4*>(x + r * x_stride) + i), acc[r]);
      }
    }
  }
  float rstd = 1.0f;
  if constexpr (Norm == kNormIn) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part_sum += __shfl_xor_sync(0xffffffffu, part_sum, o);
    if (lane == 0) norm_shared[warp] = part_sum;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w8 = 0; w8 < kWarps; ++w8) total += norm_shared[w8];
    rstd = rsqrtf(total / float(na.d) + na.eps);
  }
  // Column c's final value v: y, a pair value, or (kNormOut) the residual update.
  const auto finish = [&](int r, int c, int64_t column, float v) {
    if constexpr (Norm == kNormIn) v *= rstd;
    if constexpr (Pairs) {
      pair_values[c * M + r] = v;
    } else if constexpr (Norm == kNormOut) {
      const float sum = v + na.residual[column];
      na.residual[column] = sum;
      static_cast<__nv_bfloat16*>(na.out16)[column] = __float2bfloat16(sum * na.weight[column]);
      norm_shared[c] = sum * sum;
    } else {
      y[r * y_stride + column] = v;
    }
  };
#pragma unroll
  for (int r = 0; r < M; ++r) {
    float v = acc[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if constexpr (KS == 1) {
      if (lane == 0 && (Norm == kNormNone || live)) finish(r, warp, col, v);
    } else {
      if (lane == 0) partial[warp * M + r] = v;
    }
  }
  if constexpr (KS > 1) {
    __syncthreads();
    if (slice == 0 && lane == 0 && live) {
#pragma unroll
      for (int r = 0; r < M; ++r) {
        float v = partial[warp * M + r];
#pragma unroll
        for (int t = 1; t < KS; ++t) v += partial[(warp + t) * M + r];
        finish(r, warp / KS, col, v);
      }
    }
  }
  if constexpr (Norm == kNormOut) {
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < kCols; ++c)
        if (int64_t(blockIdx.x) * kCols + c < n) sum += norm_shared[c];
      na.partials_out[blockIdx.x] = sum;
    }
  }
  if constexpr (Pairs) {
    __syncthreads();
    const int64_t f = n / 2, pair0 = int64_t(blockIdx.x) * (kCols / 2);
    if (threadIdx.x < (kCols / 2) * M) {
      const int p = threadIdx.x / M, r = threadIdx.x % M;
      if (pair0 + p < f)
        act[r * f + pair0 + p] =
            __float2bfloat16(gated_silu_value(pair_values[2 * p * M + r], pair_values[(2 * p + 1) * M + r]));
    }
  }
}

// This instance's blocks on the device at once, asked once per instance: by calls that request W into L2, and for the
// one-row instance by resident_warps (the split choice, which asked that before). The default path makes no other
// runtime call, in a graph capture or elsewhere.
template <int M, int KS, bool Pairs>
int64_t resident_blocks() {
  static const int64_t blocks = [] {
    int device = 0, sms = 0, per_sm = 0;
    MAMBA3_CUDA_CHECK(cudaGetDevice(&device));
    MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    MAMBA3_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_kernel<M, KS, Pairs>, kWarps * 32, 0));
    return int64_t(sms) * std::max(per_sm, 1);
  }();
  return blocks;
}

// The most bytes of W one call asks L2 for: three quarters of the device's L2 (a lm_head's 200 MB requested whole would
// evict its own first rows before their blocks read them; a 1.5B layer's in_proj or fc1, 33–35 MB, stays whole on a
// 50 MB L2), in 16-byte units. Asked only by calls that request.
uint64_t l2_prefetch_cap() {
  static const uint64_t cap = [] {
    int device = 0, l2 = 0;
    MAMBA3_CUDA_CHECK(cudaGetDevice(&device));
    MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    return uint64_t(std::max(l2, 32)) / 4 * 3 / 16 * 16;
  }();
  return cap;
}

template <int M, int KS, bool Pairs, int Norm = kNormNone>
void launch(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t x_stride, float* y,
            int64_t y_stride, void* act, GemvPrefetch prefetch, const GemvNormArgs& na = {}) {
  constexpr int cols = kWarps / KS;
  const unsigned blocks = unsigned((n + cols - 1) / cols);
  const bool l2_prefetch = prefetch == GemvPrefetch::Bulk;
  const int64_t pf_blocks = l2_prefetch ? std::min<int64_t>(blocks, resident_blocks<M, KS, Pairs>()) : 0;
  const uint64_t pf_bytes = l2_prefetch ? std::min(uint64_t(n) * uint64_t(k) * 2, l2_prefetch_cap()) : 0;
  const auto kernel = gemv_kernel<M, KS, Pairs, Norm>;
  launch_pdl(true, kernel, blocks, kWarps * 32, 0, s, static_cast<const __nv_bfloat16*>(w), n, k,
             static_cast<const __nv_bfloat16*>(x), x_stride, y, y_stride, static_cast<__nv_bfloat16*>(act), pf_blocks,
             pf_bytes, na);
}

template <int M, bool Pairs = false, int Norm = kNormNone>
void launch_split(int ks, GemvPrefetch pf, cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x,
                  int64_t x_stride, float* y, int64_t y_stride, void* act = nullptr, const GemvNormArgs& na = {}) {
  switch (ks) {
    case 1:
      return launch<M, 1, Pairs, Norm>(s, w, n, k, x, x_stride, y, y_stride, act, pf, na);
    case 2:
      return launch<M, 2, Pairs, Norm>(s, w, n, k, x, x_stride, y, y_stride, act, pf, na);
    default:
      return launch<M, 4, Pairs, Norm>(s, w, n, k, x, x_stride, y, y_stride, act, pf, na);
  }
}

// Calls f(std::integral_constant<int, m>) for the row count m ∈ [1, Max] (checked by the caller): the kernels are
// instantiated per row count.
template <typename F, int... I>
void with_rows_in(int64_t m, F& f, std::integer_sequence<int, I...>) {
  ((m == I + 1 ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
}

template <int Max, typename F>
void with_rows(int64_t m, F&& f) {
  with_rows_in(m, f, std::make_integer_sequence<int, Max>{});
}

// MAMBA3_GEMV_PREFETCH: 0 (default) | 1 (GemvPrefetch::Bulk: every call's resident blocks ask L2 for W, up to 3/4 of
// L2, up front; measured slower).
GemvPrefetch env_prefetch() {
  static const GemvPrefetch p =
      env_choice("MAMBA3_GEMV_PREFETCH", {"0", "1"}) == "1" ? GemvPrefetch::Bulk : GemvPrefetch::Off;
  return p;
}

// The automatic split: 4 warps per column for the narrow products (1.5B out_proj/fc2, N 2048: decode b1 1.443 ms
// against 1.625 with one warp per column, H200, 2026-12-01). MAMBA3_GEMV_KSPLIT=0 turns it off. Read once per process.
bool auto_split_enabled() {
  static const bool on = env_choice("MAMBA3_GEMV_KSPLIT", {"0", "1"}) != "0";
  return on;
}

// Warps of the one-row kernel resident on the device at once (its occupancy × SMs): the unit of a "wave".
int64_t resident_warps() {
  static const int64_t warps = resident_blocks<1, 1, false>() * kWarps;
  return warps;
}

}  // namespace

bool gemv_small_m_supported(int64_t m, int64_t k, int64_t x_stride, const void* w, const void* x) {
  return m >= 1 && m <= kGemvMaxRows && k % 8 == 0 && x_stride % 8 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

// Each warp streams one column's share of W; the last wave of warps runs with the device mostly idle, at the latency
// of a few dependent loads per warp (1.5B in_proj, N 8672 columns for 8448 resident warps on an H200: a second wave
// of 224 whole columns). The split with the fullest last wave — waves / ⌈waves⌉ of N·KS warps — wins, a larger one
// only when it fills ≥ 5 % better; K ≥ 1024 so that a quarter of a row is still ≥ 32 pieces. Depends on (N, K) and
// the device, never on M, so rows stay batch-invariant.
int gemv_small_m_split(int64_t n, int64_t k) {
  if (!auto_split_enabled() || k < 1024) return 1;
  const double resident = double(resident_warps());
  int best = 1;
  double best_fill = 0;
  for (int ks : {1, 2, 4}) {
    const double waves = double(n) * ks / resident;
    const double fill = waves / std::ceil(waves);
    if (fill > best_fill + 0.05) {
      best = ks;
      best_fill = fill;
    }
  }
  return best;
}

void gemv_small_m(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t m, int64_t x_stride,
                  float* y, int64_t y_stride, int k_split, std::optional<GemvPrefetch> prefetch) {
  const int ks = k_split > 0 ? k_split : gemv_small_m_split(n, k);
  const GemvPrefetch pf = prefetch.value_or(env_prefetch());
  MAMBA3_CHECK(ks == 1 || ks == 2 || ks == 4, "gemv_small_m: k_split {} (expected 1, 2 or 4)", ks);
  MAMBA3_CHECK(m >= 1 && m <= kGemvMaxRows, "gemv_small_m: {} rows (at most {})", m, kGemvMaxRows);
  with_rows<kGemvMaxRows>(m, [&](auto rows) { launch_split<rows()>(ks, pf, s, w, n, k, x, x_stride, y, y_stride); });
}

void gemv_small_m_gated_pairs(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, int64_t m,
                              int64_t x_stride, void* act, int k_split, std::optional<GemvPrefetch> prefetch) {
  const int ks = k_split > 0 ? k_split : gemv_small_m_split(n, k);
  const GemvPrefetch pf = prefetch.value_or(env_prefetch());
  MAMBA3_CHECK(ks == 1 || ks == 2 || ks == 4, "gemv_small_m_gated_pairs: k_split {} (expected 1, 2 or 4)", ks);
  MAMBA3_CHECK(n % 2 == 0 && m >= 1 && m <= kGemvPairsMaxRows,
               "gemv_small_m_gated_pairs: N {} must be even and M {} in 1..{}", n, m, kGemvPairsMaxRows);
  with_rows<kGemvPairsMaxRows>(
      m, [&](auto rows) { launch_split<rows(), true>(ks, pf, s, w, n, k, x, x_stride, nullptr, 0, act); });
}

int64_t gemv_norm_parts(int64_t n, int64_t k) {
  const int cols = kWarps / gemv_small_m_split(n, k);
  return (n + cols - 1) / cols;
}

void gemv_small_m_residual_norm(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x,
                                const GemvResidualNorm& out) {
  MAMBA3_CHECK(gemv_small_m_supported(1, k, k, w, x),
               "gemv_small_m_residual_norm: K {} must be a multiple of 8 and W, x 16-byte aligned", k);
  MAMBA3_CHECK(out.residual && out.weight && out.out16 && out.partials,
               "gemv_small_m_residual_norm: residual, weight, out16 and partials are required");
  GemvNormArgs na{};
  na.residual = out.residual;
  na.weight = out.weight;
  na.out16 = static_cast<__nv_bfloat16*>(out.out16);
  na.partials_out = out.partials;
  launch_split<1, false, kNormOut>(gemv_small_m_split(n, k), env_prefetch(), s, w, n, k, x, k, nullptr, 0, nullptr, na);
}

namespace {
GemvNormArgs scale_args(const GemvRowScale& in) {
  MAMBA3_CHECK(in.partials && in.parts >= 1 && in.d >= 1, "gemv_small_m: a row scale needs partials, parts and d");
  GemvNormArgs na{};
  na.partials_in = in.partials;
  na.parts = in.parts;
  na.d = in.d;
  na.eps = in.eps;
  return na;
}
}  // namespace

void gemv_small_m_scaled(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, float* y,
                         const GemvRowScale& in) {
  MAMBA3_CHECK(gemv_small_m_supported(1, k, k, w, x),
               "gemv_small_m_scaled: K {} must be a multiple of 8 and W, x 16-byte aligned", k);
  launch_split<1, false, kNormIn>(gemv_small_m_split(n, k), env_prefetch(), s, w, n, k, x, k, y, n, nullptr,
                                  scale_args(in));
}

void gemv_small_m_gated_pairs_scaled(cudaStream_t s, const void* w, int64_t n, int64_t k, const void* x, void* act,
                                     const GemvRowScale& in) {
  MAMBA3_CHECK(n % 2 == 0 && gemv_small_m_supported(1, k, k, w, x),
               "gemv_small_m_gated_pairs_scaled: N {} must be even, K {} a multiple of 8, W and x 16-byte aligned", n,
               k);
  launch_split<1, true, kNormIn>(gemv_small_m_split(n, k), env_prefetch(), s, w, n, k, x, k, nullptr, 0, act,
                                 scale_args(in));
}

}  // namespace mamba3::cuda
