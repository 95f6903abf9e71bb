// The server on the CUDA backend. (1) GPU cache rows as decode slots: prompts prefilled alone (in one reused,
// reset 1-row cache), copied into slots, rows masked in and out (reset_row, copy_row, set_active) — logits equal the CPU model's for every live row, on the golden
// SISO, MIMO and hybrid (attention) models. (2) The engine over CudaBackend: 32 concurrent seeded requests return
// exactly what each returns alone, n > 1 choices equal single requests with seed + i, a prefix-cache hit prefills
// only the new tokens and changes nothing, greedy output in f32 mode equals the CPU server's, and the HTTP API
// streams from it.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "cuda/cuda_model.h"
#include "gpu_test_util.h"
#include "model/language_model.h"
#include "server/cuda_backend.h"
#include "server/http_server.h"
#include "support/test_support.h"

namespace mamba3 {
namespace {

using cuda::Precision;

std::string golden_model(const std::string& name) { return (test::golden_dir() / name).string(); }

std::vector<int64_t> random_ids(std::mt19937& rng, int64_t n, int64_t vocab) {
  std::vector<int64_t> v(size_t(n), 0);
  for (auto& x : v) x = int64_t(rng() % uint64_t(vocab));
  return v;
}

Tensor row_of(const Tensor& t, int64_t r) { return t.slice(r, r + 1); }

// ------------------------------------------------------------------------------------------------ slots (model)

class GpuSlots : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuSlots, JoinAndLeaveMatchTheCpuModel) {
  MAMBA3_REQUIRE_GPU();
  const std::string dir = golden_model(GetParam());
  LanguageModel cpu = LanguageModel::load(dir);
  cuda::CudaModel gpu = cuda::CudaModel::load(dir, Precision::F32);
  const ModelConfig& c = cpu.config();
  const int64_t S = 5, cap = 96, Vp = c.vocab_padded();
  std::mt19937 rng(5);
  cuda::GpuCache slots = gpu.new_cache(S, cap);
  // Every slot first decodes garbage for a few steps (as idle slots of a server do), so a joining sequence must
  // really overwrite its slot's state.
  Tensor logits = Tensor::empty(DType::F32, {S, Vp});
  std::vector<int64_t> ids(size_t(S), 1);
  for (int t = 0; t < 3; ++t) gpu.step(ids, slots, logits);

