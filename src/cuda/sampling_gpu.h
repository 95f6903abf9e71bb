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
//    counter-based hash (splitmix64 finalizer) of (seed, row, step) — (seed, 0, step) in per-row mode, below —
//    step counting that row's non-greedy draws since start_row/set_row. One seed therefore gives one sequence per row on every GPU, independent of the batch's other
//    rows, but a different sequence than the CPU Sampler. The drawn id is the first survivor whose cumulative
//    fixed-point weight exceeds ⌊u·total⌋, in a fixed order of the ids (tiles of 4096 ids, within a tile id
//    j + 512·u ordered by j, then u).
//  - Bad logits cannot throw on the device: NaN counts as −inf (never drawn), +inf as FLT_MAX; a row whose logits
//    are all −inf/NaN returns id 0.
// Everything lives on the device and is advanced by kernels (per-row step counters, per-row "seen" bitmaps over
// n_logits ids for the repetition penalty: the prompt from start_row plus every id sample() returned; per-row
// mode adds each row's parameters, an active mask and (batch, n_logits) int32 counts of the generated ids), so
// sample() can be captured in a CUDA graph. One block of 512 threads per row; cost per row: passes over the
// row's logits (L2-resident): 1 for greedy, 2 for plain sampling, about 4 more for top-k and 5 more for top-p
// (radix-select passes, up to 8 each, usually stopping after 3-4).
//
// Two modes:
//  - uniform (the constructor): one SamplingParams for every row; row `row`'s draws take u from (seed, row, step);
//  - per-row (GpuSampler::per_row, for a server's decode slots): every row holds its own SamplingParams plus
//    OpenAI's presence/frequency penalties in a device array, set by set_row; its draws take u from (seed, 0, step),
//    so a sequence's samples depend only on its seed and step, not on the row (slot) it sits in. A 1-row uniform
//    sampler with the same parameters therefore gives the same ids as any row of a per-row one.
// Per-row mode, per id i of a row, in this order:
//   a. the raw logit l: NaN → −inf, +inf → FLT_MAX (as in both modes);
//   b. presence/frequency (only when one of the row's two penalties is nonzero; n = times i was sampled in this
//      row since set_row, greedy samples included): if n ≥ 1, l ← l − (presence + frequency·float(n)), in f32,
//      rounded as written (no fused multiply-add), the expression the CPU server applies before its Sampler;
//   c. the repetition penalty over the row's seen ids (prompt + generated);
//   then the pipeline above. A result of b or c that overflows (or −inf − (−inf)) is mapped again as in a (in
//   uniform mode too, for c).
// With finite logits and no overflow this is bit for bit what the CPU server computes when its compiler does not
// contract presence + frequency·n into an FMA (exactly the same whenever frequency·n is exact, e.g. dyadic
// penalties).
// An active mask (set_active) makes sample() skip rows entirely in per-row mode.
//
// This header stays C++17 (the .cu includes it); the std::span overloads exist for C++20 callers.
#include <cstddef>
#include <cstdint>
#include <vector>

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

// One row's parameters in per-row mode (the device array GpuSampler::per_row keeps, one entry per row).
struct SamplerRowParams {
  float temperature = 0.0f, top_p = 1.0f, min_p = 0.0f, penalty = 1.0f;
  float presence = 0.0f, frequency = 0.0f;  // OpenAI's additive penalties over generated ids
  int64_t top_k = 0;
  uint64_t seed = 0;
};

struct SamplerKernelArgs {
  // Uniform mode's parameters (unused when `params` is set).
  float temperature = 1.0f, top_p = 1.0f, min_p = 0.0f, penalty = 1.0f;
  int64_t top_k = 0;
  uint64_t seed = 0;
  int64_t vocab = 0, n_logits = 0, batch = 0;
  int64_t words = 0;        // 32-bit words per row of the seen bitmap: ⌈n_logits / 32⌉
  int mass_shift = 0;       // s: fixed-point weights are exp(z)·2^s
  const float* logits = nullptr;  // (batch, n_logits), or (n_rows, n_logits) with `rows`
  int32_t* ids = nullptr;         // (batch)
  uint32_t* seen = nullptr;       // (batch, words)
  uint64_t* counters = nullptr;   // (batch)
  // Per-row mode (all null in uniform mode):
  const SamplerRowParams* params = nullptr;  // (batch) each row's parameters; draws use (seed, 0, step)
  int32_t* counts = nullptr;                 // (batch, n_logits) times each id was sampled since set_row
  const uint8_t* active = nullptr;           // (batch) rows with 0 are skipped; null: every row samples
  // sample_rows (either mode): block b samples row rows[b] from logits + b·n_logits; null: block b is row b.
  const int64_t* rows = nullptr;  // (n_rows)
  int64_t n_rows = 0;
};

// One id per row (per entry of a.rows when set) into a.ids; marks it seen, counts it (a.counts) and advances the
// row's counter after a non-greedy draw. Rows with a.active[row] == 0 are left untouched.
void sampler_sample(cudaStream_t stream, const SamplerKernelArgs& a);
// Row `row`: clears its seen bits, sets those of prompt[0, count) (device ids in [0, n_logits)), counter ← 0,
// and its counts (a.counts, per-row mode) ← 0.
void sampler_start_row(cudaStream_t stream, const SamplerKernelArgs& a, int64_t row, const int64_t* prompt,
                       int64_t count);

}  // namespace detail

