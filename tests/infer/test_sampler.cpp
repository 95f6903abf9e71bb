// The token sampler: distribution() against its definition (hand-computed and an independent float64 reference),
// sample() against distribution() and against the documented draw, determinism, padding, and bad inputs.
// This file replaces the global operator new/delete (malloc/free underneath); GCC's mismatch warning does not
// know that the pair is replaced together.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <new>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "infer/sampler.h"
#include "support/error_of.h"

// Counts every heap allocation of the process, to check that sample() makes none. The whole unaligned family is
// replaced (plain, array, nothrow), so that no pair mixes ours with the library's or a sanitizer's. Not inlined,
// so that the compiler does not pair our malloc/free with its callers' new/delete (-Wmismatched-new-delete).
namespace {
std::atomic<long> g_allocations{0};
void* counted_malloc(std::size_t n) noexcept {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n == 0 ? 1 : n);
}
}  // namespace
#define MAMBA3_NOINLINE __attribute__((noinline))
MAMBA3_NOINLINE void* operator new(std::size_t n) {
  if (void* p = counted_malloc(n)) return p;
  throw std::bad_alloc();
}
MAMBA3_NOINLINE void* operator new[](std::size_t n) {
  if (void* p = counted_malloc(n)) return p;
  throw std::bad_alloc();
}
MAMBA3_NOINLINE void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
MAMBA3_NOINLINE void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_malloc(n); }
MAMBA3_NOINLINE void operator delete(void* p) noexcept { std::free(p); }
MAMBA3_NOINLINE void operator delete[](void* p) noexcept { std::free(p); }
MAMBA3_NOINLINE void operator delete(void* p, std::size_t) noexcept { std::free(p); }
MAMBA3_NOINLINE void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
MAMBA3_NOINLINE void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
MAMBA3_NOINLINE void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#undef MAMBA3_NOINLINE

namespace mamba3::test {
namespace {

using ::testing::HasSubstr;
using Logits = std::vector<float>;
using History = std::vector<int64_t>;

std::vector<float> dist(const SamplingParams& p, const Logits& logits, const History& history = {},
                        int64_t vocab = -1) {
  Sampler s(p, vocab < 0 ? static_cast<int64_t>(logits.size()) : vocab);
  return s.distribution(logits.data(), static_cast<int64_t>(logits.size()), history);
}

// softmax(l / T) over the ids in `keep` (all ids if empty), zero elsewhere, in float64.
std::vector<double> softmax(const Logits& l, double T, const std::vector<int64_t>& keep = {}) {
  std::vector<int64_t> ids = keep;
  if (ids.empty()) {
    ids.resize(l.size());
    std::iota(ids.begin(), ids.end(), 0);
  }
  double mx = -INFINITY;
  for (int64_t i : ids) mx = std::max(mx, static_cast<double>(l[i]));
  std::vector<double> p(l.size(), 0.0);
  double total = 0.0;
  for (int64_t i : ids) total += p[i] = std::exp((l[i] - mx) / T);
  for (double& x : p) x /= total;
  return p;
}

void expect_dist_near(const std::vector<float>& got, const std::vector<double>& want, double tol = 1e-6) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], tol) << "id " << i;
    if (want[i] == 0.0) {
      EXPECT_EQ(got[i], 0.0f) << "id " << i << " must be filtered out";
    }
  }
}

std::vector<int64_t> support(const std::vector<float>& p) {
  std::vector<int64_t> ids;
  for (size_t i = 0; i < p.size(); ++i)
    if (p[i] > 0.0f) ids.push_back(static_cast<int64_t>(i));
  return ids;
}


