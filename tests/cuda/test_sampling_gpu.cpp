// GpuSampler against the CPU Sampler: greedy ids bit-identical (planted ties, padding that holds the maximum,
// repetition penalty over prompt + generated ids); for the random settings, the empirical distribution of many
// draws against Sampler::distribution (total variation < 0.03, and no draw of a token the CPU gives probability 0);
// reproducibility of a row's stream after start_row, including through a CUDA graph.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda/sampling_gpu.h"
#include "infer/sampler.h"

namespace mamba3::cuda {
namespace {

std::vector<int32_t> run_sample(const Context& ctx, const GpuSampler& s, const DeviceBuffer& logits,
                                DeviceBuffer& ids) {
  MAMBA3_CUDA_CHECK(cudaMemset(ids.raw(), 0xFF, ids.bytes()));  // -1: an unwritten id fails every check
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  s.sample(ctx, logits.as<float>(), ids.as<int32_t>());
  ctx.sync();
  return ids.to_vector<int32_t>();
}

// Random logits (batch, n_logits): quantised to quarters (many ties), a planted tie at the top of each row among
// ids {0 or 1, a middle id, vocab − 1}, and padding ids holding values above everything (never to be returned).
// Odd rows are shifted negative so the penalty's multiply branch is exercised.
std::vector<float> greedy_logits(std::mt19937& rng, int64_t batch, int64_t vocab, int64_t n_logits) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> any(0, vocab - 1);
  std::vector<float> l(static_cast<size_t>(batch * n_logits));
  for (int64_t b = 0; b < batch; ++b) {
    float* row = l.data() + b * n_logits;
    const float shift = b % 2 ? -12.0f : 0.0f;
    for (int64_t i = 0; i < vocab; ++i) row[i] = std::round(nd(rng) * 4.0f) / 4.0f + shift;
    const float top = 6.0f + shift;
    const int64_t tied[] = {b % 2, any(rng), vocab - 1};
    for (int64_t i : tied) row[i] = top;
    if (b == 2) row[any(rng)] = -INFINITY;  // a banned token
    for (int64_t i = vocab; i < n_logits; ++i) row[i] = 100.0f;
  }
  return l;
}

struct GreedyCase {
  const char* name;
  int64_t vocab, n_logits;
  SamplingParams params;
};

SamplingParams params_of(float temperature, int64_t top_k, float top_p, float min_p, float penalty,
                         uint64_t seed = 0) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.repetition_penalty = penalty;
  p.seed = seed;
  return p;
}

TEST(GpuSampler, GreedyIsBitIdenticalToTheCpuSampler) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const GreedyCase cases[] = {
      {"v1000 temperature 0", 1000, 1008, params_of(0.0f, 0, 1.0f, 0.0f, 1.0f)},
      {"v1000 top_k 1, penalty 1.3", 1000, 1008, params_of(0.8f, 1, 0.9f, 0.1f, 1.3f)},
      {"v50277 temperature 0, penalty 1.3", 50277, 50280, params_of(0.0f, 0, 1.0f, 0.0f, 1.3f)},
      {"v50280 top_k 1", 50280, 50280, params_of(1.0f, 1, 1.0f, 0.0f, 1.0f)},
      {"v50277 temperature 0, penalty 0.7", 50277, 50288, params_of(0.0f, 0, 1.0f, 0.0f, 0.7f)},
  };
  Context ctx;
  for (const GreedyCase& c : cases) {
    SCOPED_TRACE(c.name);
    const int64_t B = 5;
    std::mt19937 rng(11);
    GpuSampler gpu(c.params, c.vocab, c.n_logits, B);
    Sampler cpu(c.params, c.vocab);
    std::vector<std::vector<int64_t>> history(B);
    std::uniform_int_distribution<int64_t> any(0, c.n_logits - 1);
    for (int64_t b = 0; b < B; ++b) {
      for (int j = 0; j < 40; ++j) history[size_t(b)].push_back(any(rng));  // repeated and padding ids allowed
      gpu.start_row(ctx, b, history[size_t(b)]);
    }
    DeviceBuffer ids(size_t(B) * sizeof(int32_t));
    for (int step = 0; step < 6; ++step) {
      std::vector<float> logits = greedy_logits(rng, B, c.vocab, c.n_logits);
      // Penalise the planted top of some rows: make a history id the unique maximum first.
      for (int64_t b = 0; b < B; b += 2) logits[size_t(b * c.n_logits + history[size_t(b)][0] % c.vocab)] = 7.0f;
      const DeviceBuffer ld = DeviceBuffer::from(logits);
      const std::vector<int32_t> got = run_sample(ctx, gpu, ld, ids);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t want = cpu.sample(logits.data() + b * c.n_logits, c.n_logits, history[size_t(b)]);
        EXPECT_EQ(got[size_t(b)], want) << "step " << step << " row " << b;
        EXPECT_LT(got[size_t(b)], c.vocab);
        history[size_t(b)].push_back(want);
      }
    }
  }
}