class GpuSampler {
 public:
  // Uniform mode. Validates `params` (SamplingParams::validate). n_logits ≥ vocab_size (the padded row length),
  // batch ≥ 1. Every row starts empty: nothing seen, random stream (seed, row) at step 0. Synchronises the device.
  GpuSampler(const SamplingParams& params, int64_t vocab_size, int64_t n_logits, int64_t batch);

  // Per-row mode: every row has its own parameters (set_row). Rows start greedy (temperature 0), without
  // penalties, nothing seen, seed 0, all active. Allocates the per-row state, including the (batch, n_logits)
  // int32 counts of generated ids (4·batch·n_logits bytes). Synchronises the device.
  static GpuSampler per_row(int64_t vocab_size, int64_t n_logits, int64_t batch);

  // logits (batch, n_logits) f32 on the device → ids (batch) int32 on the device, on ctx.stream(). Allocates
  // nothing, reads nothing back: graph-capturable in both modes (a captured graph reads the per-row parameters
  // and the active mask from the device at every replay, so set_row/set_active between replays take effect).
  // Per-row mode: a row whose active entry is 0 is left untouched (no id written, no state change).
  void sample(const Context& ctx, const float* logits, int32_t* ids) const;

  // Samples only rows rows[0, count) (host array of distinct rows in [0, batch)): block b reads its logits at
  // logits + b·n_logits (a compact device array of `count` rows), uses and advances the state of row rows[b] and
  // writes ids[rows[b]] (ids: (batch) on the device; no other entry is written). Either mode; ignores the active
  // mask. Copies `rows` to a device buffer through ctx.stream() (synchronises that stream when the buffer grows).
  // Not graph-capturable.
  void sample_rows(const Context& ctx, const float* logits, const int64_t* rows, int64_t count, int32_t* ids) const;

  // Starts a new sequence in `row`: its seen set becomes the prompt ids (host memory, each in [0, n_logits);
  // repeated ids are fine) and its random stream restarts at step 0. Copies the prompt to the device through
  // ctx.stream() (may synchronise that stream when its scratch grows). Not graph-capturable. In per-row mode it
  // restarts the row with the parameters it holds (its counts too), as set_row with those parameters would.
  void start_row(const Context& ctx, int64_t row, const int64_t* prompt, int64_t count) const;
#if __cplusplus >= 202002L
  void start_row(const Context& ctx, int64_t row, std::span<const int64_t> prompt) const {
    start_row(ctx, row, prompt.data(), int64_t(prompt.size()));
  }
#endif

  // Per-row mode only (throws mamba3::Error otherwise): starts a sequence in `row` with parameters `p`
  // (validated) and OpenAI's presence/frequency penalties (finite): uploads them, seen ← the prompt's ids,
  // counts ← 0, random stream (p.seed, 0) at step 0. Asynchronous on ctx.stream(): the parameters are copied from
  // a host array the sampler keeps (one entry per row, never freed while it lives; pageable, so CUDA stages the
  // entry before cudaMemcpyAsync returns and back-to-back calls for one row are safe). Not thread-safe: do not
  // call set_row for the same row from two threads at once. Not graph-capturable.
  void set_row(const Context& ctx, int64_t row, const SamplingParams& p, float presence_penalty,
               float frequency_penalty, const int64_t* prompt, int64_t count);
#if __cplusplus >= 202002L
  void set_row(const Context& ctx, int64_t row, const SamplingParams& p, float presence_penalty,
               float frequency_penalty, std::span<const int64_t> prompt) {
    set_row(ctx, row, p, presence_penalty, frequency_penalty, prompt.data(), int64_t(prompt.size()));
  }
#endif

  // Per-row mode only: sample() skips the rows whose entry of `active` (host, batch entries) is 0 from now on
  // (in stream order). Copied asynchronously on ctx.stream() from a host copy the sampler keeps. Not
  // graph-capturable (but a captured sample() honours later calls).
  void set_active(const Context& ctx, const uint8_t* active);

  bool per_row_mode() const { return args_.params != nullptr; }
  int64_t vocab_size() const { return args_.vocab; }
  int64_t n_logits() const { return args_.n_logits; }
  int64_t batch() const { return args_.batch; }

 private:
  // Uploads the prompt (checked) and launches the row's reset: seen, counter, counts.
  void restart_row(const Context& ctx, int64_t row, const int64_t* prompt, int64_t count) const;

  detail::SamplerKernelArgs args_;  // parameters and device state pointers; logits and ids set per call
  DeviceBuffer seen_, counters_;
  DeviceBuffer row_params_, counts_, active_;           // per-row mode only
  std::vector<detail::SamplerRowParams> host_params_;  // per-row mode: set_row's staging, one entry per row
  std::vector<uint8_t> host_active_;                   // per-row mode: set_active's staging
  mutable DeviceBuffer prompt_;  // start_row's staging buffer, grown on demand
  mutable DeviceBuffer rows_;    // sample_rows' staging buffer, grown on demand
};

}  // namespace mamba3::cuda
