#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/bulk_copy.cuh"
#include "cuda/pdl.h"
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
  pdl_wait();
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
// gradient have the same bits wherever the row lies (in a block of any number of rows), whichever kernel runs.

// A pair travels as its 32-bit word (low half = the lower index), bf16 −∞ where an element is absent.
__device__ __forceinline__ float lo_f32(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_f32(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Indices within a row are int (the launcher checks Vp < 2³¹): 32-bit offsets keep the addresses cheap to recompute.
// `row` is the row in global memory or its copy in shared memory (same alignment mod 16, so the same `aligned`).
// kWhole: the row is 4-byte aligned and V even, so every pair is one whole 32-bit word (no checks per pair).
template <bool kWhole>
__device__ __forceinline__ uint32_t load_pair(const __nv_bfloat16* row, int p, int V, bool aligned) {
  const int j = 2 * p;
  if (kWhole || (aligned && j + 1 < V)) return reinterpret_cast<const uint32_t*>(row)[p];
  const uint32_t lo = __bfloat16_as_ushort(row[j]), hi = j + 1 < V ? __bfloat16_as_ushort(row[j + 1]) : 0xff80u;
  return lo | hi << 16;
}

template <bool kWhole>
__device__ __forceinline__ void store_pair(__nv_bfloat16* row, int p, int V, bool aligned, uint32_t g) {
  const int j = 2 * p;
  if (kWhole || (aligned && j + 1 < V)) {
    reinterpret_cast<uint32_t*>(row)[p] = g;
    return;
  }
  row[j] = __ushort_as_bfloat16(static_cast<unsigned short>(g & 0xffffu));
  if (j + 1 < V) row[j + 1] = __ushort_as_bfloat16(static_cast<unsigned short>(g >> 16));
}

// The row's statistics once its maximum is known.
struct RowSoftmax {
  float mx2;  // the row maximum times log2(e): e^(l − mx) = 2^(l·log2(e) − mx2)
  float inv;  // scale / Σ e^(l − mx), rounded to f32
  float gt;   // the target's gradient entry, scale·(p_target − 1) in float64 then rounded (in its pair's thread)
};

constexpr float kLog2e = 1.4426950408889634f;

// e^(l − mx) as 2^(l·log2(e) − mx2): one FMA and the special-function unit's exp2 (relative error ≤ 2⁻²²,
// −∞ → +0). The accurate expf is ~10 instructions, and two per logit made the kernel instruction-bound; the
// gradient is rounded to bf16 (2⁻⁹) and the sum's terms are each off by ≤ 2⁻²² in either direction.
__device__ __forceinline__ float exp_shifted(float l, float mx2) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(fmaf(l, kLog2e, -mx2)));
  return y;
}

// scale·softmax of a pair, rounded to bf16 (nearest even): 2^(l·log2(e) + k2) with k2 = log2(scale / Σ) − mx2, the
// division folded into the exponent (one FMA and one exp2 a logit). The target's entry is stored apart afterwards.
__device__ __forceinline__ uint32_t grad_pair(uint32_t w, float k2) {
  const __nv_bfloat162 g = __floats2bfloat162_rn(exp_shifted(lo_f32(w), -k2), exp_shifted(hi_f32(w), -k2));
  return uint32_t(__bfloat16_as_ushort(__low2bfloat16(g))) | uint32_t(__bfloat16_as_ushort(__high2bfloat16(g))) << 16;
}

