#pragma once
// Next-token sampling: logits (V_padded,) -> one id in [0, vocab_size).
//
// Pipeline, in this order (spec §10.3–10.4, with the deviations named below):
//   1. repetition penalty (official rule, §10.3): for every distinct id in `history`,
//      logit < 0 ? logit·penalty : logit/penalty (applied once per id however often it occurs);
//   2. greedy short-cut when temperature == 0 or top_k == 1: argmax, lowest id on ties (no random draw);
//   3. temperature: z_i = (logit_i − max_j logit_j) / temperature (the shift changes nothing mathematically and
//      keeps tiny temperatures from overflowing);
//   4. top-k (top_k > 0): keep the k largest, ties broken towards the lower id;
//   5. top-p (top_p < 1): keep the smallest top set (ordered by z descending, then id ascending) whose probability
//      mass is >= top_p; the top token is always kept. Mass is computed in float64;
//   6. min-p (min_p > 0), the STANDARD rule: drop tokens whose probability p_i < min_p · max_j p_j (over the
//      survivors of 4–5). This is NOT the official quirk of spec §10.4/§14 #11 (threshold against the logit of
//      id 0, only when 0 < c < 1, only without top-k); that rule is not offered;
//   7. renormalise over the survivors and draw.
// Unlike the official `sample`, the filters compose: top-k, top-p and min-p may all be active at once, and the
// defaults (temperature 1, top_k 0, top_p 1, min_p 0) mean plain softmax sampling, not greedy.
// Padding ids (vocab_size <= id < n_logits) are never returned (spec §14 #12).
//
// The draw, exactly (so one seed gives one sequence on every platform): the generator is std::mt19937_64 seeded
// with SamplingParams::seed (its output is fixed by the C++ standard). Each non-greedy sample() takes exactly one
// 64-bit output x and forms u = (x >> 11) · 2⁻⁵³ ∈ [0, 1). The survivors are walked in a fixed order — ids
// ascending when neither top-k nor top-p is active, otherwise z descending then id ascending — accumulating their
// unnormalised float64 weights w_i = exp(z_i); the first survivor whose running sum exceeds u·Σw is returned.
// Greedy samples consume no random output.
//
// Cost: O(V) per call without top-k/top-p; O(V + k log k) with top-k (nth_element then a sort of the k kept);
// top-p without top-k sorts only the tokens with p >= (1 − top_p)/V (which always contain the nucleus), falling
// back to the rest only if rounding demands it. sample() allocates nothing: its scratch is sized once per Sampler.
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace mamba3 {

struct SamplingParams {
  float temperature = 1.0f;         // 0 => greedy (argmax)
  int64_t top_k = 0;                // 0 => off; 1 => greedy
  float top_p = 1.0f;               // nucleus, in (0, 1]; 1 => off
  float min_p = 0.0f;               // standard min-p, in [0, 1); 0 => off
  float repetition_penalty = 1.0f;  // > 0; 1 => off
  uint64_t seed = 0;
  // Throws mamba3::Error naming the field and its value for NaN, negative or out-of-range values.
  void validate() const;
};

class Sampler {
 public:
  // vocab_size: the real vocabulary; ids >= vocab_size (padding rows of the lm_head) are never returned.
  Sampler(const SamplingParams& params, int64_t vocab_size);

  // logits: n_logits >= vocab_size floats (the padded vocabulary); history: prompt + generated ids, for the
  // repetition penalty (each must lie in [0, n_logits)). NaN or +inf logits, or no finite logit among the real
  // vocabulary, throw mamba3::Error; −inf marks a banned token.
  int64_t sample(const float* logits, int64_t n_logits, std::span<const int64_t> history);

  // The distribution sample() draws from, (vocab_size,) summing to 1 (one-hot for greedy): for tests and logprobs.
  // Does not touch the random generator; allocates its own scratch.
  std::vector<float> distribution(const float* logits, int64_t n_logits, std::span<const int64_t> history) const;

  // Restarts the random sequence as if the Sampler had been built with this seed.
  void reseed(uint64_t seed);

  const SamplingParams& params() const { return params_; }
  int64_t vocab_size() const { return vocab_size_; }

 private:
  struct Scratch {
    std::vector<float> z;         // (V,) penalised, shifted, temperature-scaled logits
    std::vector<int32_t> order;   // (V,) candidate ids; the survivors are order[0, count)
    std::vector<double> weight;   // (V,) weight[j] = exp(z[order[j]]) for the survivors
  };
  struct Filtered {
    int64_t greedy = -1;  // >= 0: the greedy answer (no candidates filled)
    int64_t count = 0;    // survivors order[0, count)
    double total = 0.0;   // Σ weight[0, count)
  };
  Scratch make_scratch() const;
  Filtered filter(const float* logits, int64_t n_logits, std::span<const int64_t> history, Scratch& s) const;

  SamplingParams params_;
  int64_t vocab_size_;
  std::mt19937_64 rng_;
  Scratch scratch_;
};

}  // namespace mamba3
