#include "infer/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace mamba3 {

void SamplingParams::validate() const {
  // Written as !(in range) so that NaN, which fails every comparison, is rejected too.
  MAMBA3_CHECK(std::isfinite(temperature) && temperature >= 0.0f,
               "SamplingParams: temperature must be finite and >= 0 (0 = greedy), got {}", temperature);
  MAMBA3_CHECK(top_k >= 0, "SamplingParams: top_k must be >= 0 (0 = off, 1 = greedy), got {}", top_k);
  MAMBA3_CHECK(top_p > 0.0f && top_p <= 1.0f, "SamplingParams: top_p must lie in (0, 1] (1 = off), got {}", top_p);
  MAMBA3_CHECK(min_p >= 0.0f && min_p < 1.0f, "SamplingParams: min_p must lie in [0, 1) (0 = off), got {}", min_p);
  MAMBA3_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f,
               "SamplingParams: repetition_penalty must be finite and > 0 (1 = off), got {}", repetition_penalty);
}

Sampler::Sampler(const SamplingParams& params, int64_t vocab_size)
    : params_(params), vocab_size_(vocab_size), rng_(params.seed) {
  params_.validate();
  MAMBA3_CHECK(vocab_size > 0 && vocab_size <= std::numeric_limits<int32_t>::max(),
               "Sampler: vocab_size must lie in [1, 2^31), got {}", vocab_size);
  scratch_ = make_scratch();
}

void Sampler::reseed(uint64_t seed) {
  params_.seed = seed;
  rng_.seed(seed);
}

Sampler::Scratch Sampler::make_scratch() const {
  Scratch s;
  s.z.resize(static_cast<size_t>(vocab_size_));
  s.order.resize(static_cast<size_t>(vocab_size_));
  s.weight.resize(static_cast<size_t>(vocab_size_));
  return s;
}