// Loss of the row from its maximum and the block's float64 sum of every term but the target's (thread 0 writes it),
// and what the gradient needs. The sum's terms are e^(l − c) with c = mx2 / log2(e) (mx2 rounded to f32). The target's
// term e^(lt − c) is added apart: in float64 where it matters — the loss (thread 0) and the target's entry (its pair's
// thread), scale·(p − 1) = −scale·rest / Σ, which for a confident row (p near 1, rest ≪ 1) has no cancellation and
// no rounding of the target's term into a sum of f32 terms near 1 — and in f32 in every thread's 1 / Σ. The float64
// log and exps run only in those two threads: in all T they would cost about a tenth of the row's exponentials.
__device__ __forceinline__ RowSoftmax finish_row(float mx, double rest, float lt, int tgt, int V, double scale,
                                                 double* loss) {
  const float mx2 = mx * kLog2e;
  const double et_f = tgt < V ? double(exp_shifted(lt, mx2)) : 0.0;
  RowSoftmax rs{mx2, float(scale / (rest + et_f)), 0.0f};
  const int t = int(threadIdx.x);
  if (t == 0 || (tgt < V && (tgt / 2) % int(blockDim.x) == t)) {
    const double c = double(mx2) / double(kLog2e), et = tgt < V ? exp(double(lt) - c) : 0.0, sum = rest + et;
    if (t == 0) *loss = tgt < V ? c + log(sum) - double(lt) : nan("");
    rs.gt = float(-scale * rest / sum);
  }
  return rs;
}

__device__ __forceinline__ void zero_row(__nv_bfloat16* l, int V, bool aligned) {
  const int P = (V + 1) / 2;
  for (int p = int(threadIdx.x); p < P; p += int(blockDim.x)) store_pair<false>(l, p, V, aligned, 0u);
}

// One row with a target 0 ≤ tgt (≥ V: loss NaN, no onehot), what both kernels run: maximum, the sum of the
// exponentials (each thread's in f32 — at most 64 terms ≤ 1 — then the threads' in float64), loss, then the gradient
// in bf16 over the row at dst. The pairs are read from src (the row itself or its copy in shared memory) in each of
// the three passes; thread t takes pairs t, t + T, t + 2T, … (T = blockDim.x) in that order in every pass, so the
// sum's order depends on T alone (and not on kWhole, which only drops the per-pair checks). dst is written only after
// the reductions' barriers, when every thread has read its pairs and the target, and each thread rereads only its own
// pairs. The target's entry is stored over its pair's by the same thread after the pass.
template <bool kWhole>
__device__ __forceinline__ void softmax_row_passes(const __nv_bfloat16* src, __nv_bfloat16* dst, int V, bool aligned,
                                                   int tgt, double scale, bool with_grad, double* loss, double* red,
                                                   float* redf) {
  const int P = (V + 1) / 2, T = int(blockDim.x), t = int(threadIdx.x);
  const float lt = tgt < V ? __bfloat162float(src[tgt]) : 0.0f;
  // The maximum on bf16 pairs (exact; one instruction a pair).
  __nv_bfloat162 m2 = __bfloat162bfloat162(__ushort_as_bfloat16(0xff80u));
  for (int p = t; p < P; p += T) {
    const uint32_t w = load_pair<kWhole>(src, p, V, aligned);
    m2 = __hmax2(m2, *reinterpret_cast<const __nv_bfloat162*>(&w));
  }
  const float mx = block_max(fmaxf(__low2float(m2), __high2float(m2)), redf), mx2 = mx * kLog2e;
  const int tp = tgt < V ? tgt / 2 : -1;  // the target's pair, whose target term the sum leaves out
  float part = 0;
  for (int p = t; p < P; p += T) {
    const uint32_t w = load_pair<kWhole>(src, p, V, aligned);
    float e0 = exp_shifted(lo_f32(w), mx2), e1 = exp_shifted(hi_f32(w), mx2);
    if (p == tp) (2 * p == tgt ? e0 : e1) = 0.0f;
    part += e0 + e1;
  }
  const RowSoftmax rs = finish_row(mx, block_sum(double(part), red), lt, tgt, V, scale, loss);
  if (!with_grad) return;
  const float k2 = log2f(rs.inv) - rs.mx2;
  for (int p = t; p < P; p += T)
    store_pair<kWhole>(dst, p, V, aligned, grad_pair(load_pair<kWhole>(src, p, V, aligned), k2));
  if (tp >= 0 && tp % T == t) dst[tgt] = __float2bfloat16_rn(rs.gt);
}

