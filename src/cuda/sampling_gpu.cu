// Kernels of the GPU sampler (semantics and deviations from the CPU Sampler: sampling_gpu.h). One block per row.
// No token is stored: every pass recomputes an id's penalised logit z_i, its temperature-scaled shifted value
// t_i = (z_i − z_max)/T, its 64-bit order key and its fixed-point weight from the logits row (L2-resident).
//
// Order: key_i = ordered_bits(t_i) · 2^32 + (2^32 − 1 − i), so larger keys mean larger t, then lower id — the
// CPU's strict total order. The top-k set is {key ≥ the k-th largest key}; the top-p set is {key ≥ x} for the
// largest x whose set holds mass ≥ top_p · total. Both thresholds come from one MSB-first radix select (at most
// 8 passes of 8 bits) over a measure (1 per token for top-k, the fixed-point weight for top-p), summed in integers
// so that the result never depends on the order of atomic additions.
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda/sampling_gpu.h"

namespace mamba3::cuda::detail {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// Every pass walks the row in tiles of kUnroll·kThreads ids, thread j taking ids s + u·kThreads + j: coalesced,
// and the kUnroll loads of a tile are issued before any is used (a row is one block: latency, not bandwidth,
// bounds a pass).
constexpr int kUnroll = 8;
constexpr int64_t kTile = int64_t(kUnroll) * kThreads;

// What the per-id functions need of one row (copied out of the kernel arguments and the row's parameters).
struct RowCtx {
  const float* logits;   // this row's n_logits
  const uint32_t* seen;  // this row's words
  const int32_t* counts;  // this row's n_logits generated counts; null when presence = frequency = 0 (not read)
  int64_t vocab;
  float penalty, presence, frequency, temperature, zmax;
  int mass_shift;
};

// The penalised logit of id i (< vocab), in the order of sampling_gpu.h: NaN → −inf and +inf → FLT_MAX; then
// OpenAI's presence/frequency penalty, l − (presence + frequency·n), rounded as written (the _rn intrinsics keep
// nvcc from fusing it into an FMA); then the CPU Sampler's step 1 (repetition penalty). An overflow of either
// penalty (or −inf − (−inf)) is mapped again as the raw logit was.
__device__ __forceinline__ float penalised(const RowCtx& r, int64_t i) {
  float l = r.logits[i];
  if (isnan(l)) l = -INFINITY;
  if (l == INFINITY) l = FLT_MAX;
  if (r.counts != nullptr) {
    const int32_t n = r.counts[i];
    if (n > 0) l = __fsub_rn(l, __fadd_rn(r.presence, __fmul_rn(r.frequency, float(n))));
  }
  const float pen = r.penalty;
  if (pen != 1.0f && ((r.seen[i >> 5] >> (i & 31)) & 1u)) l = l < 0.0f ? l * pen : l / pen;
  if (!(l <= FLT_MAX)) l = isnan(l) ? -INFINITY : FLT_MAX;  // −inf passes unchanged
  return l;
}

// Step 3: t_i = (z_i − z_max)/T (no division when T = 1, as on the CPU); −0 folded to +0 so that the key order
// treats the two zeros as the equal floats they are.
__device__ __forceinline__ float scaled(const RowCtx& r, int64_t i) {
  const float T = r.temperature;
  const float z = penalised(r, i);
  float t = T == 1.0f ? z - r.zmax : (z - r.zmax) / T;
  if (t == 0.0f) t = 0.0f;
  return t;
}

// This thread's ids of the tile at s and their scaled values (−inf past the vocabulary).
__device__ __forceinline__ void load_tile(const RowCtx& r, int64_t s, float (&t)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t i = s + u * kThreads + threadIdx.x;
    t[u] = i < r.vocab ? scaled(r, i) : -INFINITY;
  }
}

__device__ __forceinline__ uint64_t order_key(float t, int64_t i) {
  const uint32_t u = __float_as_uint(t);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone in t
  return (uint64_t(ordered) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(i));
}