TEST(GpuSampler, RepetitionPenaltyChangesTheGreedyChoiceAsOnTheCpu) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 16, B = 4;
  const SamplingParams p = params_of(0.0f, 0, 1.0f, 0.0f, 1.5f);
  Context ctx;
  GpuSampler gpu(p, V, V, B);
  Sampler cpu(p, V);
  std::vector<float> logits(static_cast<size_t>(B * V), 0.0f);
  for (int64_t b = 0; b < 2; ++b) {  // rows 0, 1: 2.0 at id 3 beats 1.9 at id 7, unless 3 is penalised
    logits[size_t(b * V + 3)] = 2.0f;
    logits[size_t(b * V + 7)] = 1.9f;
  }
  for (int64_t b = 2; b < 4; ++b) {  // rows 2, 3: all negative; −1.0 at id 2 beats −1.2 at id 5 unless penalised
    for (int64_t i = 0; i < V; ++i) logits[size_t(b * V + i)] = -3.0f;
    logits[size_t(b * V + 2)] = -1.0f;
    logits[size_t(b * V + 5)] = -1.2f;
  }
  const std::vector<std::vector<int64_t>> prompts = {{}, {3, 3}, {}, {2}};
  for (int64_t b = 0; b < B; ++b) gpu.start_row(ctx, b, prompts[size_t(b)]);
  const DeviceBuffer ld = DeviceBuffer::from(logits);
  DeviceBuffer ids(size_t(B) * sizeof(int32_t));
  const std::vector<int32_t> got = run_sample(ctx, gpu, ld, ids);
  EXPECT_EQ(got, (std::vector<int32_t>{3, 7, 2, 5}));
  for (int64_t b = 0; b < B; ++b)
    EXPECT_EQ(got[size_t(b)], cpu.sample(logits.data() + b * V, V, prompts[size_t(b)])) << "row " << b;
  // The generated ids join the history: row 0 generated 3, so now 3 (2.0/1.5) loses to 7.
  const std::vector<int32_t> next = run_sample(ctx, gpu, ld, ids);
  EXPECT_EQ(next[0], 7);
  EXPECT_EQ(next[2], 5);
}

struct DistCase {
  const char* name;
  SamplingParams params;
};

const DistCase kDistCases[] = {
    {"temperature 0.7", params_of(0.7f, 0, 1.0f, 0.0f, 1.0f, 5)},
    {"top_k 5", params_of(1.0f, 5, 1.0f, 0.0f, 1.0f, 6)},
    {"top_p 0.9", params_of(1.0f, 0, 0.9f, 0.0f, 1.0f, 7)},
    {"min_p 0.1", params_of(1.0f, 0, 1.0f, 0.1f, 1.0f, 8)},
    {"temperature 0.8 top_k 10 top_p 0.85 min_p 0.05", params_of(0.8f, 10, 0.85f, 0.05f, 1.0f, 9)},
    {"temperature 1.3 top_k 1000 top_p 0.95", params_of(1.3f, 1000, 0.95f, 0.0f, 1.0f, 10)},
};

// Draws batch × steps samples of one logits row (repeated over the batch) and compares them with the CPU
// distribution: total variation over `bucket(id)` (ids, or a coarser partition for huge vocabularies) < 0.03,
// and never an id of CPU probability 0.
void check_distribution(const DistCase& c, const std::vector<float>& row, int64_t vocab,
                        const std::function<int64_t(int64_t)>& bucket) {
  SCOPED_TRACE(c.name);
  const int64_t n_logits = int64_t(row.size()), B = 256, steps = 100;
  Context ctx;
  GpuSampler gpu(c.params, vocab, n_logits, B);
  Sampler cpu(c.params, vocab);
  const std::vector<float> p = cpu.distribution(row.data(), n_logits, {});
  std::vector<float> logits;
  for (int64_t b = 0; b < B; ++b) logits.insert(logits.end(), row.begin(), row.end());
  const DeviceBuffer ld = DeviceBuffer::from(logits);
  DeviceBuffer ids(size_t(B) * sizeof(int32_t));
  std::map<int64_t, double> emp, ref;
  int64_t zero_prob_draws = 0, out_of_range = 0;
  for (int64_t s = 0; s < steps; ++s) {
    for (const int32_t id : run_sample(ctx, gpu, ld, ids)) {
      if (id < 0 || id >= vocab) {
        ++out_of_range;
        continue;
      }
      if (p[size_t(id)] == 0.0f) ++zero_prob_draws;
      emp[bucket(id)] += 1.0 / double(B * steps);
    }
  }
  for (int64_t i = 0; i < vocab; ++i)
    if (p[size_t(i)] > 0.0f) ref[bucket(i)] += p[size_t(i)];
  double tv = 0;
  for (const auto& [k, v] : ref) tv += std::abs(v - (emp.count(k) ? emp[k] : 0.0));
  for (const auto& [k, v] : emp)
    if (!ref.count(k)) tv += v;
  tv *= 0.5;
  EXPECT_EQ(out_of_range, 0);
  EXPECT_EQ(zero_prob_draws, 0);
  EXPECT_LT(tv, 0.03);
  std::printf("[ info ] %s: total variation %.4f over %zu buckets\n", c.name, tv, ref.size());
}

