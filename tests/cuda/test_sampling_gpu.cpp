// GpuSampler against the CPU Sampler: greedy ids bit-identical (planted ties, padding that holds the maximum,
// repetition penalty over prompt + generated ids); for the random settings, the empirical distribution of many
// draws against Sampler::distribution (total variation < 0.03, and no draw of a token the CPU gives probability 0);
// reproducibility of a row's stream after start_row, including through a CUDA graph. Per-row mode: each row equals
// a 1-row uniform sampler with its parameters wherever it sits, presence/frequency penalties equal host-penalised
// logits, the active mask, sample_rows, graph replay, and the argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
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


// ---- Per-row mode ----

// One row's setup in per-row mode.
struct RowSetup {
  SamplingParams params;
  float presence, frequency;
  std::vector<int64_t> prompt;
};

// Random logits (rows, n_logits), N(0, 2), padding ids above everything.
std::vector<float> random_logits(std::mt19937& rng, int64_t rows, int64_t vocab, int64_t n_logits) {
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> l(static_cast<size_t>(rows * n_logits));
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t i = 0; i < n_logits; ++i) l[size_t(b * n_logits + i)] = i < vocab ? nd(rng) : 100.0f;
  return l;
}

// Logits where a few "favourite" ids (10 + 37j, j < 5) stand well above a noisy floor in a fixed order, so that a
// greedy row keeps choosing the first one unless a penalty pushes it down.
std::vector<float> favourite_logits(std::mt19937& rng, int64_t rows, int64_t vocab, int64_t n_logits) {
  std::normal_distribution<float> nd(0.0f, 0.5f);
  std::vector<float> l(static_cast<size_t>(rows * n_logits));
  for (int64_t b = 0; b < rows; ++b) {
    float* row = l.data() + b * n_logits;
    for (int64_t i = 0; i < n_logits; ++i) row[i] = i < vocab ? nd(rng) : 100.0f;
    for (int64_t j = 0; j < 5; ++j) row[10 + 37 * j] = 4.0f - 0.3f * float(j) + 0.05f * nd(rng);
  }
  return l;
}

std::vector<float> row_of(const std::vector<float>& logits, int64_t row, int64_t n_logits) {
  return std::vector<float>(logits.begin() + row * n_logits, logits.begin() + (row + 1) * n_logits);
}

// sample() on host logits; unwritten ids read −1.
std::vector<int32_t> sample_host(const Context& ctx, const GpuSampler& s, const std::vector<float>& logits) {
  const DeviceBuffer ld = DeviceBuffer::from(logits);
  DeviceBuffer ids(size_t(s.batch()) * sizeof(int32_t));
  return run_sample(ctx, s, ld, ids);
}

// sample_rows() on host logits (rows.size(), n_logits); unwritten ids read −1.
std::vector<int32_t> sample_rows_host(const Context& ctx, const GpuSampler& s, const std::vector<float>& logits,
                                      const std::vector<int64_t>& rows) {
  const DeviceBuffer ld = DeviceBuffer::from(logits);
  DeviceBuffer ids(size_t(s.batch()) * sizeof(int32_t));
  MAMBA3_CUDA_CHECK(cudaMemset(ids.raw(), 0xFF, ids.bytes()));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  s.sample_rows(ctx, ld.as<float>(), rows.data(), int64_t(rows.size()), ids.as<int32_t>());
  ctx.sync();
  return ids.to_vector<int32_t>();
}

// The CPU server's penalty, l − (presence + frequency·n), rounded as written: the volatile temporaries keep the
// host compiler from contracting it into an FMA (the GPU sampler rounds each operation).
float host_penalised(float l, float presence, float frequency, int64_t n) {
  volatile float product = frequency * float(n);
  volatile float amount = presence + product;
  return l - amount;
}

