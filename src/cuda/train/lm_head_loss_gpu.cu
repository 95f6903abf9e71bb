#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "cuda/train/block_reduce.cuh"
#include "cuda/train/lm_head_loss_gpu.h"

namespace mamba3::cuda {
namespace {

using train_detail::block_max;
using train_detail::block_sum;
using train_detail::kMaxWarps;
using train_detail::threads_for;

// One block per row: loss = log Σ e^(l − max) + max − l[target]; optionally l ← scale·(softmax − onehot).
// Cost: two passes over the row (max with sum, gradient): ~2 reads + 1 write of n·Vp floats, ~2·n·Vp exps.
__global__ void softmax_cross_entropy_kernel(float* logits, int64_t n, int64_t Vp, const int32_t* targets,
                                             double scale, bool with_grad, double* row_loss) {
  __shared__ double red[kMaxWarps];
  __shared__ float redf[kMaxWarps];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    float* l = logits + r * Vp;
    const int32_t tgt = targets[r];
    if (tgt < 0) {  // no loss here: a zero gradient row keeps it out of dh and dW
      if (threadIdx.x == 0) row_loss[r] = 0.0;
      if (with_grad)
        for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) l[j] = 0.0f;
      continue;
    }
    const bool valid = tgt < Vp;
    // Read before the barriers inside the reductions, so no thread has overwritten it yet.
    const float lt = valid ? l[tgt] : 0.0f;
    // One pass for the maximum and the sum (each thread rescales its running sum when its maximum grows), then the
    // threads' sums rescaled to the row maximum: one read of the row fewer than max-then-sum.
    float m = -INFINITY;
    double part = 0;
    for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
      const float v = l[j];
      if (v > m) {
        part = part * double(expf(m - v)) + 1.0;
        m = v;
      } else {
        part += double(expf(v - m));
      }
    }
    const float mx = block_max(m, redf);
    const double sum = block_sum(m == -INFINITY ? 0.0 : part * double(expf(m - mx)), red);
    const double lse = double(mx) + log(sum);
    if (threadIdx.x == 0) row_loss[r] = valid ? lse - double(lt) : nan("");
    if (!with_grad) continue;
    for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
      // The target's entry is p − 1 with p near 1 for a confident model: float64 there avoids the cancellation.
      l[j] = j == tgt ? float(scale * (exp(double(lt) - lse) - 1.0))
                      : float(scale * double(expf(float(double(l[j]) - lse))));
    }
  }
}

// ------------------------------------------------------------------------------------------- bf16 logits (n, Vp)
// Pair p of a row is its elements 2p and 2p + 1 (P = ⌈Vp/2⌉ pairs; with Vp odd the last pair has one element, the
// other reads as −∞ and is never written). A row that starts 4-byte aligned (every row of a cudaMalloc'd buffer when
// Vp is even) moves a pair as one 32-bit word; with Vp odd every other row does not, and its pairs move as two
// halves. Which thread holds which pair depends on Vp alone, never on the row's address, so a row's loss and
// gradient have the same bits wherever the row lies (in a block of any number of rows).