  struct Seq {
    int64_t slot;
    ModelCache cpu_cache;
    int64_t next;
  };
  std::vector<Seq> live;
  std::vector<uint8_t> active(size_t(S), 0);
  cuda::GpuCache one = gpu.new_cache(1, cap);  // reused for every prompt: reset_row must empty it
  auto join = [&](int64_t slot, int64_t length) {
    const auto prompt = random_ids(rng, length, c.vocab_size);
    gpu.reset_row(one, 0);
    Tensor g = gpu.prefill(prompt, 1, length, one);
    gpu.copy_row(one, 0, slots, slot);
    ModelCache cc = cpu.new_cache(1);
    Tensor ref = cpu.prefill(prompt, cc, 0);
    EXPECT_LE(test::rel_l2(g, ref), 1e-5) << "prefill of the slot-" << slot << " prompt";
    active[size_t(slot)] = 1;
    live.push_back({slot, std::move(cc), prompt.back()});
  };
  join(3, 7);
  join(1, 12);
  for (int t = 0; t < 8; ++t) {
    if (t == 3) join(0, 5);       // joins while others run
    if (t == 5) {                 // slot 3 leaves; slot 4 takes a new sequence
      active[3] = 0;
      live.erase(live.begin());
      join(4, 9);
    }
    gpu.set_active(slots, active);
    std::fill(ids.begin(), ids.end(), 0);
    for (const Seq& s : live) ids[size_t(s.slot)] = s.next;
    gpu.step(ids, slots, logits);
    for (Seq& s : live) {
      Tensor ref = Tensor::empty(DType::F32, {1, Vp});
      const int64_t in[1] = {s.next};
      cpu.step(in, s.cpu_cache, ref);
      ASSERT_LE(test::rel_l2(row_of(logits, s.slot), ref), 1e-5) << GetParam() << " step " << t << " slot " << s.slot;
      s.next = (s.next * 31 + 7 + t) % c.vocab_size;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, GpuSlots, ::testing::Values("lm_siso_mlp", "lm_mimo", "lm_hybrid"));

// ------------------------------------------------------------------------------------------------ the engine

// Bytes plus one named token per remaining id: every id is visible in the text, so equal texts mean equal ids.
Tokenizer tokenizer_for(const ModelConfig& c) {
  std::vector<std::string> specials;
  for (int64_t id = 256; id < c.vocab_size; ++id) specials.push_back("<t" + std::to_string(id) + ">");
  return Tokenizer::bytes(specials);
}

// Every choice's text, in choice order.
std::vector<std::string> texts_of(const std::shared_ptr<server::Job>& job) {
  std::vector<std::string> out(size_t(job->request().n));
  for (const auto& e : job->wait_all()) out[size_t(e.choice)] += e.text;
  EXPECT_FALSE(job->error()) << *job->error();
  return out;
}

std::unique_ptr<server::Engine> gpu_engine(const cuda::CudaModel& m, const Tokenizer& tok, server::EngineOptions eo,
                                           int64_t capacity = 160) {
  return std::make_unique<server::Engine>(std::make_unique<server::CudaBackend>(m, eo.max_batch, capacity), tok, eo);
}

std::vector<server::GenerationRequest> mixed_requests(const ModelConfig& c, int count) {
  std::mt19937 rng(17);
  std::vector<server::GenerationRequest> rs;
  for (int i = 0; i < count; ++i) {
    server::GenerationRequest r;
    r.prompt = random_ids(rng, 1 + int64_t(rng() % 40), c.vocab_size);
    r.max_tokens = 4 + i % 13;
    r.sampling.seed = uint64_t(1000 + i);
    switch (i % 5) {
      case 0: r.sampling.temperature = 0; break;
      case 1: r.sampling.temperature = 0.9f, r.sampling.top_p = 0.9f; break;
      case 2: r.sampling.top_k = 20, r.sampling.repetition_penalty = 1.2f; break;
      case 3: r.sampling.min_p = 0.05f, r.presence_penalty = 0.5f, r.frequency_penalty = 0.25f; break;
      default: r.sampling.temperature = 1.3f; break;
    }
    rs.push_back(r);
  }
  return rs;
}

// Every request's texts when all are submitted at once, and when each is sent alone (a fresh engine for each mode).
std::pair<std::vector<std::vector<std::string>>, std::vector<std::vector<std::string>>> together_and_alone(
    const cuda::CudaModel& gpu, const Tokenizer& tok, const server::EngineOptions& eo,
    const std::vector<server::GenerationRequest>& requests) {
  std::vector<std::vector<std::string>> together, alone;
  {
    auto engine = gpu_engine(gpu, tok, eo);
    std::vector<std::shared_ptr<server::Job>> jobs;
    for (const auto& r : requests) jobs.push_back(engine->submit(r));
    for (auto& j : jobs) together.push_back(texts_of(j));
  }
  {
    auto engine = gpu_engine(gpu, tok, eo);
    for (const auto& r : requests) alone.push_back(texts_of(engine->submit(r)));
  }
  return {together, alone};
}

class GpuEngine : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuEngine, ConcurrentRequestsReturnWhatEachReturnsAlone) {
  MAMBA3_REQUIRE_GPU();
  cuda::CudaModel gpu = cuda::CudaModel::load(golden_model(GetParam()), Precision::BF16);
  const Tokenizer tok = tokenizer_for(gpu.config());
  server::EngineOptions eo;
  eo.max_batch = 32;
  eo.max_queue = 64;
  eo.prefill_budget = 64;  // prompts join over several iterations while others decode
  const auto requests = mixed_requests(gpu.config(), 32);
  const auto [together, alone] = together_and_alone(gpu, tok, eo, requests);
  int nonempty = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    EXPECT_EQ(together[i], alone[i]) << "request " << i;
    nonempty += !together[i][0].empty();
  }
  EXPECT_GE(nonempty, 30);  // the comparison is about real outputs
}

TEST_P(GpuEngine, ChoicesEqualSingleRequestsWithSeedPlusIndex) {
  MAMBA3_REQUIRE_GPU();
  cuda::CudaModel gpu = cuda::CudaModel::load(golden_model(GetParam()), Precision::BF16);
  const Tokenizer tok = tokenizer_for(gpu.config());
  server::EngineOptions eo;
  eo.max_batch = 8;
  auto engine = gpu_engine(gpu, tok, eo);
  server::GenerationRequest r = mixed_requests(gpu.config(), 2)[1];
  r.max_tokens = 12;
  r.n = 4;
  const auto many = texts_of(engine->submit(r));
  std::set<std::string> distinct(many.begin(), many.end());
  EXPECT_GE(distinct.size(), 2u) << "sampled choices should differ";
  for (int64_t i = 0; i < r.n; ++i) {
    server::GenerationRequest one = r;
    one.n = 1;
    one.sampling.seed = r.sampling.seed + uint64_t(i);
    EXPECT_EQ(texts_of(engine->submit(one))[0], many[size_t(i)]) << "choice " << i;
  }
}

TEST_P(GpuEngine, PrefixHitPrefillsOnlyNewTokensAndChangesNothing) {
  MAMBA3_REQUIRE_GPU();
  cuda::CudaModel gpu = cuda::CudaModel::load(golden_model(GetParam()), Precision::BF16);
  const Tokenizer tok = tokenizer_for(gpu.config());
  server::EngineOptions eo;
  eo.max_batch = 4;
  eo.prefill_block = 16;
  std::mt19937 rng(3);
  server::GenerationRequest first, second;
  first.prompt = random_ids(rng, 48, gpu.config().vocab_size);  // a multiple of prefill_block: a segment end of both
  first.max_tokens = 6;
  second = first;
  const auto more = random_ids(rng, 20, gpu.config().vocab_size);
  second.prompt.insert(second.prompt.end(), more.begin(), more.end());  // 68 tokens sharing the first 48
  second.sampling.seed = 99;
  std::string cached, fresh;
  {
    auto engine = gpu_engine(gpu, tok, eo);
    texts_of(engine->submit(first));
    const auto before = engine->metrics();
    auto job = engine->submit(second);
    cached = texts_of(job)[0];
    const auto after = engine->metrics();
    EXPECT_EQ(after.cache_hits - before.cache_hits, 1);
    EXPECT_EQ(job->cached_tokens(), 48);
    EXPECT_EQ(after.prefilled_tokens - before.prefilled_tokens, 20);
  }
  {
    server::EngineOptions off = eo;
    off.state_cache_bytes = 0;
    auto engine = gpu_engine(gpu, tok, off);
    fresh = texts_of(engine->submit(second))[0];
  }
  EXPECT_FALSE(cached.empty());
  EXPECT_EQ(cached, fresh);
}

TEST_P(GpuEngine, GreedyOutputEqualsTheCpuServerInF32) {
  MAMBA3_REQUIRE_GPU();
  const std::string dir = golden_model(GetParam());
  cuda::CudaModel gpu = cuda::CudaModel::load(dir, Precision::F32);
  LanguageModel cpu = LanguageModel::load(dir);
  const Tokenizer tok = tokenizer_for(gpu.config());
  server::EngineOptions eo;
  eo.max_batch = 8;
  auto requests = mixed_requests(gpu.config(), 8);
  for (auto& r : requests) r.sampling = SamplingParams{}, r.sampling.temperature = 0, r.max_tokens = 16;
  std::vector<std::shared_ptr<server::Job>> on_gpu, on_cpu;
  auto g = gpu_engine(gpu, tok, eo);
  server::Engine c(cpu, tok, eo);
  for (const auto& r : requests) on_gpu.push_back(g->submit(r)), on_cpu.push_back(c.submit(r));
  for (size_t i = 0; i < requests.size(); ++i) EXPECT_EQ(texts_of(on_gpu[i]), texts_of(on_cpu[i])) << "request " << i;
}

TEST_P(GpuEngine, RejectsRequestsLongerThanASlotHolds) {
  MAMBA3_REQUIRE_GPU();
  cuda::CudaModel gpu = cuda::CudaModel::load(golden_model(GetParam()), Precision::BF16);
  const Tokenizer tok = tokenizer_for(gpu.config());
  server::EngineOptions eo;
  eo.max_batch = 2;
  auto engine = gpu_engine(gpu, tok, eo, /*capacity=*/32);
  server::GenerationRequest r;
  r.prompt.assign(30, 5);
  r.max_tokens = 8;
  if (engine->backend().max_sequence_length() > 0) {
    EXPECT_THROW(engine->submit(r), Error);
  } else {
    EXPECT_FALSE(texts_of(engine->submit(r))[0].empty());  // pure Mamba-3: no per-sequence limit
  }
  server::EngineOptions too_many = eo;
  too_many.max_batch = 3;
  EXPECT_THROW(server::Engine(std::make_unique<server::CudaBackend>(gpu, 2, 32), tok, too_many), Error);
}

// Prompts prefilled together (prefill_batch) against the same prompts alone, over two rounds (the second continues
// the states the first left): within 1e-5 with cuBLAS's own choice of algorithm per shape, and bit for bit with the
// fixed-shape products the server uses for batched prefill (CudaModel::set_prefill_row_block).
void batched_vs_alone(cuda::CudaModel& gpu, bool exact) {
  server::CudaBackend backend(gpu, 2, 128);
  std::mt19937 rng(8);
  const int64_t V = gpu.config().vocab_size;
  std::vector<std::vector<int64_t>> first, second;
  std::vector<std::unique_ptr<server::PromptState>> batched, alone;
  std::vector<std::vector<float>> lb(3), la(3);
  for (int i = 0; i < 3; ++i) {
    first.push_back(random_ids(rng, 20, V));
    second.push_back(random_ids(rng, 9, V));
    batched.push_back(backend.new_prompt_state());
    alone.push_back(backend.new_prompt_state());
  }
  for (const auto* segs : {&first, &second}) {
    std::vector<std::span<const int64_t>> spans;
    std::vector<server::PromptState*> states;
    std::vector<std::vector<float>*> outs;
    for (int i = 0; i < 3; ++i) {
      spans.emplace_back((*segs)[size_t(i)]);
      states.push_back(batched[size_t(i)].get());
      outs.push_back(&lb[size_t(i)]);
      backend.prefill((*segs)[size_t(i)], *alone[size_t(i)], la[size_t(i)]);
    }
    backend.prefill_batch(spans, states, outs);
    for (int i = 0; i < 3; ++i) {
      ASSERT_EQ(lb[size_t(i)].size(), la[size_t(i)].size());
      if (exact) {
        EXPECT_TRUE(lb[size_t(i)] == la[size_t(i)]) << "prompt " << i << ": batched logits differ from alone";
      } else {
        const int64_t n = int64_t(la[size_t(i)].size());
        Tensor a = Tensor::empty(DType::F32, {1, n}), b = Tensor::empty(DType::F32, {1, n});
        std::copy(la[size_t(i)].begin(), la[size_t(i)].end(), a.data<float>());
        std::copy(lb[size_t(i)].begin(), lb[size_t(i)].end(), b.data<float>());
        EXPECT_LE(test::rel_l2(b, a), 1e-5) << "prompt " << i;
      }
    }
  }
}

TEST_P(GpuEngine, BatchedPrefillMatchesPromptsPrefilledAlone) {
  MAMBA3_REQUIRE_GPU();
  cuda::CudaModel f32 = cuda::CudaModel::load(golden_model(GetParam()), Precision::F32);
  batched_vs_alone(f32, false);
  for (Precision p : {Precision::F32, Precision::BF16}) {
    cuda::CudaModel gpu = cuda::CudaModel::load(golden_model(GetParam()), p);
    gpu.set_prefill_row_block(32);  // 20- and 9-token segments: blocks padded, batches of 60 and 27 rows
    batched_vs_alone(gpu, true);
  }
}

TEST_P(GpuEngine, BatchedPrefillEngineReturnsWhatEachReturnsAlone) {
  MAMBA3_REQUIRE_GPU();
  cuda::CudaModel gpu = cuda::CudaModel::load(golden_model(GetParam()), Precision::BF16);
  gpu.set_prefill_row_block(64);
  const Tokenizer tok = tokenizer_for(gpu.config());
  server::EngineOptions eo;
  eo.max_batch = 16;
  eo.max_queue = 64;
  eo.prefill_batch = 8;
  eo.prefill_block = 8;  // many equal-length segments to group
  const auto requests = mixed_requests(gpu.config(), 16);
  const auto [together, alone] = together_and_alone(gpu, tok, eo, requests);
  for (size_t i = 0; i < requests.size(); ++i) EXPECT_EQ(together[i], alone[i]) << "request " << i;
}

INSTANTIATE_TEST_SUITE_P(Golden, GpuEngine, ::testing::Values("lm_siso_mlp", "lm_mimo", "lm_hybrid"));

TEST(GpuServerHttp, CompletionAndStreamFromTheCudaBackend) {
  MAMBA3_REQUIRE_GPU();
  cuda::CudaModel gpu = cuda::CudaModel::load(golden_model("lm_hybrid"), Precision::BF16);
  const Tokenizer tok = tokenizer_for(gpu.config());
  server::EngineOptions eo;
  eo.max_batch = 4;
  auto engine = gpu_engine(gpu, tok, eo);
  server::ServerOptions so;
  so.port = 0;
  server::HttpServer http(*engine, tok, server::ChatTemplate{}, so);
  http.start();
  httplib::Client client("127.0.0.1", http.port());
  client.set_read_timeout(120);
  auto r = client.Post("/v1/completions", R"({"prompt":"hello","max_tokens":5,"temperature":0})", "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const auto body = nlohmann::json::parse(r->body);
  EXPECT_EQ(body["usage"]["completion_tokens"], 5);
  auto s = client.Post("/v1/completions", R"({"prompt":"hello","max_tokens":5,"temperature":0,"stream":true})",
                       "application/json");
  ASSERT_TRUE(s);
  ASSERT_EQ(s->status, 200);
  EXPECT_NE(s->body.find("data: [DONE]"), std::string::npos);
  std::string streamed;
  for (size_t at = 0; (at = s->body.find("data: {", at)) != std::string::npos; ++at) {
    const size_t end = s->body.find("\n\n", at);
    streamed += nlohmann::json::parse(s->body.substr(at + 6, end - at - 6))["choices"][0]["text"].get<std::string>();
  }
  EXPECT_EQ(streamed, body["choices"][0]["text"].get<std::string>());
  http.stop();
  engine->stop();
}

}  // namespace
}  // namespace mamba3