void set_rows(const Context& ctx, GpuSampler& s, const std::vector<RowSetup>& setups,
              const std::vector<int64_t>& place) {
  for (size_t k = 0; k < setups.size(); ++k)
    s.set_row(ctx, place[k], setups[k].params, setups[k].presence, setups[k].frequency, setups[k].prompt);
}

TEST(GpuSamplerPerRow, EachRowEqualsAOneRowUniformSamplerWhereverItSits) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 500, NL = 512, steps = 24;
  const std::vector<RowSetup> setups = {
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.3f, 11), 0.0f, 0.0f, {1, 2, 3}},  // greedy, repetition penalty
      {params_of(0.7f, 0, 1.0f, 0.0f, 1.0f, 12), 0.0f, 0.0f, {}},         // temperature
      {params_of(1.0f, 20, 1.0f, 0.0f, 1.0f, 13), 0.0f, 0.0f, {4}},       // top-k
      {params_of(1.0f, 0, 0.8f, 0.0f, 1.0f, 14), 0.0f, 0.0f, {}},         // top-p
      {params_of(1.2f, 0, 1.0f, 0.1f, 1.0f, 15), 0.0f, 0.0f, {7, 7}},     // min-p
      {params_of(0.9f, 40, 0.9f, 0.02f, 1.4f, 16), 0.0f, 0.0f, {5, 9, 499, 510}},  // all, repetition penalty
  };
  const int64_t B = int64_t(setups.size());
  Context ctx;
  // `per` holds setup k in row k; `moved` (one row more, row 1 left at its greedy default) in row place[k].
  GpuSampler per = GpuSampler::per_row(V, NL, B);
  GpuSampler moved = GpuSampler::per_row(V, NL, B + 1);
  EXPECT_TRUE(per.per_row_mode());
  std::vector<int64_t> identity(setups.size()), place = {6, 0, 4, 2, 5, 3};
  for (int64_t k = 0; k < B; ++k) identity[size_t(k)] = k;
  set_rows(ctx, per, setups, identity);
  set_rows(ctx, moved, setups, place);
  // The uniform references: stream (seed, row 0, step), which per-row mode uses for every row.
  std::vector<std::unique_ptr<GpuSampler>> refs;
  for (const RowSetup& r : setups) {
    refs.push_back(std::make_unique<GpuSampler>(r.params, V, NL, 1));
    EXPECT_FALSE(refs.back()->per_row_mode());
    refs.back()->start_row(ctx, 0, r.prompt);
  }
  std::mt19937 rng(41);
  std::vector<std::set<int32_t>> distinct(setups.size());
  for (int64_t step = 0; step < steps; ++step) {
    const std::vector<float> logits = random_logits(rng, B, V, NL);
    std::vector<float> moved_logits = random_logits(rng, B + 1, V, NL);
    for (int64_t k = 0; k < B; ++k)
      std::copy(logits.begin() + k * NL, logits.begin() + (k + 1) * NL, moved_logits.begin() + place[size_t(k)] * NL);
    const std::vector<int32_t> got = sample_host(ctx, per, logits);
    const std::vector<int32_t> got_moved = sample_host(ctx, moved, moved_logits);
    for (int64_t k = 0; k < B; ++k) {
      const int32_t want = sample_host(ctx, *refs[size_t(k)], row_of(logits, k, NL))[0];
      EXPECT_EQ(got[size_t(k)], want) << "step " << step << " row " << k;
      EXPECT_EQ(got_moved[size_t(place[size_t(k)])], got[size_t(k)]) << "step " << step << " setup " << k;
      EXPECT_GE(got[size_t(k)], 0);
      EXPECT_LT(got[size_t(k)], V);
      distinct[size_t(k)].insert(got[size_t(k)]);
    }
    EXPECT_GE(got_moved[1], 0);  // the default row samples (greedily) too
  }
  for (int64_t k = 1; k < B; ++k) EXPECT_GT(distinct[size_t(k)].size(), size_t(1)) << "row " << k << " never varies";
}