// An independent float64 reference of the documented pipeline: full stable sort, plain loops.
std::vector<double> reference(const Logits& logits, int64_t V, const SamplingParams& p, const History& history) {
  std::vector<double> z(logits.begin(), logits.begin() + V);
  for (int64_t id : history) {
    if (id >= V) continue;
    const double l = logits[id];
    z[id] = l < 0 ? l * p.repetition_penalty : l / p.repetition_penalty;
  }
  std::vector<double> out(V, 0.0);
  if (p.temperature == 0.0f || p.top_k == 1) {
    out[std::max_element(z.begin(), z.end()) - z.begin()] = 1.0;  // first maximum = lowest id
    return out;
  }
  std::vector<int64_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
  if (p.top_k > 0 && p.top_k < V) ids.resize(p.top_k);
  std::vector<double> w(V, 0.0);
  for (int64_t i : ids) w[i] = std::exp((z[i] - z[ids[0]]) / p.temperature);
  if (p.top_p < 1.0f) {
    double total = 0.0, cum = 0.0;
    for (int64_t i : ids) total += w[i];
    size_t n = 0;
    while (n < ids.size() && cum < p.top_p * total) cum += w[ids[n++]];
    ids.resize(n);
  }
  double pmax = 0.0;
  for (int64_t i : ids) pmax = std::max(pmax, w[i]);
  std::vector<int64_t> kept;
  for (int64_t i : ids)
    if (w[i] >= p.min_p * pmax) kept.push_back(i);
  double total = 0.0;
  for (int64_t i : kept) total += w[i];
  for (int64_t i : kept) out[i] = w[i] / total;
  return out;
}

TEST(Sampler, SoftmaxWithTemperature) {
  const Logits l = {1.0f, 2.0f, 0.5f, -1.0f, 3.25f};
  for (float T : {1.0f, 0.7f, 2.5f, 0.05f}) {
    SamplingParams p;
    p.temperature = T;
    SCOPED_TRACE(T);
    expect_dist_near(dist(p, l), softmax(l, T));
  }
  // A hand-computed case: logits {0, ln 3} at T = 1 give {1/4, 3/4}; at T = 0.5 they give {1/10, 9/10}.
  const Logits two = {0.0f, std::log(3.0f)};
  SamplingParams p;
  auto d = dist(p, two);
  EXPECT_NEAR(d[0], 0.25, 1e-6);
  EXPECT_NEAR(d[1], 0.75, 1e-6);
  p.temperature = 0.5f;
  d = dist(p, two);
  EXPECT_NEAR(d[0], 0.1, 1e-6);
  EXPECT_NEAR(d[1], 0.9, 1e-6);
}

TEST(Sampler, TopKKeepsExactlyK) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  Logits l(50);
  for (float& x : l) x = normal(rng);
  std::vector<int64_t> by_value(l.size());
  std::iota(by_value.begin(), by_value.end(), 0);
  std::sort(by_value.begin(), by_value.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
  for (int64_t k : {2, 5, 17, 49}) {
    SamplingParams p;
    p.top_k = k;
    p.temperature = 0.8f;
    SCOPED_TRACE(k);
    const auto d = dist(p, l);
    std::vector<int64_t> top(by_value.begin(), by_value.begin() + k);
    std::sort(top.begin(), top.end());
    EXPECT_EQ(support(d), top);
    expect_dist_near(d, softmax(l, 0.8, top));
  }
  for (int64_t k : {50, 51, 1000}) {  // k >= V: no filtering
    SamplingParams p;
    p.top_k = k;
    expect_dist_near(dist(p, l), softmax(l, 1.0));
  }
}

TEST(Sampler, TopKTiesGoToLowerIds) {
  SamplingParams p;
  p.top_k = 3;
  expect_dist_near(dist(p, Logits(6, 0.5f)), {1 / 3.0, 1 / 3.0, 1 / 3.0, 0, 0, 0});
  p.top_k = 2;
  const Logits l = {1.0f, 2.0f, 0.0f, 2.0f, 2.0f};
  expect_dist_near(dist(p, l), {0, 0.5, 0, 0.5, 0});
}