__device__ __forceinline__ void softmax_row(const __nv_bfloat16* src, __nv_bfloat16* dst, int V, bool aligned,
                                            int tgt, double scale, bool with_grad, double* loss, double* red,
                                            float* redf) {
  if (aligned && V % 2 == 0) softmax_row_passes<true>(src, dst, V, aligned, tgt, scale, with_grad, loss, red, redf);
  else softmax_row_passes<false>(src, dst, V, aligned, tgt, scale, with_grad, loss, red, redf);
}

// A row in a shared-memory buffer (16-byte aligned): element j at byte lead + 2j, lead = the row's global address
// mod 16, so the bulk copy engine moves the row's 16-byte-aligned middle, elements [head, head + mid), as it lies.
// The edges — the ≤ 7 elements before the middle and the ≤ 7 after it, or the whole row when it holds no aligned
// 16 bytes (V ≤ 15) — are loaded by threads 0 … V − mid − 1, one element each (blockDim.x ≥ 32 > 15).
struct RowSpan {
  int lead, head, mid;
};
__device__ __forceinline__ RowSpan row_span(const __nv_bfloat16* row, int V) {
  const int lead = int(reinterpret_cast<uintptr_t>(row) & 15);
  const int head = lead == 0 ? 0 : min(V, (16 - lead) / 2);
  return RowSpan{lead, head, (V - head) / 8 * 8};
}
// The element index of edge e (e < V − mid).
__device__ __forceinline__ int edge_index(const RowSpan& s, int e) { return e < s.head ? e : e + s.mid; }

// Starts bringing a row into buffer buf: thread 0 has the bulk copy engine move the middle, completing on `full`
// (when `copy`: rows without a target are never read, and their barrier phase is not used either); each edge thread
// loads its element and returns it, stored by store_edge once that buffer's previous row is done with.
__device__ __forceinline__ uint16_t request_row(const __nv_bfloat16* row, int V, bool copy, unsigned char* buf,
                                                uint64_t* full, uint64_t policy) {
  const RowSpan s = row_span(row, V);
  const int e = int(threadIdx.x);
  if (e == 0 && copy) {
    // The buffer's last accesses (the previous row's reads, its edges' writes) were generic-proxy ones.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    const unsigned bytes = unsigned(s.mid) * 2u;
    expect_bytes(full, bytes);  // with no middle, the arrival alone completes the phase
    if (bytes > 0)
      bulk_copy_part(reinterpret_cast<float*>(buf + s.lead + 2 * s.head), reinterpret_cast<const float*>(row + s.head),
                     bytes, full, policy);
  }
  return e < V - s.mid ? __bfloat16_as_ushort(row[edge_index(s, e)]) : uint16_t(0);
}
__device__ __forceinline__ void store_edge(const __nv_bfloat16* row, int V, unsigned char* buf, uint16_t edge) {
  const RowSpan s = row_span(row, V);
  const int e = int(threadIdx.x);
  if (e >= V - s.mid) return;
  *reinterpret_cast<uint16_t*>(buf + s.lead + 2 * edge_index(s, e)) = edge;
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // before a later bulk copy over these bytes
}