TEST(GpuSamplerPerRow, PresenceAndFrequencyPenaltiesEqualHostPenalisedLogits) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 300, NL = 320, steps = 30;
  const std::vector<RowSetup> setups = {
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.0f, 1), 1.5f, 0.0f, {}},                 // greedy, presence
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.3f, 2), 0.0f, 0.75f, {10, 47}},          // greedy, frequency, repetition
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.0f, 3), 0.3f, 0.1f, {}},                 // greedy, inexact amounts
      {params_of(0.9f, 30, 1.0f, 0.0f, 1.2f, 4), 0.5f, 0.25f, {84}},             // top-k, both penalties
      {params_of(1.0f, 0, 0.9f, 0.05f, 1.0f, 5), -0.5f, 0.5f, {}},               // top-p, min-p, negative presence
      {params_of(1.0f, 0, 1.0f, 0.0f, 1.0f, 6), 0.0f, 0.0f, {}},                 // penalties off
  };
  const int64_t B = int64_t(setups.size());
  Context ctx;
  GpuSampler per = GpuSampler::per_row(V, NL, B);
  std::vector<int64_t> identity(setups.size());
  for (int64_t k = 0; k < B; ++k) identity[size_t(k)] = k;
  set_rows(ctx, per, setups, identity);
  std::vector<std::unique_ptr<GpuSampler>> refs;
  for (const RowSetup& r : setups) {
    refs.push_back(std::make_unique<GpuSampler>(r.params, V, NL, 1));
    refs.back()->start_row(ctx, 0, r.prompt);
  }
  std::vector<std::map<int64_t, int64_t>> counts(setups.size());
  std::vector<int64_t> changed(setups.size(), 0);  // greedy steps where the penalties moved the argmax
  std::mt19937 rng(42);
  for (int64_t step = 0; step < steps; ++step) {
    std::vector<float> logits = favourite_logits(rng, B, V, NL);
    logits[size_t(3 * NL + 10 + step % 5 * 37)] = -INFINITY;  // a banned favourite (stays banned when penalised)
    const std::vector<int32_t> got = sample_host(ctx, per, logits);
    for (int64_t k = 0; k < B; ++k) {
      const RowSetup& r = setups[size_t(k)];
      std::vector<float> row = row_of(logits, k, NL);
      const int64_t plain = std::max_element(row.begin(), row.begin() + V) - row.begin();
      for (const auto& [id, n] : counts[size_t(k)]) row[size_t(id)] = host_penalised(row[size_t(id)], r.presence, r.frequency, n);
      const int32_t want = sample_host(ctx, *refs[size_t(k)], row)[0];
      EXPECT_EQ(got[size_t(k)], want) << "step " << step << " row " << k;
      ++counts[size_t(k)][want];
      if (r.params.temperature == 0.0f && want != plain) ++changed[size_t(k)];
    }
  }
  for (int64_t k = 0; k < 3; ++k) EXPECT_GT(changed[size_t(k)], 0) << "the penalties never mattered in row " << k;
  for (int64_t k = 0; k < 2; ++k)  // a greedy row with a positive penalty does not repeat one id every step
    EXPECT_GT(counts[size_t(k)].size(), size_t(1)) << "row " << k;
}