// The fixed-point weight ⌊exp(t)·2^s⌋ (t ≤ 0, so at most 2^s; the maximum token has exactly 2^s). exp in f32:
// these weights only decide the top-p boundary and the draw, where f32's 2^-23 relative error is immaterial.
__device__ __forceinline__ uint64_t mass(float t, int shift) {
  return uint64_t(__float2ull_rz(ldexpf(expf(t), shift)));
}

// splitmix64's finalizer: a bijection of 64-bit words with good avalanche.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// u ∈ [0, 1) for (seed, row, step): 53 random bits.
__device__ __forceinline__ double uniform(uint64_t seed, int64_t row, uint64_t step) {
  uint64_t h = mix64(seed ^ 0x5851F42D4C957F2Dull);
  h = mix64(h + 0x9E3779B97F4A7C15ull * (uint64_t(row) + 1));
  h = mix64(h + 0xD1B54A32D192ED03ull * (step + 1));
  return double(h >> 11) * 0x1.0p-53;
}

struct Shared {
  unsigned long long hist[256];  // measure per bucket
  unsigned int count[256];       // ids of positive measure per bucket
  unsigned long long warp_u64[kWarps];
  float warp_v[kWarps];
  int warp_i[kWarps];
  unsigned long long prefix, above;
  int done;
  int chosen;
};

// Whether (v, i) comes before (bv, bi): larger value first, then lower id.
__device__ __forceinline__ bool before(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Block-wide sum of an unsigned 64-bit value (exact, so independent of order); every thread gets it.
__device__ uint64_t block_sum_u64(uint64_t v, Shared& sh) {
  v = warp_sum_u64(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // warp_u64 may still be read by a previous call
  if (lane == 0) sh.warp_u64[warp] = v;
  __syncthreads();
  uint64_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += sh.warp_u64[w];
  return total;
}

// hist[bucket] += m and count[bucket] += 1 for the lanes with `valid` (m > 0). Called by all 32 lanes of a warp.
// The keys of one pass often share a few buckets (the top bits of floats of one magnitude), and 512 threads
// adding to one shared address serialise; so when a warp's lanes fall into at most 4 buckets, each bucket gets
// one warp-summed addition.
__device__ __forceinline__ void histogram_add(Shared& sh, bool valid, unsigned bucket, uint64_t m) {
  const unsigned valid_lanes = __ballot_sync(kFull, valid);
  if (valid_lanes == 0) return;
  const int lane = threadIdx.x % 32;
  const unsigned peers = __match_any_sync(kFull, valid ? bucket : 0xFFFFFFFFu) & valid_lanes;
  const unsigned leaders = __ballot_sync(kFull, valid && (__ffs(peers) - 1) == lane);
  if (__popc(leaders) <= 4) {
    for (unsigned todo = leaders; todo != 0; todo &= todo - 1) {
      const int l = __ffs(todo) - 1;
      const unsigned b = __shfl_sync(kFull, bucket, l);
      const bool mine = valid && bucket == b;
      const uint64_t sum = warp_sum_u64(mine ? m : 0);
      const unsigned n = __popc(__ballot_sync(kFull, mine));
      if (lane == l) {
        atomicAdd(&sh.hist[b], (unsigned long long)sum);
        atomicAdd(&sh.count[b], n);
      }
    }
  } else if (valid) {
    atomicAdd(&sh.hist[bucket], (unsigned long long)m);
    atomicAdd(&sh.count[bucket], 1u);
  }
}

// The largest key x (over the ids whose key is ≥ base, all when !base_on) such that the measure of
// {key ≥ x} reaches `goal` (1 ≤ goal ≤ the measure of the whole set). Measure: 1 per id (by_mass false) or the
// fixed-point weight (ids of weight 0 are left out). MSB-first: each pass histograms the next 8 bits of the keys
// that share the prefix found so far and descends into the highest bucket d where `above` (the measure of
// everything above the prefix) plus the buckets ≥ d reaches the goal; that bucket has a positive measure. When it
// holds a single id of positive measure, or exactly the measure still needed (so each of its ids is needed), all
// its ids belong to the set, and the prefix with zero low bits is a threshold that selects the same set (plus,
// by mass, ids of weight 0, which are never drawn): the select stops there.
__device__ uint64_t radix_select(const RowCtx& r, Shared& sh, bool by_mass, uint64_t goal, bool base_on,
                                 uint64_t base) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint64_t prefix = 0, mask = 0, above = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) {
      sh.hist[b] = 0;
      sh.count[b] = 0;
    }
    __syncthreads();
    for (int64_t s = 0; s < r.vocab; s += kTile) {  // uniform trip count: whole warps call histogram_add
      float t[kUnroll];
      load_tile(r, s, t);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = s + u * kThreads + threadIdx.x;
        bool valid = false;
        unsigned bucket = 0;
        uint64_t m = 0;
        if (i < r.vocab) {
          const uint64_t key = order_key(t[u], i);
          if (!(base_on && key < base) && (key & mask) == prefix) {
            m = by_mass ? mass(t[u], r.mass_shift) : 1;
            valid = m > 0;
            bucket = unsigned((key >> shift) & 255u);
          }
        }
        histogram_add(sh, valid, bucket, m);
      }
    }
    __syncthreads();
    if (warp == 0) {
      // Lane ℓ owns buckets 255 − 8ℓ − q, q = 0 … 7 (lane 0 the highest); an inclusive scan over the lanes of
      // their sums finds the lane where the running measure first reaches the goal, which walks its 8 buckets.
      uint64_t local = 0;
      for (int q = 0; q < 8; ++q) local += sh.hist[255 - 8 * lane - q];
      uint64_t incl = local;
      for (int off = 1; off < 32; off <<= 1) {
        const uint64_t o = __shfl_up_sync(kFull, incl, off);
        if (lane >= off) incl += o;
      }
      const uint64_t excl = incl - local;
      bool here = above + excl < goal && above + incl >= goal;
      if (__ballot_sync(kFull, here) == 0) here = lane == 31;  // unreachable with exact sums; keeps x defined
      if (here) {
        uint64_t acc = above + excl;
        int d = 255 - 8 * lane;
        for (int q = 0; q < 8; ++q) {
          d = 255 - 8 * lane - q;
          if (acc + sh.hist[d] >= goal || q == 7) break;
          acc += sh.hist[d];
        }
        sh.above = acc;
        sh.prefix = prefix | (uint64_t(d) << shift);
        sh.done = sh.count[d] <= 1 || acc + sh.hist[d] == goal;
      }
    }
    __syncthreads();
    prefix = sh.prefix;
    above = sh.above;
    mask |= uint64_t(255) << shift;
    if (sh.done) break;
    __syncthreads();  // every thread has read sh before the next pass rewrites it
  }
  return prefix;
}