// Persistent blocks, each taking rows blockIdx.x, + gridDim.x, …, two rows in shared memory: the bulk copy engine
// brings the next row while the block computes the current one from its copy (softmax_row: three passes over shared
// memory, the gradient stored straight to global memory), so the block's reads never wait on its arithmetic. With
// two buffers of the 100 KB row of Vp 50280 (197 KB) one block fits on an SM; its T threads (800 there) are few, so
// the passes must be lean: ~30 instructions a pair in all three, the exponentials on the special-function unit.
// Cost: one read and one write of n·Vp bf16 values (4 bytes per logit with the gradient), 2·n·Vp exps.
__global__ void __launch_bounds__(1024)
    softmax_cross_entropy_bf16_smem_kernel(__nv_bfloat16* logits, int64_t n, int V, const int32_t* targets,
                                           double scale, bool with_grad, double* row_loss, int buffer_bytes) {
  pdl_wait();
  extern __shared__ __align__(16) unsigned char buffers[];  // two buffers of buffer_bytes
  __shared__ double red[kMaxWarps];
  __shared__ float redf[kMaxWarps];
  __shared__ uint64_t full[2];
  if (threadIdx.x == 0) {
    mbar_init(&full[0]);
    mbar_init(&full[1]);
    mbar_init_fence();
  }
  __syncthreads();
  uint64_t policy;  // each logit is read once: L2 evicts them first
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  const int64_t G = gridDim.x;
  int64_t r = blockIdx.x;  // < n: the launcher starts no more blocks than rows
  // The targets of this row and the next, loaded a row ahead so no copy request waits on them.
  int tgt = targets[r], tgt_next = r + G < n ? targets[r + G] : -1;
  store_edge(logits + r * V, V, buffers, request_row(logits + r * V, V, tgt >= 0, buffers, &full[0], policy));
  __syncthreads();
  unsigned parity = 0;  // bit b: the parity of buffer b's next copy to wait for
  for (int b = 0; r < n; r += G, b ^= 1) {
    unsigned char* cur = buffers + b * buffer_bytes;
    unsigned char* nxt = buffers + (b ^ 1) * buffer_bytes;  // its row (two back) was done with at the last barrier
    const int64_t next = r + G;
    uint16_t edge = 0;
    int tgt_after = -1;
    if (next < n) {
      edge = request_row(logits + next * V, V, tgt_next >= 0, nxt, &full[b ^ 1], policy);
      if (next + G < n) tgt_after = targets[next + G];
    }
    __nv_bfloat16* l = logits + r * V;
    const bool aligned = (reinterpret_cast<uintptr_t>(l) & 3) == 0;
    if (tgt < 0) {  // no loss here: a zero gradient row keeps it out of dh and dW
      if (threadIdx.x == 0) row_loss[r] = 0.0;
      if (with_grad) zero_row(l, V, aligned);
    } else {
      mbar_wait(&full[b], (parity >> b) & 1u);
      parity ^= 1u << b;
      const auto* src = reinterpret_cast<const __nv_bfloat16*>(cur + (reinterpret_cast<uintptr_t>(l) & 15));
      softmax_row(src, l, V, aligned, tgt, scale, with_grad, row_loss + r, red, redf);
    }
    if (next < n) store_edge(logits + next * V, V, nxt, edge);
    __syncthreads();  // cur's reads done (the copy two rows on may start), nxt's edges visible
    tgt = tgt_next;
    tgt_next = tgt_after;
  }
}

// Rows too long for two in shared memory (Vp > ~58000 on sm_90): softmax_row straight from global memory, three
// passes over the row (the second and third mostly from L2), each thread reading and then writing only its own pairs
// in the last. Cost: three reads and one write of n·Vp bf16 values, 2·n·Vp exps.
__global__ void __launch_bounds__(1024) softmax_cross_entropy_bf16_loop_kernel(__nv_bfloat16* logits, int64_t n,
                                                                               int V, const int32_t* targets,
                                                                               double scale, bool with_grad,
                                                                               double* row_loss) {
  pdl_wait();
  __shared__ double red[kMaxWarps];
  __shared__ float redf[kMaxWarps];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    __nv_bfloat16* l = logits + r * V;
    const bool aligned = (reinterpret_cast<uintptr_t>(l) & 3) == 0;
    const int tgt = targets[r];
    if (tgt < 0) {
      if (threadIdx.x == 0) row_loss[r] = 0.0;
      if (with_grad) zero_row(l, V, aligned);
      continue;
    }
    softmax_row(l, l, V, aligned, tgt, scale, with_grad, row_loss + r, red, redf);
  }
}

// Threads for a row of P pairs, which fix the order of its sum: one per pair up to 1024 (a multiple of 32), so that
// the one block an SM holds has as many warps as it may (the passes wait on shared-memory loads and exp2 results:
// 800 threads at Vp 50280 left most cycles without an eligible warp). A function of Vp alone, the same for both
// kernels.
int row_threads(int P) { return threads_for(P, 1024); }

// A row buffer: the row at its address's offset mod 16 (≤ 14 bytes), rounded up to 16 bytes.
size_t row_buffer_bytes(int V) { return (size_t(V) * 2 + 14 + 15) / 16 * 16; }