TEST(GpuSamplerPerRow, InactiveRowsAreUntouchedAndResumeWhereTheyStopped) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 200, NL = 200, steps = 12;
  const std::vector<RowSetup> setups = {
      {params_of(1.0f, 0, 1.0f, 0.0f, 1.0f, 31), 0.0f, 0.0f, {}},
      {params_of(0.8f, 20, 1.0f, 0.0f, 1.2f, 32), 0.5f, 0.5f, {3}},  // paused in steps 4–7
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.0f, 33), 2.0f, 0.0f, {}},    // greedy, presence; paused in steps 4–7
      {params_of(1.0f, 0, 0.9f, 0.0f, 1.0f, 34), 0.0f, 0.25f, {}},
  };
  const int64_t B = int64_t(setups.size());
  Context ctx;
  GpuSampler per = GpuSampler::per_row(V, NL, B);
  std::vector<int64_t> identity(setups.size());
  for (int64_t k = 0; k < B; ++k) identity[size_t(k)] = k;
  set_rows(ctx, per, setups, identity);
  // References: 1-row per-row samplers, fed only the steps where their row is active.
  std::vector<std::unique_ptr<GpuSampler>> refs;
  for (const RowSetup& r : setups) {
    refs.push_back(std::make_unique<GpuSampler>(GpuSampler::per_row(V, NL, 1)));
    refs.back()->set_row(ctx, 0, r.params, r.presence, r.frequency, r.prompt);
  }
  const std::vector<uint8_t> all = {1, 1, 1, 1}, paused = {1, 0, 0, 1};
  std::mt19937 rng(43);
  for (int64_t step = 0; step < steps; ++step) {
    if (step == 4) per.set_active(ctx, paused.data());
    if (step == 8) per.set_active(ctx, all.data());
    const std::vector<uint8_t>& mask = step >= 4 && step < 8 ? paused : all;
    const std::vector<float> logits = favourite_logits(rng, B, V, NL);
    const std::vector<int32_t> got = sample_host(ctx, per, logits);
    for (int64_t k = 0; k < B; ++k) {
      if (!mask[size_t(k)]) {
        EXPECT_EQ(got[size_t(k)], -1) << "step " << step << ": inactive row " << k << " wrote an id";
        continue;
      }
      const int32_t want = sample_host(ctx, *refs[size_t(k)], row_of(logits, k, NL))[0];
      EXPECT_EQ(got[size_t(k)], want) << "step " << step << " row " << k;
    }
  }
}

TEST(GpuSamplerPerRow, SampleRowsEqualsSampleOnThoseRows) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 256, NL = 264;
  const std::vector<RowSetup> setups = {
      {params_of(1.0f, 0, 1.0f, 0.0f, 1.0f, 51), 0.0f, 0.0f, {}},
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.0f, 52), 1.0f, 0.0f, {}},
      {params_of(0.8f, 16, 1.0f, 0.0f, 1.1f, 53), 0.0f, 0.5f, {2}},
      {params_of(1.0f, 0, 0.85f, 0.0f, 1.0f, 54), 0.25f, 0.25f, {}},
      {params_of(1.1f, 0, 1.0f, 0.05f, 1.0f, 55), 0.0f, 0.0f, {8}},
      {params_of(0.7f, 8, 0.9f, 0.0f, 1.3f, 56), 0.5f, 0.0f, {}},
  };
  const int64_t B = int64_t(setups.size());
  Context ctx;
  // x samples every row with sample(), masking the rows y leaves out; y samples its rows with sample_rows and has
  // every row inactive (sample_rows ignores the mask).
  GpuSampler x = GpuSampler::per_row(V, NL, B), y = GpuSampler::per_row(V, NL, B);
  std::vector<int64_t> identity(setups.size());
  for (int64_t k = 0; k < B; ++k) identity[size_t(k)] = k;
  set_rows(ctx, x, setups, identity);
  set_rows(ctx, y, setups, identity);
  const std::vector<uint8_t> none(size_t(B), 0);
  y.set_active(ctx, none.data());
  std::mt19937 rng(44);
  // Phase 1: three rows; phase 2: all six in another order (the staging buffer grows).
  const std::vector<std::vector<int64_t>> phases = {{4, 1, 3}, {5, 0, 2, 4, 1, 3}};
  for (const std::vector<int64_t>& rows : phases) {
    std::vector<uint8_t> mask(size_t(B), 0);
    for (int64_t r : rows) mask[size_t(r)] = 1;
    x.set_active(ctx, mask.data());
    for (int step = 0; step < 6; ++step) {
      const std::vector<float> logits = favourite_logits(rng, B, V, NL);
      std::vector<float> compact;
      for (int64_t r : rows) compact.insert(compact.end(), logits.begin() + r * NL, logits.begin() + (r + 1) * NL);
      const std::vector<int32_t> want = sample_host(ctx, x, logits);
      const std::vector<int32_t> got = sample_rows_host(ctx, y, compact, rows);
      EXPECT_EQ(got, want) << "rows " << rows.size() << " step " << step;  // unlisted rows −1 in both
      for (int64_t r : rows) EXPECT_GE(got[size_t(r)], 0);
    }
  }

  // Uniform mode: rows {4, 0} of a 5-row sampler equal those rows of another one's sample().
  const SamplingParams p = params_of(0.9f, 50, 0.95f, 0.0f, 1.2f, 77);
  GpuSampler u1(p, V, NL, 5), u2(p, V, NL, 5);
  const std::vector<int64_t> rows = {4, 0};
  for (int step = 0; step < 6; ++step) {
    const std::vector<float> logits = random_logits(rng, 5, V, NL);
    std::vector<float> compact;
    for (int64_t r : rows) compact.insert(compact.end(), logits.begin() + r * NL, logits.begin() + (r + 1) * NL);
    const std::vector<int32_t> want = sample_host(ctx, u1, logits);
    const std::vector<int32_t> got = sample_rows_host(ctx, u2, compact, rows);
    for (int64_t r = 0; r < 5; ++r) {
      const int32_t expected = r == 0 || r == 4 ? want[size_t(r)] : -1;
      EXPECT_EQ(got[size_t(r)], expected) << "step " << step << " row " << r;
    }
  }
}