TEST(Sampler, TopPBoundaryOnExactMasses) {
  // Four equal logits: masses 1/4 each, cumulative 1/4, 1/2, 3/4, 1 — all exact in binary.
  const Logits l(4, 0.0f);
  auto kept_with = [&](float top_p) {
    SamplingParams p;
    p.top_p = top_p;
    return support(dist(p, l));
  };
  using V = std::vector<int64_t>;
  EXPECT_EQ(kept_with(0.5f), (V{0, 1}));                          // cumulative mass equals p exactly: stop there
  EXPECT_EQ(kept_with(std::nextafter(0.5f, 1.0f)), (V{0, 1, 2}));  // just above: one more
  EXPECT_EQ(kept_with(std::nextafter(0.5f, 0.0f)), (V{0, 1}));     // just below: the same two
  EXPECT_EQ(kept_with(0.25f), (V{0}));
  EXPECT_EQ(kept_with(std::nextafter(0.25f, 0.0f)), (V{0}));
  EXPECT_EQ(kept_with(std::nextafter(0.25f, 1.0f)), (V{0, 1}));
  EXPECT_EQ(kept_with(0.75f), (V{0, 1, 2}));
  EXPECT_EQ(kept_with(1e-6f), (V{0}));  // the top token is always kept
  EXPECT_EQ(kept_with(1.0f), (V{0, 1, 2, 3}));
  SamplingParams p;
  p.top_p = 0.5f;
  expect_dist_near(dist(p, l), {0.5, 0.5, 0, 0});
}

TEST(Sampler, TopPBoundaryOnComputedMasses) {
  const Logits l = {3.0f, 1.0f, 2.0f, 0.0f, -1.0f};  // descending: ids 0, 2, 1, 3, 4
  const std::vector<int64_t> order = {0, 2, 1, 3, 4};
  const auto sm = softmax(l, 1.0);
  double cum = 0.0;
  for (size_t n = 1; n < order.size(); ++n) {
    cum += sm[order[n - 1]];  // mass of the top n tokens
    SCOPED_TRACE(n);
    std::vector<int64_t> top(order.begin(), order.begin() + n), more(order.begin(), order.begin() + n + 1);
    std::sort(top.begin(), top.end());
    std::sort(more.begin(), more.end());
    SamplingParams p;
    p.top_p = std::nextafter(static_cast<float>(cum), 0.0f);  // just below the mass of the top n
    auto d = dist(p, l);
    EXPECT_EQ(support(d), top);
    expect_dist_near(d, softmax(l, 1.0, top));
    p.top_p = std::nextafter(static_cast<float>(cum), 1.0f);  // just above: needs one token more
    d = dist(p, l);
    EXPECT_EQ(support(d), more);
    expect_dist_near(d, softmax(l, 1.0, more));
  }
}

TEST(Sampler, TopPAppliesToTheTopKSubsetAfterTemperature) {
  // Six equal logits, top_k = 4 renormalises to 1/4 each, so top_p = 0.5 keeps 2 (on the full vocabulary it
  // would need 3 of the 1/6 masses).
  SamplingParams p;
  p.top_k = 4;
  p.top_p = 0.5f;
  expect_dist_near(dist(p, Logits(6, 1.0f)), {0.5, 0.5, 0, 0, 0, 0});
  // Temperature before top-p: {0, ln 3} has masses {1/4, 3/4}; top_p = 0.8 keeps both at T = 1 but only id 1
  // at T = 0.5 (masses {1/10, 9/10}).
  const Logits two = {0.0f, std::log(3.0f)};
  p = SamplingParams{};
  p.top_p = 0.8f;
  EXPECT_EQ(support(dist(p, two)), (std::vector<int64_t>{0, 1}));
  p.temperature = 0.5f;
  EXPECT_EQ(support(dist(p, two)), (std::vector<int64_t>{1}));
}