Sampler::Filtered Sampler::filter(const float* logits, int64_t n_logits, std::span<const int64_t> history,
                                  Scratch& s) const {
  const int64_t V = vocab_size_;
  MAMBA3_CHECK(logits != nullptr, "Sampler: logits pointer is null");
  MAMBA3_CHECK(n_logits >= V, "Sampler: got {} logits for a vocabulary of {} (n_logits must be >= vocab_size)",
               n_logits, V);
  float* z = s.z.data();
  int32_t* order = s.order.data();
  double* w = s.weight.data();

  for (int64_t i = 0; i < V; ++i) {
    const float v = logits[i];
    MAMBA3_CHECK(!std::isnan(v), "Sampler: logit of id {} is NaN", i);
    MAMBA3_CHECK(v != std::numeric_limits<float>::infinity(), "Sampler: logit of id {} is +inf", i);
    z[i] = v;
  }

  // 1. Repetition penalty. Reading the original logit makes repeated ids idempotent (applied once per id, as the
  //    official gather/scatter does). Ids in the padding are valid history but have no effect: never sampled.
  const float pen = params_.repetition_penalty;
  for (const int64_t id : history) {
    MAMBA3_CHECK(id >= 0 && id < n_logits, "Sampler: history holds id {}, outside [0, {})", id, n_logits);
    if (pen != 1.0f && id < V) {
      const float l = logits[id];
      z[id] = l < 0.0f ? l * pen : l / pen;
    }
  }

  int64_t argmax = 0;
  for (int64_t i = 1; i < V; ++i) {
    if (z[i] > z[argmax]) argmax = i;  // strict: the lowest id wins ties
  }
  const float zmax = z[argmax];
  MAMBA3_CHECK(zmax != -std::numeric_limits<float>::infinity(),
               "Sampler: every logit of the {}-token vocabulary is -inf (nothing can be sampled)", V);

  // 2. Greedy short-cut.
  Filtered f;
  if (params_.temperature == 0.0f || params_.top_k == 1) {
    f.greedy = argmax;
    return f;
  }

  // 3. Temperature, on logits shifted so the maximum is exactly 0 (its weight exactly 1).
  const float T = params_.temperature;
  for (int64_t i = 0; i < V; ++i) z[i] = T == 1.0f ? z[i] - zmax : (z[i] - zmax) / T;
  // Strict total order: larger z first, then lower id. Makes every sort below deterministic.
  const auto before = [z](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };

  int64_t n = V;
  bool sorted = false;
  // 4. Top-k, then sort the k kept (their order is the draw order). Small k: one sequential pass with a heap of
  //    the k best so far (order[0] = the worst of them), O(V) comparisons against the heap top in practice.
  //    Large k: nth_element.
  if (params_.top_k > 0 && params_.top_k < V) {
    n = params_.top_k;
    if (n <= V / 16) {
      for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
      std::make_heap(order, order + n, before);
      for (int64_t i = n; i < V; ++i) {
        if (z[i] < z[order[0]]) continue;  // quick reject; ties fall through to `before`
        if (before(static_cast<int32_t>(i), order[0])) {
          std::pop_heap(order, order + n, before);
          order[n - 1] = static_cast<int32_t>(i);
          std::push_heap(order, order + n, before);
        }
      }
    } else {
      for (int64_t i = 0; i < V; ++i) order[i] = static_cast<int32_t>(i);
      std::nth_element(order, order + n, order + V, before);
    }
    std::sort(order, order + n, before);
    sorted = true;
  } else {
    for (int64_t i = 0; i < V; ++i) order[i] = static_cast<int32_t>(i);
  }
  for (int64_t j = 0; j < n; ++j) w[order[j]] = std::exp(static_cast<double>(z[order[j]]));

  // 5. Top-p: the smallest prefix of the sorted candidates whose mass reaches top_p · total.
  if (params_.top_p < 1.0f) {
    double total = 0.0;
    for (int64_t j = 0; j < n; ++j) total += w[order[j]];
    const double goal = static_cast<double>(params_.top_p) * total;
    int64_t head = n;  // candidates [0, head) are sorted
    if (!sorted) {
      // Tokens with p < (1 − top_p)/n hold less than 1 − top_p together, so the rest (a top set: the cut is on z)
      // holds more than top_p and contains the nucleus. Sort only that part.
      const double cut = (1.0 - static_cast<double>(params_.top_p)) / static_cast<double>(n) * total;
      const double zcut = std::log(cut);
      head = std::partition(order, order + n, [z, zcut](int32_t id) { return static_cast<double>(z[id]) >= zcut; }) -
             order;
      std::sort(order, order + head, before);
    }
    double cum = 0.0;
    int64_t kept = -1;
    for (int64_t j = 0; j < n && kept < 0; ++j) {
      if (j == head) std::sort(order + head, order + n, before);  // rounding left the nucleus unfinished
      cum += w[order[j]];
      if (cum >= goal) kept = j + 1;
    }
    if (kept > 0) n = kept;  // kept < 0 only when rounding keeps cum below goal: keep everything
    sorted = true;
  }

  // 6. Min-p, standard rule: p_i < min_p · p_max ⇔ w_i < min_p (the maximum survives every filter, weight 1).
  //    Stable compaction, so the survivors keep their order.
  if (params_.min_p > 0.0f) {
    const double floor = params_.min_p;
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (w[order[j]] >= floor) order[m++] = order[j];
    }
    n = m;
  }

  // 7. The total of the survivors, summed in draw order.
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) total += w[order[j]];
  f.count = n;
  f.total = total;
  return f;
}

int64_t Sampler::sample(const float* logits, int64_t n_logits, std::span<const int64_t> history) {
  const Filtered f = filter(logits, n_logits, history, scratch_);
  if (f.greedy >= 0) return f.greedy;
  const uint64_t x = rng_();
  const double u = static_cast<double>(x >> 11) * 0x1.0p-53;  // [0, 1), every value exact
  const double target = u * f.total;
  const int32_t* order = scratch_.order.data();
  const double* w = scratch_.weight.data();
  double acc = 0.0;
  int64_t last = -1;
  for (int64_t j = 0; j < f.count; ++j) {
    const int32_t id = order[j];
    if (w[id] <= 0.0) continue;  // underflowed or banned: probability 0, never returned
    acc += w[id];
    last = id;
    if (acc > target) return id;
  }
  return last;  // only when rounding leaves acc a hair below target: the last token with weight
}

std::vector<float> Sampler::distribution(const float* logits, int64_t n_logits,
                                         std::span<const int64_t> history) const {
  Scratch s = make_scratch();
  const Filtered f = filter(logits, n_logits, history, s);
  std::vector<float> p(static_cast<size_t>(vocab_size_), 0.0f);
  if (f.greedy >= 0) {
    p[static_cast<size_t>(f.greedy)] = 1.0f;
    return p;
  }
  for (int64_t j = 0; j < f.count; ++j) {
    const int32_t id = s.order[static_cast<size_t>(j)];
    p[static_cast<size_t>(id)] = static_cast<float>(s.weight[static_cast<size_t>(id)] / f.total);
  }
  return p;
}

}  // namespace mamba3