TEST(GpuSamplerPerRow, GraphReplayMatchesEager) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  const int64_t V = 300, NL = 304, steps = 6;
  const std::vector<RowSetup> setups = {
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.0f, 61), 1.5f, 0.0f, {}},
      {params_of(1.0f, 50, 0.95f, 0.0f, 1.2f, 62), 0.0f, 0.5f, {1, 2}},
      {params_of(0.8f, 0, 1.0f, 0.05f, 1.0f, 63), 0.5f, 0.5f, {}},  // inactive in steps 3–5
      {params_of(1.0f, 0, 1.0f, 0.0f, 1.0f, 64), 0.0f, 0.0f, {299}},
      {params_of(0.0f, 0, 1.0f, 0.0f, 1.3f, 65), 0.0f, 0.0f, {10}},
  };
  const int64_t B = int64_t(setups.size());
  Context ctx;
  GpuSampler gpu = GpuSampler::per_row(V, NL, B);
  std::vector<int64_t> identity(setups.size());
  for (int64_t k = 0; k < B; ++k) identity[size_t(k)] = k;
  std::mt19937 rng(45);
  std::vector<std::vector<float>> logits;
  for (int64_t s = 0; s < steps; ++s) logits.push_back(favourite_logits(rng, B, V, NL));
  DeviceBuffer ld(size_t(B * NL) * sizeof(float)), ids(size_t(B) * sizeof(int32_t));
  const std::vector<uint8_t> all(size_t(B), 1), paused = {1, 1, 0, 1, 1};
  // Runs the schedule: per step, new logits and −1 ids through the stream, the mask from step 3, then `launch`.
  const auto run = [&](const std::function<void()>& launch) {
    std::vector<std::vector<int32_t>> out;
    for (int64_t s = 0; s < steps; ++s) {
      if (s == 3) gpu.set_active(ctx, paused.data());
      MAMBA3_CUDA_CHECK(cudaMemcpyAsync(ld.raw(), logits[size_t(s)].data(), ld.bytes(), cudaMemcpyHostToDevice,
                                        ctx.stream()));
      MAMBA3_CUDA_CHECK(cudaMemsetAsync(ids.raw(), 0xFF, ids.bytes(), ctx.stream()));
      launch();
      ctx.sync();
      out.push_back(ids.to_vector<int32_t>());
    }
    return out;
  };

  set_rows(ctx, gpu, setups, identity);
  const std::vector<std::vector<int32_t>> eager = run([&] { gpu.sample(ctx, ld.as<float>(), ids.as<int32_t>()); });

  set_rows(ctx, gpu, setups, identity);
  gpu.set_active(ctx, all.data());
  ctx.sync();
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  MAMBA3_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
  gpu.sample(ctx, ld.as<float>(), ids.as<int32_t>());
  MAMBA3_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &g));
  MAMBA3_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  const std::vector<std::vector<int32_t>> replayed = run([&] { MAMBA3_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream())); });
  MAMBA3_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MAMBA3_CUDA_CHECK(cudaGraphDestroy(g));
  EXPECT_EQ(eager, replayed);
  for (int64_t s = 0; s < steps; ++s) {
    EXPECT_EQ(eager[size_t(s)][2] == -1, s >= 3) << "step " << s;
    for (int64_t k = 0; k < B; ++k) {
      if (k != 2 || s < 3) {
        EXPECT_GE(eager[size_t(s)][size_t(k)], 0) << "step " << s << " row " << k;
      }
    }
  }
}