TEST(Sampler, MinPStandardRule) {
  // p_i / p_max = exp(l_i − l_max): 1, e^-1 ≈ 0.368, e^-2 ≈ 0.135, e^-3 ≈ 0.050.
  const Logits l = {1.0f, 2.0f, 0.0f, -1.0f};
  auto kept_with = [&](float min_p, float T = 1.0f) {
    SamplingParams p;
    p.min_p = min_p;
    p.temperature = T;
    return support(dist(p, l));
  };
  using V = std::vector<int64_t>;
  EXPECT_EQ(kept_with(0.3f), (V{0, 1}));
  EXPECT_EQ(kept_with(0.1f), (V{0, 1, 2}));
  EXPECT_EQ(kept_with(0.01f), (V{0, 1, 2, 3}));
  EXPECT_EQ(kept_with(0.9f), (V{1}));
  const float r1 = static_cast<float>(std::exp(-1.0));
  EXPECT_EQ(kept_with(std::nextafter(r1, 0.0f)), (V{0, 1}));  // threshold just below p_0: kept
  EXPECT_EQ(kept_with(std::nextafter(r1, 1.0f)), (V{1}));     // just above: dropped
  // After temperature: at T = 2 the ratios are e^-0.5 ≈ 0.607, e^-1, e^-1.5 ≈ 0.223.
  EXPECT_EQ(kept_with(0.3f, 2.0f), (V{0, 1, 2}));
  EXPECT_EQ(kept_with(0.5f, 2.0f), (V{0, 1}));
  SamplingParams p;
  p.min_p = 0.3f;
  expect_dist_near(dist(p, l), softmax(l, 1.0, {0, 1}));
  // Not the official quirk (§10.4): that rule would use c = min_p · logit[0] = 0.15 and drop logits below it
  // (ids 2 and 3 here, the same), so take a case where they differ: logit[0] = 0.5, min_p = 0.5 → official
  // c = 0.25 keeps {0, 1} only; the standard rule keeps every id with l >= 2 + ln 0.5 ≈ 1.31.
  const Logits q = {0.5f, 2.0f, 1.5f, 0.3f};
  p.min_p = 0.5f;
  EXPECT_EQ(support(dist(p, q)), (V{1, 2}));
}

TEST(Sampler, RepetitionPenaltyOfficialRule) {
  const Logits l = {2.0f, -2.0f, 1.0f, 0.0f, 3.0f};
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  // Ids 0 (positive: /2), 1 (negative: ×2, listed twice but penalised once) and 3 (zero stays zero).
  const History h = {0, 1, 1, 3, 1};
  const Logits penalised = {1.0f, -4.0f, 1.0f, 0.0f, 3.0f};
  expect_dist_near(dist(p, l, h), softmax(penalised, 1.0));
  // A penalty below 1 favours repeats: positive ×2, negative /2.
  p.repetition_penalty = 0.5f;
  expect_dist_near(dist(p, l, {0, 1}), softmax({4.0f, -1.0f, 1.0f, 0.0f, 3.0f}, 1.0));
  // The penalty acts before the greedy short-cut: 3 / 1.5 = 2 < 2.9.
  p = SamplingParams{};
  p.temperature = 0.0f;
  p.repetition_penalty = 1.5f;
  Sampler s(p, 2);
  const Logits g = {3.0f, 2.9f};
  EXPECT_EQ(s.sample(g.data(), 2, History{}), 0);
  EXPECT_EQ(s.sample(g.data(), 2, History{0}), 1);
  // Negative logits: −1 × 1.5 = −1.5 < −1.2.
  const Logits n = {-1.0f, -1.2f};
  EXPECT_EQ(s.sample(n.data(), 2, History{0, 0}), 1);
  // Penalty 1 changes nothing even with history.
  expect_dist_near(dist(SamplingParams{}, l, h), softmax(l, 1.0));
}

TEST(Sampler, GreedyIsArgmaxLowestIdOnTies) {
  const Logits l = {0.1f, 5.0f, -2.0f, 5.0f, 4.9f};
  SamplingParams t0;
  t0.temperature = 0.0f;
  t0.top_p = 0.1f;  // ignored by greedy
  t0.min_p = 0.9f;  // ignored by greedy
  SamplingParams k1;
  k1.top_k = 1;
  k1.temperature = 3.0f;
  for (const SamplingParams& p : {t0, k1}) {
    Sampler s(p, 5);
    for (int i = 0; i < 20; ++i) EXPECT_EQ(s.sample(l.data(), 5, History{}), 1);
    expect_dist_near(s.distribution(l.data(), 5, History{}), {0, 1, 0, 0, 0});
  }
  Sampler s(t0, 3);
  const Logits neg = {-7.0f, -3.0f, -INFINITY};
  EXPECT_EQ(s.sample(neg.data(), 3, History{}), 1);
  const Logits all_equal(3, -1.0f);
  EXPECT_EQ(s.sample(all_equal.data(), 3, History{}), 0);
}