// The weight a survivor of steps 4–6 is drawn with (0 for an id the filters drop): top-k, top-p, then min-p
// (exp(t) ≥ min_p in f64, as on the CPU).
struct Filters {
  bool topk_on, topp_on;
  uint64_t kth, pth;
  double min_p;
  int mass_shift;
};

__device__ __forceinline__ uint64_t survivor_weight(const Filters& f, float t, int64_t i) {
  const uint64_t key = order_key(t, i);
  if (f.topk_on && key < f.kth) return 0;
  if (f.topp_on && key < f.pth) return 0;
  if (f.min_p > 0.0 && !(exp(double(t)) >= f.min_p)) return 0;
  return mass(t, f.mass_shift);
}

// Row `row`'s parameters: its entry of a.params in per-row mode, else the uniform ones. Field by field through
// volatile reads: nvcc 13.0 (-O3) miscompiled `p = a.params[row]` in one branch and field assignments from `a` in
// the other, reading a.temperature in both (the per-row temperature was never loaded: rows sampled greedily).
__device__ __forceinline__ SamplerRowParams row_params(const SamplerKernelArgs& a, int64_t row) {
  SamplerRowParams p;
  if (a.params != nullptr) {
    const volatile SamplerRowParams& q = a.params[row];
    p.temperature = q.temperature;
    p.top_p = q.top_p;
    p.min_p = q.min_p;
    p.penalty = q.penalty;
    p.presence = q.presence;
    p.frequency = q.frequency;
    p.top_k = q.top_k;
    p.seed = q.seed;
  } else {
    p.temperature = a.temperature;
    p.top_p = a.top_p;
    p.min_p = a.min_p;
    p.penalty = a.penalty;
    p.top_k = a.top_k;
    p.seed = a.seed;
  }
  return p;
}