// Expects `f` to throw mamba3::Error whose message names `what`.
void expect_error_naming(const std::function<void()>& f, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one naming " << what;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

TEST(GpuSamplerPerRow, RejectsBadArguments) {
  if (!device_info().available) GTEST_SKIP() << "no CUDA device";
  Context ctx;
  EXPECT_THROW(GpuSampler::per_row(10, 9, 1), Error);
  EXPECT_THROW(GpuSampler::per_row(10, 10, 0), Error);
  const SamplingParams ok = params_of(0.8f, 5, 0.9f, 0.0f, 1.1f, 3);
  const std::vector<int64_t> none, prompt = {11}, bad_prompt = {12};
  const std::vector<uint8_t> mask = {1, 0};

  GpuSampler uniform(params_of(1.0f, 0, 1.0f, 0.0f, 1.0f), 10, 12, 2);
  expect_error_naming([&] { uniform.set_row(ctx, 0, ok, 0.0f, 0.0f, none); }, "per-row");
  expect_error_naming([&] { uniform.set_active(ctx, mask.data()); }, "per-row");

  GpuSampler per = GpuSampler::per_row(10, 12, 2);
  EXPECT_THROW(per.set_row(ctx, -1, ok, 0.0f, 0.0f, none), Error);
  EXPECT_THROW(per.set_row(ctx, 2, ok, 0.0f, 0.0f, none), Error);
  EXPECT_THROW(per.set_row(ctx, 0, params_of(-1.0f, 0, 1.0f, 0.0f, 1.0f), 0.0f, 0.0f, none), Error);
  EXPECT_THROW(per.set_row(ctx, 0, ok, 0.0f, 0.0f, bad_prompt), Error);
  expect_error_naming([&] { per.set_row(ctx, 0, ok, std::nanf(""), 0.0f, none); }, "presence_penalty");
  expect_error_naming([&] { per.set_row(ctx, 0, ok, 0.0f, INFINITY, none); }, "frequency_penalty");
  EXPECT_NO_THROW(per.set_row(ctx, 1, ok, 0.5f, -0.5f, prompt));
  EXPECT_NO_THROW(per.set_active(ctx, mask.data()));
  EXPECT_NO_THROW(per.start_row(ctx, 1, prompt));  // per-row mode: restarts the row with its parameters

  DeviceBuffer logits(size_t(3 * 12) * sizeof(float)), ids(size_t(2) * sizeof(int32_t));
  const std::vector<int64_t> out_of_range = {2}, twice = {1, 1}, three = {0, 1, 0};
  for (const std::vector<int64_t>* rows : {&out_of_range, &twice, &three})
    EXPECT_THROW(per.sample_rows(ctx, logits.as<float>(), rows->data(), int64_t(rows->size()), ids.as<int32_t>()),
                 Error);
  ctx.sync();
}

}  // namespace
}  // namespace mamba3::cuda