TEST(Sampler, PaddedIdsAreNeverSampled) {
  const int64_t V = 5;
  Logits l = {0.0f, 1.0f, 0.5f, -1.0f, 0.2f, 100.0f, 200.0f, 300.0f};  // padding ids 5..7 hold the largest logits
  for (int64_t top_k : {0, 1, 3}) {
    SamplingParams p;
    p.top_k = top_k;
    p.top_p = 0.9f;
    p.seed = 3;
    Sampler s(p, V);
    const auto d = s.distribution(l.data(), 8, History{});
    EXPECT_EQ(d.size(), static_cast<size_t>(V));
    for (int i = 0; i < 2000; ++i) {
      const int64_t id = s.sample(l.data(), 8, History{6, 7, 1});  // padding ids in history are harmless
      ASSERT_GE(id, 0);
      ASSERT_LT(id, V);
    }
  }
  SamplingParams g;
  g.temperature = 0.0f;
  Sampler s(g, V);
  EXPECT_EQ(s.sample(l.data(), 8, History{}), 1);
  // Even when the padding is NaN it is never read.
  l[6] = NAN;
  EXPECT_EQ(s.sample(l.data(), 8, History{}), 1);
}

TEST(Sampler, BannedTokensNeverSampled) {
  const Logits l = {-INFINITY, 0.0f, -INFINITY, 0.0f};
  SamplingParams p;
  p.seed = 11;
  Sampler s(p, 4);
  expect_dist_near(s.distribution(l.data(), 4, History{}), {0, 0.5, 0, 0.5});
  for (int i = 0; i < 5000; ++i) {
    const int64_t id = s.sample(l.data(), 4, History{});
    ASSERT_TRUE(id == 1 || id == 3) << id;
  }
}

TEST(Sampler, MatchesIndependentReferenceOnRandomCases) {
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int> pick(0, 3);
  int checked = 0;
  for (int c = 0; c < 400; ++c) {
    const int64_t V = std::uniform_int_distribution<int64_t>(1, 300)(rng);
    const int64_t n_logits = V + pick(rng);
    Logits l(n_logits);
    for (float& x : l) x = std::round(normal(rng) * 4.0f) / 4.0f;  // coarse values make ties common
    History h;
    for (int i = 0; i < pick(rng) * 5; ++i) h.push_back(std::uniform_int_distribution<int64_t>(0, n_logits - 1)(rng));
    SamplingParams p;
    const float temps[] = {1.0f, 0.3f, 1.7f, 0.0f};
    p.temperature = temps[pick(rng)];
    const int64_t ks[] = {0, 0, 1, 7};
    p.top_k = ks[pick(rng)];
    const float tps[] = {1.0f, 0.9f, 0.5f, 0.97f};
    p.top_p = tps[pick(rng)];
    const float mps[] = {0.0f, 0.0f, 0.05f, 0.3f};
    p.min_p = mps[pick(rng)];
    const float pens[] = {1.0f, 1.3f, 0.8f, 2.0f};
    p.repetition_penalty = pens[pick(rng)];
    SCOPED_TRACE(::testing::Message() << "case " << c << " V " << V << " T " << p.temperature << " k " << p.top_k
                                      << " top_p " << p.top_p << " min_p " << p.min_p);
    Sampler s(p, V);
    expect_dist_near(s.distribution(l.data(), n_logits, h), reference(l, V, p, h), 2e-6);
    ++checked;
  }
  EXPECT_EQ(checked, 400);
}

TEST(Sampler, LargeVocabularyTopPMatchesReference) {
  // Exercises the partial sort of top-p (only tokens with p >= (1 − top_p)/V are sorted) on peaked, flat and
  // tied distributions of a realistic vocabulary size.
  std::mt19937 rng(5);
  const int64_t V = 50000;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float scale : {0.0f, 0.5f, 3.0f, 8.0f}) {
    Logits l(V);
    for (float& x : l) x = std::round(normal(rng) * scale * 8.0f) / 8.0f;
    for (float top_p : {0.3f, 0.9f, 0.999f}) {
      SamplingParams p;
      p.top_p = top_p;
      SCOPED_TRACE(::testing::Message() << "scale " << scale << " top_p " << top_p);
      expect_dist_near(dist(p, l), reference(l, V, p, {}), 1e-7);
    }
  }
}