// A pair travels as its 32-bit word (low half = the lower index), bf16 −∞ where an element is absent.
constexpr uint32_t kNegInfPair = 0xff80ff80u;
__device__ __forceinline__ float lo_f32(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_f32(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Indices within a row are int (the launcher checks Vp < 2³¹): 32-bit offsets keep the addresses cheap to recompute.
__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16* row, int p, int V, bool aligned) {
  const int j = 2 * p;
  if (aligned && j + 1 < V) return *reinterpret_cast<const uint32_t*>(row + j);
  const uint32_t lo = __bfloat16_as_ushort(row[j]), hi = j + 1 < V ? __bfloat16_as_ushort(row[j + 1]) : 0xff80u;
  return lo | hi << 16;
}

__device__ __forceinline__ void store_pair(__nv_bfloat16* row, int p, int V, bool aligned, uint32_t g) {
  const int j = 2 * p;
  if (aligned && j + 1 < V) {
    *reinterpret_cast<uint32_t*>(row + j) = g;
    return;
  }
  row[j] = __ushort_as_bfloat16(static_cast<unsigned short>(g & 0xffffu));
  if (j + 1 < V) row[j + 1] = __ushort_as_bfloat16(static_cast<unsigned short>(g >> 16));
}

// The row's statistics once its maximum is known: what every variant shares, so they agree on the arithmetic.
struct RowSoftmax {
  float mx;   // the row maximum
  float inv;  // scale / Σ e^(l − mx), rounded to f32
  float gt;   // the target's gradient entry, scale·(p_target − 1) in float64 then rounded
  int tgt;    // the target (≥ V: none to subtract)
};

__device__ __forceinline__ float max_pair(float m, uint32_t w) { return fmaxf(m, fmaxf(lo_f32(w), hi_f32(w))); }

// e^(l − mx) of both halves added to a float64 partial sum, low half first (a −∞ half adds an exact 0).
__device__ __forceinline__ double add_exps(double part, uint32_t w, float mx) {
  part += double(expf(lo_f32(w) - mx));
  return part + double(expf(hi_f32(w) - mx));
}

// scale·(softmax − onehot) of pair p, rounded to bf16 (nearest even): e^(l − mx)·scale/Σ in f32 off the target.
__device__ __forceinline__ uint32_t grad_pair(uint32_t w, int p, const RowSoftmax& rs) {
  const float g0 = 2 * p == rs.tgt ? rs.gt : expf(lo_f32(w) - rs.mx) * rs.inv;
  const float g1 = 2 * p + 1 == rs.tgt ? rs.gt : expf(hi_f32(w) - rs.mx) * rs.inv;
  const __nv_bfloat162 g = __floats2bfloat162_rn(g0, g1);
  return uint32_t(__bfloat16_as_ushort(__low2bfloat16(g))) | uint32_t(__bfloat16_as_ushort(__high2bfloat16(g))) << 16;
}

// Loss of the row from its maximum and the block's float64 sum (thread 0 writes it), and what the gradient needs.
__device__ __forceinline__ RowSoftmax finish_row(float mx, double sum, float lt, int tgt, int V, double scale,
                                                 double* loss) {
  const double lse = double(mx) + log(sum);
  if (threadIdx.x == 0) *loss = tgt < V ? lse - double(lt) : nan("");
  // The target's entry is p − 1 with p near 1 for a confident model: float64 there avoids the cancellation.
  return RowSoftmax{mx, float(scale / sum), float(scale * (exp(double(lt) - lse) - 1.0)), tgt};
}

__device__ __forceinline__ void zero_row(__nv_bfloat16* l, int V, bool aligned) {
  const int P = (V + 1) / 2;
  for (int p = int(threadIdx.x); p < P; p += int(blockDim.x)) store_pair(l, p, V, aligned, 0u);
}

// Hides w's value from the compiler: the f32 halves are then recomputed from the packed word in each pass instead
// of being kept alive across the passes (twice the registers: the row would spill).
__device__ __forceinline__ void opaque(uint32_t& w) { asm volatile("" : "+r"(w)); }

// One block per row, the row held in registers: thread t keeps pairs t, t + T, …, t + (K − 1)·T (T = blockDim.x,
// K·T ≥ P) as packed bf16, so the row is read once: maximum, float64 sum of the f32 exponentials, loss, then —
// after the reductions' barriers, when every thread has read the whole row — the gradient in bf16 over the logits.
// Cost: one read and one write of n·Vp bf16 values (4 bytes per logit with the gradient), 2·n·Vp exps.
template <int K>
__global__ void __launch_bounds__(1024) softmax_cross_entropy_bf16_kernel(__nv_bfloat16* logits, int64_t n, int V,
                                                                          const int32_t* targets, double scale,
                                                                          bool with_grad, double* row_loss) {
  __shared__ double red[kMaxWarps];
  __shared__ float redf[kMaxWarps];
  const int P = (V + 1) / 2, T = int(blockDim.x), t = int(threadIdx.x);
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    __nv_bfloat16* l = logits + r * V;
    const bool aligned = (reinterpret_cast<uintptr_t>(l) & 3) == 0;
    const int tgt = targets[r];
    if (tgt < 0) {  // no loss here: a zero gradient row keeps it out of dh and dW
      if (t == 0) row_loss[r] = 0.0;
      if (with_grad) zero_row(l, V, aligned);
      continue;
    }
    const float lt = tgt < V ? __bfloat162float(l[tgt]) : 0.0f;
    uint32_t w[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int p = t + k * T;
      w[k] = p < P ? load_pair(l, p, V, aligned) : kNegInfPair;
    }
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k) m = max_pair(m, w[k]);
    const float mx = block_max(m, redf);
    double part = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      opaque(w[k]);
      part = add_exps(part, w[k], mx);
    }
    const RowSoftmax rs = finish_row(mx, block_sum(part, red), lt, tgt, V, scale, row_loss + r);
    if (!with_grad) continue;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      opaque(w[k]);
      const int p = t + k * T;
      if (p < P) store_pair(l, p, V, aligned, grad_pair(w[k], p, rs));
    }
  }
}