// One block per row (per entry of a.rows when set). Cost per row: see sampling_gpu.h.
__global__ void __launch_bounds__(kThreads) sample_kernel(SamplerKernelArgs args) {
  __shared__ Shared sh;
  const SamplerKernelArgs& a = args;
  const int64_t blk = blockIdx.x;
  const int64_t row = a.rows != nullptr ? a.rows[blk] : blk;  // the state (and id) this block samples
  // An inactive row: the whole block leaves here, before any barrier, writing nothing.
  if (a.active != nullptr && a.active[row] == 0) return;
  const SamplerRowParams p = row_params(a, row);
  const bool counted = a.counts != nullptr && (p.presence != 0.0f || p.frequency != 0.0f);
  RowCtx r{a.logits + blk * a.n_logits,
           a.seen + row * a.words,
           counted ? a.counts + row * a.n_logits : nullptr,
           a.vocab,
           p.penalty,
           p.presence,
           p.frequency,
           p.temperature,
           0.0f,
           a.mass_shift};
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // 1–2. Argmax of the penalised logits, lowest id on ties (ids < vocab only: padding is never a candidate).
  float bv = -INFINITY;
  int bi = 0x7FFFFFFF;
  for (int64_t s = 0; s < a.vocab; s += kTile) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = s + u * kThreads + threadIdx.x;
      v[u] = i < a.vocab ? penalised(r, i) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = s + u * kThreads + threadIdx.x;
      if (i < a.vocab && before(v[u], int(i), bv, bi)) {
        bv = v[u];
        bi = int(i);
      }
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(kFull, bv, off);
    const int oi = __shfl_xor_sync(kFull, bi, off);
    if (before(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    sh.warp_v[warp] = bv;
    sh.warp_i[warp] = bi;
  }
  __syncthreads();
  bv = sh.warp_v[0];
  bi = sh.warp_i[0];
  for (int w = 1; w < kWarps; ++w)
    if (before(sh.warp_v[w], sh.warp_i[w], bv, bi)) {
      bv = sh.warp_v[w];
      bi = sh.warp_i[w];
    }
  r.zmax = bv;

  // The block-wide return below follows the barrier above, and bv is the same in every thread.
  const bool greedy = p.temperature == 0.0f || p.top_k == 1;
  if (greedy || bv == -INFINITY) {  // every logit −inf/NaN: id 0 (the CPU would throw)
    if (threadIdx.x == 0) {  // every read of this row's counts and seen bits happened before the barrier above
      a.ids[row] = bi;
      a.seen[row * a.words + (bi >> 5)] |= 1u << (bi & 31);
      if (a.counts != nullptr) a.counts[row * a.n_logits + bi] += 1;
    }
    return;
  }

  Filters f{false, false, 0, 0, double(p.min_p), a.mass_shift};
  // 4. Top-k threshold: the k-th largest key.
  f.topk_on = p.top_k > 0 && p.top_k < a.vocab;
  if (f.topk_on) f.kth = radix_select(r, sh, false, uint64_t(p.top_k), false, 0);

  // 5. Top-p threshold over the top-k survivors: mass ≥ ⌈top_p · total⌉ in fixed point.
  if (p.top_p < 1.0f) {
    uint64_t mine = 0;
    for (int64_t s = 0; s < a.vocab; s += kTile) {
      float t[kUnroll];
      load_tile(r, s, t);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = s + u * kThreads + threadIdx.x;
        if (i < a.vocab && !(f.topk_on && order_key(t[u], i) < f.kth)) mine += mass(t[u], a.mass_shift);
      }
    }
    const uint64_t total = block_sum_u64(mine, sh);
    uint64_t goal = uint64_t(ceil(double(p.top_p) * double(total)));
    if (goal > total) goal = total;
    if (goal < 1) goal = 1;
    f.pth = radix_select(r, sh, true, goal, f.topk_on, f.kth);
    f.topp_on = true;
  }

  // 6–7. The survivors' total weight, then the draw: target = ⌊u·total⌋ and the survivor whose cumulative weight
  // first exceeds it, walking the tiles in order (within a tile: thread, then u). The two walks compute the same
  // integer weights, so the target always falls inside the row.
  uint64_t mine = 0;
  for (int64_t s = 0; s < a.vocab; s += kTile) {
    float t[kUnroll];
    load_tile(r, s, t);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = s + u * kThreads + threadIdx.x;
      if (i < a.vocab) mine += survivor_weight(f, t[u], i);
    }
  }
  const uint64_t total = block_sum_u64(mine, sh);  // ≥ 2^s: the maximum survives every filter
  // Per-row mode: the stream ignores the row (slot), so a sequence's draws depend only on its seed and step.
  const double draw = uniform(p.seed, a.params != nullptr ? 0 : row, a.counters[row]);
  uint64_t target = uint64_t(draw * double(total));
  if (target >= total) target = total - 1;
  if (threadIdx.x == 0) sh.chosen = -1;
  uint64_t running = 0;  // the weight of the tiles before s (the same in every thread)
  for (int64_t s = 0; s < a.vocab; s += kTile) {
    float t[kUnroll];
    load_tile(r, s, t);
    uint64_t w[kUnroll], local = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = s + u * kThreads + threadIdx.x;
      w[u] = i < a.vocab ? survivor_weight(f, t[u], i) : 0;
      local += w[u];
    }
    // Exclusive scan of `local` over the block's threads.
    uint64_t incl = local;
    for (int off = 1; off < 32; off <<= 1) {
      const uint64_t o = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += o;
    }
    __syncthreads();  // the previous tile's readers of warp_u64 are done
    if (lane == 31) sh.warp_u64[warp] = incl;
    __syncthreads();
    uint64_t warp_offset = 0, tile_total = 0;
    for (int wp = 0; wp < kWarps; ++wp) {
      if (wp < warp) warp_offset += sh.warp_u64[wp];
      tile_total += sh.warp_u64[wp];
    }
    if (running + tile_total > target) {  // the same decision in every thread
      uint64_t acc = running + warp_offset + incl - local;
      if (local > 0 && acc <= target && target < acc + local) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          acc += w[u];
          if (acc > target) {
            sh.chosen = int(s + u * kThreads + threadIdx.x);
            break;
          }
        }
      }
      break;
    }
    running += tile_total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int id = sh.chosen >= 0 ? sh.chosen : bi;  // the fallback cannot trigger (the sums are exact)
    a.ids[row] = id;
    a.seen[row * a.words + (id >> 5)] |= 1u << (id & 31);
    if (a.counts != nullptr) a.counts[row * a.n_logits + id] += 1;
    a.counters[row] += 1;
  }
}

