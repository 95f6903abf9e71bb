#pragma once
// Next-token sampling on the GPU for a batch of rows, with the semantics of infer/sampler.h (read it first):
// repetition penalty → greedy short-cut (temperature 0 or top_k 1: argmax, lowest id on ties) → temperature →
// top-k → top-p → min-p (standard rule) → draw. Padding ids (vocab_size ≤ id < n_logits) are never returned.
//
// Where it matches the CPU Sampler, and where not:
//  - Greedy ids are bit-identical to Sampler::sample (same float arithmetic for the penalty, same tie rule).
//  - The filters keep the same sets as Sampler::filter, except that top-p measures probability mass in fixed
//    point (each weight exp(z_i) ≤ 1, computed in f32, truncated to a multiple of 2^-s, s = 62 − ⌈log2 V⌉, so
//    s = 44 for 256k tokens) instead of float64 sums: a token whose cumulative mass lies within a relative ~1e-6
//    of the top_p boundary may fall on the other side. The draw uses the same weights (relative error ~1e-7 each;
//    a token of weight below 2^-s of the top one is never drawn). Min-p compares exp(z_i) in f64, as the CPU.
//  - The random stream is NOT the CPU's std::mt19937_64: each non-greedy draw takes u ∈ [0, 1) from a
//    counter-based hash (splitmix64 finalizer) of (seed, row, step), step counting that row's non-greedy draws
//    since start_row. One seed therefore gives one sequence per row on every GPU, independent of the batch's other
//    rows, but a different sequence than the CPU Sampler. The drawn id is the first survivor whose cumulative
//    fixed-point weight exceeds ⌊u·total⌋, in a fixed order of the ids (tiles of 4096 ids, within a tile id
//    j + 512·u ordered by j, then u).
//  - Bad logits cannot throw on the device: NaN counts as −inf (never drawn), +inf as FLT_MAX; a row whose logits
//    are all −inf/NaN returns id 0.
// Everything lives on the device and is advanced by kernels (per-row step counters, per-row "seen" bitmaps over
// n_logits ids for the repetition penalty: the prompt from start_row plus every id sample() returned), so
// sample() can be captured in a CUDA graph. One block of 512 threads per row; cost per row: passes over the
// row's logits (L2-resident): 1 for greedy, 2 for plain sampling, about 4 more for top-k and 5 more for top-p
// (radix-select passes, up to 8 each, usually stopping after 3-4).
//
// This header stays C++17 (the .cu includes it); the std::span overload exists for C++20 callers.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#if __cplusplus >= 202002L
#include <span>
#endif

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"

namespace mamba3 {
struct SamplingParams;
}

namespace mamba3::cuda {

namespace detail {

struct SamplerKernelArgs {
  float temperature = 1.0f, top_p = 1.0f, min_p = 0.0f, penalty = 1.0f;
  int64_t top_k = 0;
  uint64_t seed = 0;
  int64_t vocab = 0, n_logits = 0, batch = 0;
  int64_t words = 0;        // 32-bit words per row of the seen bitmap: ⌈n_logits / 32⌉
  int mass_shift = 0;       // s: fixed-point weights are exp(z)·2^s
  const float* logits = nullptr;  // (batch, n_logits)
  int32_t* ids = nullptr;         // (batch)
  uint32_t* seen = nullptr;       // (batch, words)
  uint64_t* counters = nullptr;   // (batch)
};

// One id per row into a.ids; marks it seen and advances the row's counter after a non-greedy draw.
void sampler_sample(cudaStream_t stream, const SamplerKernelArgs& a);
// Row `row`: clears its seen bits, sets those of prompt[0, count) (device ids in [0, n_logits)), counter ← 0.
void sampler_start_row(cudaStream_t stream, const SamplerKernelArgs& a, int64_t row, const int64_t* prompt,
                       int64_t count);

}  // namespace detail

class GpuSampler {
 public:
  // Validates `params` (SamplingParams::validate). n_logits ≥ vocab_size (the padded row length), batch ≥ 1.
  // Every row starts empty: nothing seen, random stream (seed, row) at step 0. Synchronises the device.
  GpuSampler(const SamplingParams& params, int64_t vocab_size, int64_t n_logits, int64_t batch);

  // logits (batch, n_logits) f32 on the device → ids (batch) int32 on the device, on ctx.stream(). Allocates
  // nothing, reads nothing back: graph-capturable.
  void sample(const Context& ctx, const float* logits, int32_t* ids) const;

  // Starts a new sequence in `row`: its seen set becomes the prompt ids (host memory, each in [0, n_logits);
  // repeated ids are fine) and its random stream restarts at (seed, row, step 0). Copies the prompt to the
  // device through ctx.stream() (may synchronise that stream when its scratch grows). Not graph-capturable.
  void start_row(const Context& ctx, int64_t row, const int64_t* prompt, int64_t count) const;
#if __cplusplus >= 202002L
  void start_row(const Context& ctx, int64_t row, std::span<const int64_t> prompt) const {
    start_row(ctx, row, prompt.data(), int64_t(prompt.size()));
  }
#endif

  int64_t vocab_size() const { return args_.vocab; }
  int64_t n_logits() const { return args_.n_logits; }
  int64_t batch() const { return args_.batch; }

 private:
  detail::SamplerKernelArgs args_;  // parameters and device state pointers; logits and ids set per call
  DeviceBuffer seen_, counters_;
  mutable DeviceBuffer prompt_;  // start_row's staging buffer, grown on demand
};

}  // namespace mamba3::cuda