// Rows too long for the registers (P > 32·1024 pairs): the same arithmetic in three passes over the row (maximum,
// sum, gradient), each thread on pairs t, t + T, …; it reads and then writes only its own pairs in the last pass.
// Cost: three reads and one write of n·Vp bf16 values, 2·n·Vp exps.
__global__ void __launch_bounds__(1024) softmax_cross_entropy_bf16_loop_kernel(__nv_bfloat16* logits, int64_t n,
                                                                               int V, const int32_t* targets,
                                                                               double scale, bool with_grad,
                                                                               double* row_loss) {
  __shared__ double red[kMaxWarps];
  __shared__ float redf[kMaxWarps];
  const int P = (V + 1) / 2, T = int(blockDim.x), t = int(threadIdx.x);
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    __nv_bfloat16* l = logits + r * V;
    const bool aligned = (reinterpret_cast<uintptr_t>(l) & 3) == 0;
    const int tgt = targets[r];
    if (tgt < 0) {
      if (t == 0) row_loss[r] = 0.0;
      if (with_grad) zero_row(l, V, aligned);
      continue;
    }
    const float lt = tgt < V ? __bfloat162float(l[tgt]) : 0.0f;
    float m = -INFINITY;
    for (int p = t; p < P; p += T) m = max_pair(m, load_pair(l, p, V, aligned));
    const float mx = block_max(m, redf);
    double part = 0;
    for (int p = t; p < P; p += T) part = add_exps(part, load_pair(l, p, V, aligned), mx);
    const RowSoftmax rs = finish_row(mx, block_sum(part, red), lt, tgt, V, scale, row_loss + r);
    if (!with_grad) continue;
    for (int p = t; p < P; p += T) store_pair(l, p, V, aligned, grad_pair(load_pair(l, p, V, aligned), p, rs));
  }
}

// The register variant for K pairs per thread when they hold the row (K·1024 ≥ P), with the fewest threads that
// do; the block size depends on Vp alone (and so the reductions' order).
template <int K>
bool launch_bf16_rows(cudaStream_t s, unsigned blocks, __nv_bfloat16* logits, int64_t n, int V,
                      const int32_t* targets, double scale, bool with_grad, double* row_loss) {
  const int P = (V + 1) / 2;
  if (P > K * 1024) return false;
  softmax_cross_entropy_bf16_kernel<K><<<blocks, threads_for((P + K - 1) / K, 1024), 0, s>>>(
      logits, n, V, targets, scale, with_grad, row_loss);
  MAMBA3_LAUNCH_CHECK();
  return true;
}

// *out = Σ v in float64: thread t adds v[t], v[t + blockDim], … in order, then the fixed-order block sum.
__global__ void ordered_sum_kernel(const double* v, int64_t n, double* out) {
  __shared__ double red[kMaxWarps];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

}  // namespace

void softmax_cross_entropy_rows_gpu(cudaStream_t s, float* logits, int64_t n, int64_t Vp, const int32_t* targets,
                                    double grad_scale, bool with_grad, double* row_loss) {
  if (n <= 0) return;
  const unsigned blocks = unsigned(n < (1 << 20) ? n : (1 << 20));
  softmax_cross_entropy_kernel<<<blocks, threads_for(Vp, 512), 0, s>>>(logits, n, Vp, targets, grad_scale, with_grad,
                                                                       row_loss);
  MAMBA3_LAUNCH_CHECK();
}

void softmax_cross_entropy_rows_bf16_gpu(cudaStream_t s, uint16_t* logits16, int64_t n, int64_t Vp,
                                         const int32_t* targets, double grad_scale, bool with_grad,
                                         double* row_loss) {
  if (n <= 0) return;
  MAMBA3_CHECK(Vp > 0 && Vp < INT32_MAX, "softmax_cross_entropy_rows_bf16_gpu: bad Vp {}", Vp);
  const unsigned blocks = unsigned(n < (1 << 20) ? n : (1 << 20));
  auto* l = reinterpret_cast<__nv_bfloat16*>(logits16);
  const int V = int(Vp);
  if (launch_bf16_rows<1>(s, blocks, l, n, V, targets, grad_scale, with_grad, row_loss) ||
      launch_bf16_rows<2>(s, blocks, l, n, V, targets, grad_scale, with_grad, row_loss) ||
      launch_bf16_rows<4>(s, blocks, l, n, V, targets, grad_scale, with_grad, row_loss) ||
      launch_bf16_rows<8>(s, blocks, l, n, V, targets, grad_scale, with_grad, row_loss) ||
      launch_bf16_rows<16>(s, blocks, l, n, V, targets, grad_scale, with_grad, row_loss) ||
      launch_bf16_rows<32>(s, blocks, l, n, V, targets, grad_scale, with_grad, row_loss))
    return;
  softmax_cross_entropy_bf16_loop_kernel<<<blocks, 1024, 0, s>>>(l, n, V, targets, grad_scale, with_grad, row_loss);
  MAMBA3_LAUNCH_CHECK();
}

void ordered_sum_gpu(cudaStream_t s, const double* v, int64_t n, double* out) {
  ordered_sum_kernel<<<1, 256, 0, s>>>(v, n, out);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