// Empirical frequencies of 200k draws against distribution().
void expect_frequencies_match(const SamplingParams& p, const Logits& l, int64_t V, const History& h) {
  Sampler s(p, V);
  const auto d = s.distribution(l.data(), static_cast<int64_t>(l.size()), h);
  const int draws = 200000;
  std::vector<int> count(V, 0);
  for (int i = 0; i < draws; ++i) ++count[s.sample(l.data(), static_cast<int64_t>(l.size()), h)];
  double max_diff = 0.0, chi2 = 0.0;
  int dof = -1;
  for (int64_t i = 0; i < V; ++i) {
    const double f = static_cast<double>(count[i]) / draws;
    max_diff = std::max(max_diff, std::abs(f - d[i]));
    if (d[i] == 0.0f) {
      EXPECT_EQ(count[i], 0) << "id " << i << " has probability 0 but was drawn";
    } else {
      const double e = d[i] * draws;
      chi2 += (count[i] - e) * (count[i] - e) / e;
      ++dof;
    }
  }
  EXPECT_LT(max_diff, 0.005);
  // With at most 40 degrees of freedom, chi² beyond dof + 6·sqrt(2·dof) + 10 is astronomically unlikely.
  if (dof > 0) {
    EXPECT_LT(chi2, dof + 6.0 * std::sqrt(2.0 * dof) + 10.0) << "dof " << dof;
  }
}

TEST(Sampler, EmpiricalFrequenciesMatchDistribution) {
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  Logits l(40);
  for (float& x : l) x = normal(rng);
  {
    SCOPED_TRACE("plain softmax");
    expect_frequencies_match(SamplingParams{}, l, 40, {});
  }
  {
    SCOPED_TRACE("every filter");
    SamplingParams p;
    p.temperature = 0.8f;
    p.top_k = 25;
    p.top_p = 0.9f;
    p.min_p = 0.02f;
    p.repetition_penalty = 1.3f;
    p.seed = 1234;
    Logits padded = l;
    padded.insert(padded.end(), {50.0f, 60.0f});
    expect_frequencies_match(p, padded, 40, {3, 5, 8, 13, 21, 41});
  }
  {
    SCOPED_TRACE("top-p only");
    SamplingParams p;
    p.top_p = 0.7f;
    p.seed = 77;
    expect_frequencies_match(p, l, 40, {});
  }
}

TEST(Sampler, DrawIsTheDocumentedInverseCdf) {
  // sample() = the first survivor (ids ascending here: no top-k/top-p) whose cumulative weight exceeds u·Σw,
  // with u = (x >> 11)·2⁻⁵³ and x the next std::mt19937_64 output.
  const Logits l = {0.3f, -1.0f, 2.0f, 0.0f, 1.1f, -0.4f};
  SamplingParams p;
  p.seed = 42;
  Sampler s(p, 6);
  const auto d = softmax(l, 1.0);
  std::mt19937_64 gen(42);
  for (int i = 0; i < 2000; ++i) {
    const double u = static_cast<double>(gen() >> 11) * 0x1.0p-53;
    int64_t want = 5;
    double cum = 0.0;
    for (int64_t j = 0; j < 6; ++j) {
      cum += d[j];
      if (cum > u) {
        want = j;
        break;
      }
    }
    ASSERT_EQ(s.sample(l.data(), 6, History{}), want) << "draw " << i;
  }
}

TEST(Sampler, SeedsAreReproducible) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Logits l(1000);
  for (float& x : l) x = normal(rng);
  auto run = [&](uint64_t seed, float top_p) {
    SamplingParams p;
    p.seed = seed;
    p.top_p = top_p;
    Sampler s(p, 1000);
    std::vector<int64_t> out;
    for (int i = 0; i < 200; ++i) out.push_back(s.sample(l.data(), 1000, History{}));
    return out;
  };
  for (float top_p : {1.0f, 0.8f}) {
    EXPECT_EQ(run(7, top_p), run(7, top_p));
    EXPECT_NE(run(7, top_p), run(8, top_p));
    EXPECT_NE(run(0, top_p), run(1, top_p));
  }
  // reseed() restarts the sequence.
  SamplingParams p;
  p.seed = 7;
  Sampler s(p, 1000);
  std::vector<int64_t> first, again;
  for (int i = 0; i < 200; ++i) first.push_back(s.sample(l.data(), 1000, History{}));
  s.reseed(7);
  for (int i = 0; i < 200; ++i) again.push_back(s.sample(l.data(), 1000, History{}));
  EXPECT_EQ(first, again);
  EXPECT_EQ(first, run(7, 1.0f));
  // distribution() does not advance the generator.
  s.reseed(7);
  std::vector<int64_t> interleaved;
  for (int i = 0; i < 200; ++i) {
    (void)s.distribution(l.data(), 1000, History{});
    interleaved.push_back(s.sample(l.data(), 1000, History{}));
  }
  EXPECT_EQ(interleaved, first);
}