// The shared-memory kernel when two rows fit in a block's shared memory: one block per SM at Vp 50280 (more for
// short rows), no more blocks than rows.
bool launch_bf16_smem(cudaStream_t s, __nv_bfloat16* logits, int64_t n, int V, int threads, const int32_t* targets,
                      double scale, bool with_grad, double* row_loss) {
  const auto kernel = softmax_cross_entropy_bf16_smem_kernel;
  const size_t buffer = row_buffer_bytes(V), bytes = 2 * buffer;
  static const int limit = [&] {  // the dynamic shared memory the device allows, raised once
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
  thread_local size_t known_bytes = 0;  // the occupancy of the last shape asked (a model asks for one)
  thread_local int known_threads = 0, per_sm = 0;
  if (bytes != known_bytes || threads != known_threads) {
    MAMBA3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes));
    known_bytes = bytes, known_threads = threads;
  }
  if (per_sm < 1) return false;
  static const int sms = device_info().sm_count;
  const int64_t resident = int64_t(per_sm) * std::max(sms, 1);
  launch_train(kernel, unsigned(std::min(n, resident)), threads, bytes, s, logits, n, V, targets, scale, with_grad,
               row_loss, int(buffer));
  MAMBA3_LAUNCH_CHECK();
  return true;
}

// *out = Σ v in float64: thread t adds v[t], v[t + blockDim], … in order, then the fixed-order block sum. The loads
// go out 16 at a time before their adds (one load round trip per add had made it 25 µs at 16k rows).
__global__ void ordered_sum_kernel(const double* v, int64_t n, double* out) {
  pdl_wait();
  __shared__ double red[kMaxWarps];
  constexpr int kAhead = 16;
  double acc = 0;
  const int64_t step = blockDim.x;
  for (int64_t i0 = threadIdx.x; i0 < n; i0 += kAhead * step) {
    double w[kAhead];
#pragma unroll
    for (int k = 0; k < kAhead; ++k) w[k] = i0 + k * step < n ? v[i0 + k * step] : 0.0;
#pragma unroll
    for (int k = 0; k < kAhead; ++k)
      if (i0 + k * step < n) acc += w[k];
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

}  // namespace

void softmax_cross_entropy_rows_gpu(cudaStream_t s, float* logits, int64_t n, int64_t Vp, const int32_t* targets,
                                    double grad_scale, bool with_grad, double* row_loss) {
  if (n <= 0) return;
  const unsigned blocks = unsigned(n < (1 << 20) ? n : (1 << 20));
  launch_train(softmax_cross_entropy_kernel, blocks, threads_for(Vp, 512), 0, s, logits, n, Vp, targets, grad_scale,
               with_grad, row_loss);
  MAMBA3_LAUNCH_CHECK();
}

void softmax_cross_entropy_rows_bf16_gpu(cudaStream_t s, uint16_t* logits16, int64_t n, int64_t Vp,
                                         const int32_t* targets, double grad_scale, bool with_grad,
                                         double* row_loss) {
  if (n <= 0) return;
  MAMBA3_CHECK(Vp > 0 && Vp < INT32_MAX, "softmax_cross_entropy_rows_bf16_gpu: bad Vp {}", Vp);
  auto* l = reinterpret_cast<__nv_bfloat16*>(logits16);
  const int V = int(Vp), threads = row_threads((V + 1) / 2);
  if (launch_bf16_smem(s, l, n, V, threads, targets, grad_scale, with_grad, row_loss)) return;
  const unsigned blocks = unsigned(n < (1 << 20) ? n : (1 << 20));
  launch_train(softmax_cross_entropy_bf16_loop_kernel, blocks, threads, 0, s, l, n, V, targets, grad_scale, with_grad,
               row_loss);
  MAMBA3_LAUNCH_CHECK();
}

void ordered_sum_gpu(cudaStream_t s, const double* v, int64_t n, double* out) {
  launch_train(ordered_sum_kernel, 1, 256, 0, s, v, n, out);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