__global__ void start_row_kernel(SamplerKernelArgs a, int64_t row, const int64_t* prompt, int64_t count) {
  uint32_t* seen = a.seen + row * a.words;
  for (int64_t w = threadIdx.x; w < a.words; w += blockDim.x) seen[w] = 0;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) {
    const int64_t id = prompt[j];
    if (id >= 0 && id < a.n_logits) atomicOr(&seen[id >> 5], 1u << (id & 31));
  }
  if (a.counts != nullptr) {
    int32_t* counts = a.counts + row * a.n_logits;
    for (int64_t i = threadIdx.x; i < a.n_logits; i += blockDim.x) counts[i] = 0;
  }
  if (threadIdx.x == 0) a.counters[row] = 0;
}

}  // namespace

void sampler_sample(cudaStream_t stream, const SamplerKernelArgs& a) {
  const int64_t blocks = a.rows != nullptr ? a.n_rows : a.batch;
  if (blocks == 0) return;
  sample_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(a);
  MAMBA3_LAUNCH_CHECK();
}

void sampler_start_row(cudaStream_t stream, const SamplerKernelArgs& a, int64_t row, const int64_t* prompt,
                       int64_t count) {
  start_row_kernel<<<1, 512, 0, stream>>>(a, row, prompt, count);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda::detail