TEST(Sampler, InvalidParametersNameTheField) {
  auto error_with = [](auto edit) {
    SamplingParams p;
    edit(p);
    return error_of([&] { p.validate(); });
  };
  auto ctor_error_with = [](auto edit) {
    SamplingParams p;
    edit(p);
    return error_of([&] { Sampler s(p, 10); });
  };
  struct Case {
    std::function<void(SamplingParams&)> edit;
    const char* field;
    const char* value;
  };
  const std::vector<Case> cases = {
      {[](SamplingParams& p) { p.temperature = -1.0f; }, "temperature", "-1"},
      {[](SamplingParams& p) { p.temperature = NAN; }, "temperature", "nan"},
      {[](SamplingParams& p) { p.temperature = INFINITY; }, "temperature", "inf"},
      {[](SamplingParams& p) { p.top_k = -1; }, "top_k", "-1"},
      {[](SamplingParams& p) { p.top_p = 0.0f; }, "top_p", "0"},
      {[](SamplingParams& p) { p.top_p = 1.5f; }, "top_p", "1.5"},
      {[](SamplingParams& p) { p.top_p = -0.25f; }, "top_p", "-0.25"},
      {[](SamplingParams& p) { p.top_p = NAN; }, "top_p", "nan"},
      {[](SamplingParams& p) { p.min_p = -0.5f; }, "min_p", "-0.5"},
      {[](SamplingParams& p) { p.min_p = 1.0f; }, "min_p", "1"},
      {[](SamplingParams& p) { p.min_p = NAN; }, "min_p", "nan"},
      {[](SamplingParams& p) { p.repetition_penalty = 0.0f; }, "repetition_penalty", "0"},
      {[](SamplingParams& p) { p.repetition_penalty = -1.25f; }, "repetition_penalty", "-1.25"},
      {[](SamplingParams& p) { p.repetition_penalty = NAN; }, "repetition_penalty", "nan"},
      {[](SamplingParams& p) { p.repetition_penalty = INFINITY; }, "repetition_penalty", "inf"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << c.field << " = " << c.value);
    const std::string e = error_with(c.edit);
    EXPECT_THAT(e, HasSubstr(c.field));
    EXPECT_THAT(e, HasSubstr(std::string("got ") + c.value));
    EXPECT_EQ(ctor_error_with(c.edit), e);  // the constructor validates too
  }
  // The edges of the valid ranges are accepted.
  EXPECT_EQ(error_with([](SamplingParams& p) { p.temperature = 0.0f, p.top_p = 1.0f, p.min_p = 0.0f; }),
            "(no error)");
  EXPECT_EQ(error_with([](SamplingParams& p) { p.top_p = 1e-9f, p.min_p = 0.999f, p.top_k = 1 << 30; }),
            "(no error)");
  EXPECT_EQ(error_with([](SamplingParams& p) { p.repetition_penalty = 1e-6f; }), "(no error)");
  EXPECT_THAT(error_of([] { Sampler s(SamplingParams{}, 0); }), HasSubstr("vocab_size"));
}