TEST(GpuSampler, DistributionMatchesTheCpuSamplerSmallVocabulary) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 40, n_logits = 48;
  std::mt19937 rng(21);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::vector<float> row(static_cast<size_t>(n_logits));
  for (int64_t i = 0; i < V; ++i) row[size_t(i)] = nd(rng);
  // Ties at the top-k boundaries: ids sorted by value, then the 5th and 6th, and the 10th and 11th, made equal.
  std::vector<int64_t> order(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) order[size_t(i)] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return row[size_t(a)] > row[size_t(b)]; });
  row[size_t(order[5])] = row[size_t(order[4])];
  row[size_t(order[10])] = row[size_t(order[9])];
  row[size_t(order[20])] = -INFINITY;
  for (int64_t i = V; i < n_logits; ++i) row[size_t(i)] = 50.0f;  // padding: never drawn
  for (const DistCase& c : kDistCases) check_distribution(c, row, V, [](int64_t id) { return id; });
}

TEST(GpuSampler, DistributionMatchesTheCpuSamplerLargeVocabulary) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  // 200k ids: 30 planted ones carry most of the mass, a long tail of [−9, −7] the rest (≈ 40%). Total variation
  // over {each planted id, the tail as one bucket}; a tail id of CPU probability 0 must still never be drawn.
  const int64_t V = 200000, n_logits = 200064;
  std::mt19937 rng(22);
  std::uniform_real_distribution<float> tail(-9.0f, -7.0f);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::uniform_int_distribution<int64_t> any(0, V - 1);
  std::vector<float> row(static_cast<size_t>(n_logits));
  for (int64_t i = 0; i < V; ++i) row[size_t(i)] = tail(rng);
  std::set<int64_t> planted;
  while (planted.size() < 30) planted.insert(any(rng));
  for (int64_t id : planted) row[size_t(id)] = nd(rng);
  for (int64_t i = V; i < n_logits; ++i) row[size_t(i)] = 50.0f;
  for (const DistCase& c : kDistCases)
    check_distribution(c, row, V, [&](int64_t id) { return planted.count(id) ? id : int64_t(-1); });
}

TEST(GpuSampler, StartRowRestartsTheStreamAndGraphReplayMatches) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 300, B = 8, steps = 6;
  const SamplingParams p = params_of(1.0f, 50, 0.95f, 0.0f, 1.2f, 1234);
  Context ctx;
  GpuSampler gpu(p, V, V, B);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> logits(static_cast<size_t>(B * V));
  for (float& v : logits) v = u(rng);
  const DeviceBuffer ld = DeviceBuffer::from(logits);
  DeviceBuffer ids(size_t(B) * sizeof(int32_t));
  const std::vector<std::vector<int64_t>> prompts = {{1, 2, 3}, {}, {299}, {7, 7}, {}, {0}, {5}, {100, 200}};
  const auto start_all = [&] {
    for (int64_t b = 0; b < B; ++b) gpu.start_row(ctx, b, prompts[size_t(b)]);
  };

  start_all();
  std::vector<std::vector<int32_t>> first;
  for (int64_t s = 0; s < steps; ++s) first.push_back(run_sample(ctx, gpu, ld, ids));

  start_all();
  std::vector<std::vector<int32_t>> again;
  for (int64_t s = 0; s < steps; ++s) again.push_back(run_sample(ctx, gpu, ld, ids));
  EXPECT_EQ(first, again);

  start_all();
  ctx.sync();
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  MAMBA3_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
  gpu.sample(ctx, ld.as<float>(), ids.as<int32_t>());
  MAMBA3_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &g));
  MAMBA3_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  std::vector<std::vector<int32_t>> replayed;
  for (int64_t s = 0; s < steps; ++s) {
    MAMBA3_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
    ctx.sync();
    replayed.push_back(ids.to_vector<int32_t>());
  }
  MAMBA3_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MAMBA3_CUDA_CHECK(cudaGraphDestroy(g));
  EXPECT_EQ(first, replayed);

  // The rows draw from different streams: over 6 steps at least two rows differ somewhere.
  std::set<std::vector<int32_t>> per_row;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int32_t> seq;
    for (const auto& step : first) seq.push_back(step[size_t(b)]);
    per_row.insert(seq);
  }
  EXPECT_GT(per_row.size(), size_t(1));
  for (const auto& step : first)
    for (const int32_t id : step) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, V);
    }
}

TEST(GpuSampler, RejectsBadArguments) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  Context ctx;
  EXPECT_THROW(GpuSampler(params_of(-1.0f, 0, 1.0f, 0.0f, 1.0f), 10, 10, 1), Error);
  EXPECT_THROW(GpuSampler(params_of(1.0f, 0, 1.0f, 0.0f, 1.0f), 10, 9, 1), Error);
  GpuSampler s(params_of(1.0f, 0, 1.0f, 0.0f, 1.0f), 10, 12, 2);
  const std::vector<int64_t> bad = {12};
  EXPECT_THROW(s.start_row(ctx, 0, bad), Error);
  EXPECT_THROW(s.start_row(ctx, 2, std::vector<int64_t>{}), Error);
}

}  // namespace
}  // namespace mamba3::cuda