TEST(Sampler, BadInputsThrow) {
  SamplingParams p;
  Sampler s(p, 4);
  Logits l = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
  EXPECT_THAT(error_of([&] { s.sample(l.data(), 3, History{}); }), HasSubstr("3 logits for a vocabulary of 4"));
  EXPECT_THAT(error_of([&] { s.sample(nullptr, 4, History{}); }), HasSubstr("null"));
  EXPECT_THAT(error_of([&] { s.sample(l.data(), 5, History{-1}); }), HasSubstr("history holds id -1"));
  EXPECT_THAT(error_of([&] { s.sample(l.data(), 5, History{5}); }), HasSubstr("history holds id 5"));
  EXPECT_EQ(error_of([&] { s.sample(l.data(), 5, History{4}); }), "(no error)");  // a padding id
  Logits nan = l;
  nan[2] = NAN;
  EXPECT_THAT(error_of([&] { s.sample(nan.data(), 5, History{}); }), HasSubstr("logit of id 2 is NaN"));
  EXPECT_THAT(error_of([&] { (void)s.distribution(nan.data(), 5, History{}); }), HasSubstr("NaN"));
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  Sampler g(greedy, 4);
  EXPECT_THAT(error_of([&] { g.sample(nan.data(), 5, History{}); }), HasSubstr("NaN"));  // greedy too
  Logits inf = l;
  inf[1] = INFINITY;
  EXPECT_THAT(error_of([&] { s.sample(inf.data(), 5, History{}); }), HasSubstr("logit of id 1 is +inf"));
  const Logits banned(4, -INFINITY);
  EXPECT_THAT(error_of([&] { s.sample(banned.data(), 4, History{}); }), HasSubstr("-inf"));
  EXPECT_THAT(error_of([&] { g.sample(banned.data(), 4, History{}); }), HasSubstr("-inf"));
}

TEST(Sampler, SampleAllocatesNothingAndIsFastAt128k) {
  const int64_t V = 128256, n_logits = 128512;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Logits flat(n_logits), peaked(n_logits);  // logit spread 2.5 (a broad nucleus) and 6 (LM-like, peaked)
  for (int64_t i = 0; i < n_logits; ++i) {
    const float x = normal(rng);
    flat[i] = 2.5f * x;
    peaked[i] = 6.0f * x;
  }
  History h(512);
  for (int64_t& id : h) id = std::uniform_int_distribution<int64_t>(0, V - 1)(rng);
  auto with = [](auto edit) {
    SamplingParams p;
    edit(p);
    return p;
  };
  struct Config {
    const char* name;
    SamplingParams p;
    const Logits* logits;
  };
  const std::vector<Config> configs = {
      {"softmax", {}, &flat},
      {"greedy", with([](SamplingParams& p) { p.temperature = 0.0f; }), &flat},
      {"top_k 50", with([](SamplingParams& p) { p.top_k = 50; }), &flat},
      {"top_k 20000 (nth_element path)", with([](SamplingParams& p) { p.top_k = 20000; }), &flat},
      {"top_p 0.9, spread 2.5", with([](SamplingParams& p) { p.top_p = 0.9f; }), &flat},
      {"top_p 0.9, spread 6", with([](SamplingParams& p) { p.top_p = 0.9f; }), &peaked},
      {"top_k 40, top_p 0.95, min_p 0.05, T 0.7, penalty 1.1", with([](SamplingParams& p) {
         p.top_k = 40, p.top_p = 0.95f, p.min_p = 0.05f, p.temperature = 0.7f, p.repetition_penalty = 1.1f;
       }),
       &flat},
  };
  for (const Config& c : configs) {
    Sampler s(c.p, V);
    const float* logits = c.logits->data();
    (void)s.sample(logits, n_logits, h);  // warm up
    const int calls = 20;
    const long before = g_allocations.load();
    const auto t0 = std::chrono::steady_clock::now();
    int64_t sum = 0;
    for (int i = 0; i < calls; ++i) sum += s.sample(logits, n_logits, h);
    const auto t1 = std::chrono::steady_clock::now();
    const long allocated = g_allocations.load() - before;
    EXPECT_EQ(allocated, 0) << c.name;
    EXPECT_GE(sum, 0);
    const double ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / calls;
    std::printf("  sample(), V = %lld, %-55s %.3f ms\n", static_cast<long long>(V), c.name, ms);
    EXPECT_LT(ms, 50.0) << c.name;  // generous: a full sort of 128k ids takes ~10 ms; O(V²) would take minutes
  }
}

}  // namespace
}  // namespace mamba3::test
