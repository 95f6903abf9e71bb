// The whole language model on the GPU: the golden LM cases (prefill logits, greedy ids, decode-step logits) in f32
// within the float32 tolerance with identical greedy ids, and in bf16 within 2e-2; random models of awkward shapes
// against the CPU LanguageModel (batch 3, prompts of 1/63/65/300 tokens, MIMO ranks 2 and 4, groups 2, hybrid
// attention), prefill and 32 decode steps; graph-replayed decode equal to eager decode; weight prefetching changing
// no result.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>

#include "cuda/cuda_model.h"
#include "cuda/generator_gpu.h"
#include "cuda/l2_prefetch.h"
#include "cuda/mamba3_decode_gpu.h"
#include "cuda/stream_gemm.h"
#include "gpu_test_util.h"
#include "infer/generator.h"
#include "io/safetensors.h"
#include "model/init_weights.h"
#include "model/language_model.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

using cuda::Precision;
using json = nlohmann::json;

int64_t argmax(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

// Rows [r0, r1) of a 2-D tensor as a fresh tensor.
Tensor rows(const Tensor& t, int64_t r0, int64_t r1) { return t.slice(r0, r1).clone(); }

void run_golden_lm(const std::filesystem::path& dir, Precision p) {
  SCOPED_TRACE(dir.string() + " " + cuda::precision_name(p));
  const double tol = p == Precision::F32 ? 1e-5 : 2e-2;
  cuda::CudaModel m = cuda::CudaModel::load(dir.string(), p);
  auto expected = SafetensorsFile::open((dir / "expected.safetensors").string());
  const Tensor ids = expected.get("input_ids").to(DType::I64);
  const Tensor greedy = expected.get("greedy_ids").to(DType::I64);
  const Tensor prefill_ref = expected.get("prefill_logits_f64");
  const Tensor step_ref = expected.get("step_logits_f64");
  const int64_t B = ids.dim(0), L = ids.dim(1), T = greedy.dim(1), V = m.config().vocab_padded();
  const int64_t vocab = m.config().vocab_size;
  cuda::GpuCache cache = m.new_cache(B, L + T + 1);
  std::vector<int64_t> flat(ids.data<int64_t>(), ids.data<int64_t>() + B * L);
  Tensor logits = m.prefill(flat, B, L, cache, 0, /*all_logits=*/true);
  EXPECT_LE(rel_l2(logits, prefill_ref.reshape({B * L, V})), tol) << "prefill logits";
  for (int64_t b = 0; b < B; ++b) {
    const int64_t got = argmax(logits.data<float>() + (b * L + L - 1) * V, vocab);
    if (p == Precision::F32) {
      EXPECT_EQ(got, greedy.data<int64_t>()[b * T]) << "greedy id 0, row " << b;
    }
  }
  Tensor step_logits = Tensor::empty(DType::F32, {B, V});
  Tensor ref_all = step_ref.to(DType::F32);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> step_ids(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) step_ids[size_t(b)] = greedy.data<int64_t>()[b * T + t];
    m.step(step_ids, cache, step_logits);
    Tensor ref = Tensor::empty(DType::F32, {B, V});
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(ref_all.data<float>() + (b * T + t) * V, V, ref.data<float>() + b * V);
    EXPECT_LE(rel_l2(step_logits, ref), tol) << "step " << t;
    if (p == Precision::F32 && t + 1 < T) {
      for (int64_t b = 0; b < B; ++b) {
        EXPECT_EQ(argmax(step_logits.data<float>() + b * V, vocab), greedy.data<int64_t>()[b * T + t + 1])
            << "greedy id " << t + 1 << ", row " << b;
      }
    }
  }
}

TEST(ModelGpu, GoldenCasesF32) {
  MAMBA3_REQUIRE_GPU();
  auto cases = golden_cases("lm_");
  ASSERT_FALSE(cases.empty()) << "no golden LM cases in " << golden_dir();
  for (const auto& dir : cases) run_golden_lm(dir, Precision::F32);
}

TEST(ModelGpu, GoldenCasesBf16) {
  MAMBA3_REQUIRE_GPU();
  auto cases = golden_cases("lm_");
  ASSERT_FALSE(cases.empty());
  for (const auto& dir : cases) run_golden_lm(dir, Precision::BF16);
}

struct Case {
  const char* name;
  json config;
};

std::vector<Case> random_cases() {
  json base = {{"d_model", 64}, {"n_layer", 3}, {"vocab_size", 203}, {"d_intermediate", 0},
               {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 32}, {"headdim", 16}, {"chunk_size", 16}}}};
  std::vector<Case> out;
  auto with = [&](const char* name, json patch) {
    json c = base;
    c.merge_patch(patch);
    out.push_back({name, c});
  };
  with("SISO groups 2, MLP, LayerNorm, untied",
       {{"ssm_cfg", {{"ngroups", 2}}}, {"d_intermediate", 100}, {"rms_norm", false}, {"tie_embeddings", false}});
  with("MIMO R=2 outnorm", {{"ssm_cfg", {{"is_mimo", true}, {"mimo_rank", 2}, {"is_outproj_norm", true}}}});
  with("MIMO R=4 groups 2 MLP", {{"ssm_cfg", {{"is_mimo", true}, {"mimo_rank", 4}, {"ngroups", 2}}},
                                 {"d_intermediate", 64}});
  with("hybrid: attention GQA + rotary + conv + MLP branch",
       {{"attn_layer_idx", {1}},
        {"d_intermediate", 64},
        {"attn_cfg", {{"num_heads", 6}, {"num_heads_kv", 2}, {"head_dim", 16}, {"rotary_emb_dim", 8}, {"causal", true},
                      {"d_conv", 4}, {"mlp_dim", 40}}}});
  return out;
}

// Prompts of different lengths per row (row-by-row prefill), then 32 decode steps of the whole batch.
TEST(ModelGpu, MatchesCpuOnRandomModels) {
  MAMBA3_REQUIRE_GPU();
  std::mt19937 rng(3);
  for (const Case& cs : random_cases()) {
    SCOPED_TRACE(cs.name);
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    const TensorMap w = init_weights(c, 21);
    LanguageModel cpu(c, w, cs.name);
    cuda::CudaModel gpu(c, w, cs.name, Precision::F32);
    const int64_t B = 3, V = c.vocab_padded(), steps = 32;
    const int64_t lengths[] = {1, 65, 300};
    ModelCache cpu_cache = cpu.new_cache(B);
    cuda::GpuCache gpu_cache = gpu.new_cache(B, 400);
    for (int64_t r = 0; r < B; ++r) {
      std::vector<int64_t> ids(static_cast<size_t>(lengths[r]));
      for (auto& id : ids) id = int64_t(rng() % uint32_t(c.vocab_size));
      Tensor ref = cpu.prefill(ids, cpu_cache, r);
      Tensor got = gpu.prefill(ids, 1, lengths[r], gpu_cache, r);
      EXPECT_LE(rel_l2(got, ref), 1e-5) << "prefill row " << r << " length " << lengths[r];
    }
    // A second prefill of 63 tokens on row 1 continues its state.
    std::vector<int64_t> more(63);
    for (auto& id : more) id = int64_t(rng() % uint32_t(c.vocab_size));
    EXPECT_LE(rel_l2(gpu.prefill(more, 1, 63, gpu_cache, 1), cpu.prefill(more, cpu_cache, 1)), 1e-5) << "continuation";
    Tensor cpu_logits = Tensor::empty(DType::F32, {B, V}), gpu_logits = Tensor::empty(DType::F32, {B, V});
    for (int64_t t = 0; t < steps; ++t) {
      std::vector<int64_t> ids(static_cast<size_t>(B));
      for (auto& id : ids) id = int64_t(rng() % uint32_t(c.vocab_size));
      cpu.step(ids, cpu_cache, cpu_logits);
      gpu.step(ids, gpu_cache, gpu_logits);
      ASSERT_LE(rel_l2(gpu_logits, cpu_logits), 1e-5) << "decode step " << t;
    }
  }
}

// Equal-length prompts prefilled as one batch equal the same prompts prefilled row by row.
TEST(ModelGpu, BatchedPrefillEqualsRowByRow) {
  MAMBA3_REQUIRE_GPU();
  const Case cs = random_cases()[3];
  const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
  const TensorMap w = init_weights(c, 5);
  cuda::CudaModel gpu(c, w, cs.name, Precision::F32);
  std::mt19937 rng(9);
  const int64_t B = 3, L = 70;
  std::vector<int64_t> ids(static_cast<size_t>(B * L));
  for (auto& id : ids) id = int64_t(rng() % uint32_t(c.vocab_size));
  cuda::GpuCache a = gpu.new_cache(B, 128), b = gpu.new_cache(B, 128);
  Tensor batched = gpu.prefill(ids, B, L, a);
  for (int64_t r = 0; r < B; ++r) {
    Tensor one = gpu.prefill(std::span<const int64_t>(ids).subspan(size_t(r * L), size_t(L)), 1, L, b, r);
    EXPECT_LE(rel_l2(one, rows(batched, r, r + 1)), 1e-6) << "row " << r;
  }
}

// The bf16-state mode on whole models (SISO, MIMO, hybrid): graph-replayed decode steps of a bf16-state cache stay
// within 2e-2 (relative L2 of the logits) of the f32-state cache's over 24 steps, the state takes half the ssm bytes,
// and copy_row / reset_row move and clear bf16 rows (a copied row then decodes exactly as its source).
TEST(ModelGpu, Bf16StateTracksF32State) {
  MAMBA3_REQUIRE_GPU();
  for (size_t ci : {size_t(0), size_t(2), size_t(3)}) {
    const Case cs = random_cases()[ci];
    SCOPED_TRACE(cs.name);
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    const TensorMap w = init_weights(c, 12);
    cuda::CudaModel f32(c, w, cs.name, Precision::BF16), b16(c, w, cs.name, Precision::BF16);
    b16.set_state_precision(Precision::BF16);
    EXPECT_LT(b16.state_bytes_per_sequence(), f32.state_bytes_per_sequence());
    const int64_t B = 3, L = 20, V = c.vocab_padded();
    std::mt19937 rng(6);
    std::vector<int64_t> ids(static_cast<size_t>(B * L));
    for (auto& id : ids) id = int64_t(rng() % uint32_t(c.vocab_size));
    cuda::GpuCache cf = f32.new_cache(B, 64), cb = b16.new_cache(B, 64);
    EXPECT_LE(rel_l2(b16.prefill(ids, B, L, cb), f32.prefill(ids, B, L, cf)), 0.0) << "prefill (f32 kernels)";
    Tensor lf = Tensor::empty(DType::F32, {B, V}), lb = Tensor::empty(DType::F32, {B, V});
    double worst = 0.0;
    for (int t = 0; t < 24; ++t) {
      std::vector<int64_t> step(static_cast<size_t>(B));
      for (auto& id : step) id = int64_t(rng() % uint32_t(c.vocab_size));
      f32.step(step, cf, lf);
      b16.step(step, cb, lb);
      worst = std::max(worst, rel_l2(lb, lf));
      ASSERT_LE(rel_l2(lb, lf), 2e-2) << "step " << t;
    }
    std::printf("[ bf16 state ] %s: worst logits rel. error over 24 steps %.2e\n", cs.name, worst);
    // Row 0 copied over row 2, row 1 reset: the same token then gives row 2 the logits of row 0.
    b16.copy_row(cb, 0, cb, 2);
    b16.reset_row(cb, 1);
    b16.step(std::vector<int64_t>(size_t(B), 5), cb, lb);
    EXPECT_EQ(rel_l2(rows(lb, 2, 3), rows(lb, 0, 1)), 0.0) << "copied row";
  }
}

// Prefills a and b with the same B random prompts of L tokens, then steps both `steps` times with the same random
// ids: every step's logits must be bit-identical (and not NaN).
// before_a / before_b run before each of a's / b's calls (a process-wide switch set for one model's steps).
// tol 0: every step's logits bit-equal; else within tol (relative L2).
void expect_close_decodes(
    const ModelConfig& c, cuda::CudaModel& a, cuda::CudaModel& b, int64_t B, int64_t L, int steps, uint32_t seed,
    double tol, const std::function<void()>& before_a = [] {}, const std::function<void()>& before_b = [] {}) {
  const int64_t V = c.vocab_padded();
  std::mt19937 rng(seed);
  std::vector<int64_t> ids(static_cast<size_t>(B * L));
  for (auto& id : ids) id = int64_t(rng() % uint32_t(c.vocab_size));
  cuda::GpuCache ca = a.new_cache(B, L + steps), cb = b.new_cache(B, L + steps);
  before_a();
  a.prefill(ids, B, L, ca);
  before_b();
  b.prefill(ids, B, L, cb);
  Tensor la = Tensor::empty(DType::F32, {B, V}), lb = Tensor::empty(DType::F32, {B, V});
  for (int t = 0; t < steps; ++t) {
    std::vector<int64_t> step(static_cast<size_t>(B));
    for (auto& id : step) id = int64_t(rng() % uint32_t(c.vocab_size));
    before_a();
    a.step(step, ca, la);
    before_b();
    b.step(step, cb, lb);
    const double err = rel_l2(la, lb);
    ASSERT_FALSE(std::isnan(err)) << "step " << t;
    if (tol == 0.0) {
      ASSERT_EQ(err, 0.0) << "step " << t;
    } else {
      EXPECT_LE(err, tol) << "step " << t;
    }
  }
}

void expect_equal_decodes(
    const ModelConfig& c, cuda::CudaModel& a, cuda::CudaModel& b, int64_t B, int64_t L, int steps, uint32_t seed,
    const std::function<void()>& before_a = [] {}, const std::function<void()>& before_b = [] {}) {
  expect_close_decodes(c, a, b, B, L, steps, seed, 0.0, before_a, before_b);
}

// Deferred state writes (CudaModel::set_state_writes_every 2 and 4) against every-step writes on the same f32
// model: graph-replayed decode steps within 1e-5 (relative L2 of the logits) over 14 steps, through a copy_row and a
// reset_row + one-row prefill in the middle of the write interval and a whole-batch prefill that continues rows with
// pending tokens; a copied row then decodes as its source. SISO (with and without attention layers) defers, and its
// caches carry the ring; MIMO defers at P = 64, N = 128 (its tensor-core rows) and not at other shapes.
TEST(ModelGpu, DeferredStateWritesTrackEveryStepWrites) {
  MAMBA3_REQUIRE_GPU();
  const cuda::DecodeChoice saved = cuda::decode_choice();
  cuda::DecodeChoice choice = saved;
  choice.mimo_deferred_writes = true;  // off by default (measured slower); the MIMO case below defers with it
  cuda::set_decode_choice(choice);
  std::vector<Case> cases = {random_cases()[0], random_cases()[3], random_cases()[1]};
  json tc = random_cases()[2].config;  // MIMO R = 4 groups 2 MLP, at the tensor-core rows' head shape
  tc["d_model"] = 128;
  tc["ssm_cfg"]["d_state"] = 128;
  tc["ssm_cfg"]["headdim"] = 64;
  cases.push_back({"MIMO R=4 groups 2 MLP, d_state 128 headdim 64", tc});
  for (const Case& cs : cases) {
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    const TensorMap w = init_weights(c, 15);
    {  // the automatic interval: SISO every 4 steps in caches of ≥ 128 rows and every 2 below, MIMO every 2
      SCOPED_TRACE(std::string(cs.name) + " auto");
      const Mamba3Config& s = c.ssm;
      const bool defers = s.is_mimo ? s.headdim == 64 && s.d_state == 128 : s.d_state % 4 == 0 && s.d_state <= 128;
      cuda::CudaModel m(c, w, cs.name, Precision::F32);
      m.set_state_writes_every(0);
      EXPECT_EQ(m.state_writes_every(16), defers ? 2 : 1);
      EXPECT_EQ(m.state_writes_every(128), defers ? (s.is_mimo ? 2 : 4) : 1);
      if (defers && !s.is_mimo)  // fewer ssm writes per step in the wide cache
        EXPECT_LT(m.decode_state_traffic_per_sequence(128), m.decode_state_traffic_per_sequence(16));
      else
        EXPECT_EQ(m.decode_state_traffic_per_sequence(128), m.decode_state_traffic_per_sequence(16));
    }
    for (int every : {2, 4}) {
      SCOPED_TRACE(std::string(cs.name) + " every " + std::to_string(every));
      cuda::CudaModel a(c, w, cs.name, Precision::F32), b(c, w, cs.name, Precision::F32);
      a.set_state_writes_every(1);
      b.set_state_writes_every(every);
      if (c.ssm.is_mimo && c.ssm.d_state != 128)
        EXPECT_EQ(b.state_bytes_per_sequence(), a.state_bytes_per_sequence());
      else
        EXPECT_GT(b.state_bytes_per_sequence(), a.state_bytes_per_sequence());
      const int64_t B = 3, L = 6, V = c.vocab_padded();
      std::mt19937 rng(17);
      auto random_ids = [&](int64_t n) {
        std::vector<int64_t> ids(static_cast<size_t>(n));
        for (auto& id : ids) id = int64_t(rng() % uint32_t(c.vocab_size));
        return ids;
      };
      cuda::GpuCache ca = a.new_cache(B, 64), cb = b.new_cache(B, 64);
      const std::vector<int64_t> prompt = random_ids(B * L);
      EXPECT_EQ(rel_l2(b.prefill(prompt, B, L, cb), a.prefill(prompt, B, L, ca)), 0.0) << "prefill";
      Tensor la = Tensor::empty(DType::F32, {B, V}), lb = Tensor::empty(DType::F32, {B, V});
      for (int t = 0; t < 14; ++t) {
        if (t == 5) {
          a.copy_row(ca, 0, ca, 2);
          b.copy_row(cb, 0, cb, 2);
          a.reset_row(ca, 1);
          b.reset_row(cb, 1);
          const std::vector<int64_t> one = random_ids(4);
          EXPECT_LE(rel_l2(b.prefill(one, 1, 4, cb, 1), a.prefill(one, 1, 4, ca, 1)), 1e-5) << "row 1 prefill";
        }
        if (t == 9) {
          const std::vector<int64_t> more = random_ids(B * 3);
          EXPECT_LE(rel_l2(b.prefill(more, B, 3, cb), a.prefill(more, B, 3, ca)), 1e-5) << "continuation";
        }
        std::vector<int64_t> ids = random_ids(B);
        if (t == 5) ids[2] = ids[0];  // the copied row takes its source's token
        a.step(ids, ca, la);
        b.step(ids, cb, lb);
        const double err = rel_l2(lb, la);
        ASSERT_FALSE(std::isnan(err)) << "step " << t;
        ASSERT_LE(err, 1e-5) << "step " << t;
        if (t == 5) {
          EXPECT_EQ(rel_l2(rows(lb, 2, 3), rows(lb, 0, 1)), 0.0) << "the copied row";
        }
      }
    }
  }
  cuda::set_decode_choice(saved);
}

// A row moves between caches of different batches — as the server moves rows between its one-row prompt caches and
// its slot cache — with its pending tokens (equal intervals) or with them folded in (the automatic interval differs
// by batch), and decodes on as it would have in its own cache; the source row decodes on unchanged too.
TEST(ModelGpu, DeferredRowsMoveBetweenCacheBatches) {
  MAMBA3_REQUIRE_GPU();
  const Case cs = random_cases()[0];  // SISO, d_state 32: its decode defers
  const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
  const TensorMap w = init_weights(c, 21);
  for (int every : {0, 2, 4}) {
    SCOPED_TRACE("every " + std::to_string(every));
    cuda::CudaModel m(c, w, cs.name, Precision::F32);
    m.set_state_writes_every(every);
    ASSERT_GT(m.state_writes_every(), 1);
    const int64_t V = c.vocab_padded(), W = 130;
    // The automatic interval differs between the two caches (2 and 4): the copies fold the pending tokens in.
    if (every == 0) {
      ASSERT_NE(m.state_writes_every(1), m.state_writes_every(W));
    }
    cuda::GpuCache one = m.new_cache(1, 64), wide = m.new_cache(W, 64), back = m.new_cache(1, 64);
    const std::vector<int64_t> prompt = {5, 17, 42, 8, 99};
    m.prefill(prompt, 1, int64_t(prompt.size()), one);
    Tensor lo = Tensor::empty(DType::F32, {1, V}), lw = Tensor::empty(DType::F32, {W, V}),
           lb = Tensor::empty(DType::F32, {1, V});
    m.step(std::vector<int64_t>{7}, one, lo);  // one token pending at W ≥ 2
    m.copy_row(one, 0, wide, W - 1);
    std::vector<int64_t> ids(size_t(W), 3);
    for (int t = 0; t < 5; ++t) {
      const int64_t id = 11 + 13 * t;
      ids[size_t(W - 1)] = id;
      m.step(std::vector<int64_t>{id}, one, lo);
      m.step(ids, wide, lw);
      const double err = rel_l2(rows(lw, W - 1, W), lo);
      ASSERT_FALSE(std::isnan(err)) << "step " << t;
      EXPECT_LE(err, 1e-5) << "step " << t << " in the wide cache";
    }
    m.copy_row(wide, W - 1, back, 0);
    m.step(std::vector<int64_t>{23}, one, lo);
    m.step(std::vector<int64_t>{23}, back, lb);
    EXPECT_LE(rel_l2(lb, lo), 1e-5) << "back in a one-row cache";
  }
}

// Graph-replayed decode gives the same logits as eager decode.
TEST(ModelGpu, GraphReplayEqualsEager) {
  MAMBA3_REQUIRE_GPU();
  for (size_t ci : {size_t(1), size_t(3)}) {
    const Case cs = random_cases()[ci];
    SCOPED_TRACE(cs.name);
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    const TensorMap w = init_weights(c, 8);
    cuda::CudaModel eager(c, w, cs.name, Precision::BF16), graphed(c, w, cs.name, Precision::BF16);
    eager.set_use_graphs(false);
    expect_equal_decodes(c, eager, graphed, 4, 9, 12, 4);
  }
}

// Greedy generation on the GPU (sampling on the device, graph-replayed steps) gives the CPU generator's ids, for
// every golden model, batch 3 (one prefill per row), and stops at a stop id.
TEST(ModelGpu, GreedyGenerationEqualsCpu) {
  MAMBA3_REQUIRE_GPU();
  auto cases = golden_cases("lm_");
  ASSERT_FALSE(cases.empty());
  for (const auto& dir : cases) {
    SCOPED_TRACE(dir.string());
    LanguageModel cpu = LanguageModel::load(dir.string());
    const std::vector<int64_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
    GenerateOptions opt;
    opt.max_new_tokens = 20;
    opt.sampling.temperature = 0;
    auto ref = generate_n(cpu, prompt, 3, opt);
    auto got = cuda::generate_gpu(dir.string(), "f32", prompt, 3, opt, {}, nullptr);
    ASSERT_EQ(got, ref);
    opt.stop_ids = {ref[0][5]};
    auto stopped = cuda::generate_gpu(dir.string(), "f32", prompt, 3, opt, {}, nullptr);
    for (const auto& row : stopped) {
      ASSERT_FALSE(row.empty());
      EXPECT_EQ(row.back(), ref[0][5]);
      EXPECT_LE(row.size(), 6u);
    }
  }
}

TEST(ModelGpu, ErrorsNameTheProblem) {
  MAMBA3_REQUIRE_GPU();
  const Case cs = random_cases()[1];
  const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
  cuda::CudaModel gpu(c, init_weights(c, 1), cs.name, Precision::F32);
  cuda::GpuCache cache = gpu.new_cache(2, 16);
  std::vector<int64_t> bad = {1, 2, 9999};
  try {
    gpu.prefill(bad, 1, 3, cache, 0);
    FAIL() << "no error for an id outside the vocabulary";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("9999"), std::string::npos) << e.what();
  }
  try {
    gpu.prefill(std::vector<int64_t>{1}, 1, 1, cache, 5);
    FAIL() << "no error for a row outside the cache";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rows"), std::string::npos) << e.what();
  }
}

// Weights requested into L2 ahead of their products (weight_prefetch.h) change no result: both leads, graph-replayed
// and eager, with the default cap and with a cap smaller than one weight matrix, normal and evict-last lines, on
// SISO, MIMO and hybrid models; and the schedule makes its requests.
TEST(ModelGpu, WeightPrefetchKeepsTheBits) {
  MAMBA3_REQUIRE_GPU();
  for (size_t ci : {size_t(0), size_t(2), size_t(3)}) {
    const Case cs = random_cases()[ci];
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    const TensorMap w = init_weights(c, 12);
    const std::vector<cuda::WeightPrefetchOptions> settings = {{cuda::WeightPrefetch::Kernel, 0, 1, false},
                                                               {cuda::WeightPrefetch::Kernel, 4096 + 48, 1, true},
                                                               {cuda::WeightPrefetch::Product, 0, 1, true},
                                                               {cuda::WeightPrefetch::Product, 4096 + 48, 1, false}};
    for (const cuda::WeightPrefetchOptions& o : settings) {
      for (bool graphs : {true, false}) {
        SCOPED_TRACE(std::string(cs.name) + (o.mode == cuda::WeightPrefetch::Kernel ? " kernel" : " product") +
                     " cap " + std::to_string(o.max_bytes) + (o.evict_last ? " evict-last" : "") +
                     (graphs ? " graph" : " eager"));
        cuda::CudaModel with(c, w, cs.name, Precision::BF16), without(c, w, cs.name, Precision::BF16);
        with.set_weight_prefetch(o);
        without.set_weight_prefetch({cuda::WeightPrefetch::Off, 0, 1, false});
        with.set_use_graphs(graphs);
        without.set_use_graphs(graphs);
        expect_equal_decodes(c, with, without, 3, 5, 5, 13);
        // The requests were made: either lead asks once for each Mamba-3 layer's in_proj and out_proj, each MLP's
        // fc1 and fc2 (every block of these models has one) and the lm_head.
        size_t expected = 1;
        for (int64_t i = 0; i < c.n_layer; ++i) expected += (c.is_attention_layer(i) ? 0 : 2) + 2;
        EXPECT_EQ(with.weight_prefetch_requests(), expected);
        EXPECT_EQ(without.weight_prefetch_requests(), 0u);
      }
    }
  }
}

// The head decode kernel requesting its state rows and cached k before it waits for in_proj (DecodeChoice::
// early_state; under PDL at these batches) decodes the same bits as waiting first: SISO, MIMO and hybrid models,
// graph-replayed and eager, one row and three.
TEST(ModelGpu, EarlyStateRequestsKeepTheBits) {
  MAMBA3_REQUIRE_GPU();
  const cuda::DecodeChoice saved = cuda::decode_choice();
  cuda::DecodeChoice early = saved, late = saved;
  early.kernel = late.kernel = cuda::DecodeKernel::Head;  // the kernel with the switch, at every shape it reaches
  early.early_state = true;
  late.early_state = false;
  for (size_t ci : {size_t(0), size_t(2), size_t(3)}) {
    const Case cs = random_cases()[ci];
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    const TensorMap w = init_weights(c, 14);
    for (bool graphs : {true, false}) {
      for (int64_t B : {int64_t(1), int64_t(3)}) {
        SCOPED_TRACE(std::string(cs.name) + (graphs ? " graph" : " eager") + " batch " + std::to_string(B));
        cuda::CudaModel a(c, w, cs.name, Precision::BF16), b(c, w, cs.name, Precision::BF16);
        a.set_use_graphs(graphs);
        b.set_use_graphs(graphs);
        expect_equal_decodes(
            c, a, b, B, 7, 6, 21, [&] { cuda::set_decode_choice(early); }, [&] { cuda::set_decode_choice(late); });
      }
    }
  }
  cuda::set_decode_choice(saved);
}

// One-row decode with the RMSNorms folded into the matrix-vector products (CudaModel::set_fold_norms) follows the
// step with the add + norm kernels within bf16 rounding over 8 steps (SISO models of Mamba-3 + GatedMLP blocks, one
// and two groups), graph-replayed equal to eager bit for bit; models it does not fold (MIMO, LayerNorm, attention)
// say so.
TEST(ModelGpu, FoldedNormsTrackTheNormKernels) {
  MAMBA3_REQUIRE_GPU();
  json siso = {{"d_model", 96},
               {"n_layer", 3},
               {"vocab_size", 203},
               {"d_intermediate", 136},
               {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 32}, {"headdim", 16}, {"chunk_size", 16}}}};
  json groups = siso;
  groups["ssm_cfg"]["ngroups"] = 2;
  groups["n_layer"] = 2;
  // Wide enough for products of 2 and 4 warps per column (K ≥ 1024).
  json wide = {{"d_model", 512},
               {"n_layer", 2},
               {"vocab_size", 203},
               {"d_intermediate", 1032},
               {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 32}, {"headdim", 64}, {"chunk_size", 16}}}};
  for (const auto& [name, cfg] : {std::pair<const char*, json>{"SISO + MLP", siso},
                                  {"SISO groups 2 + MLP", groups},
                                  {"SISO d_model 512 + MLP", wide}}) {
    SCOPED_TRACE(name);
    const ModelConfig c = ModelConfig::from_json(cfg, name);
    TensorMap w = init_weights(c, 17);
    // Every norm weight random (init_weights sets them to 1), so that a product folding the wrong norm shows.
    std::mt19937 wrng(5);
    for (auto& [wname, t] : w)
      if (wname.find("norm") != std::string::npos && wname.ends_with(".weight")) {
        Tensor r = random_tensor(wrng, t.shape(), 0.5f, 1.5f);
        t = r;
      }
    cuda::CudaModel folded(c, w, name, Precision::BF16), plain(c, w, name, Precision::BF16),
        folded_eager(c, w, name, Precision::BF16);
    folded.set_fold_norms(true);
    folded_eager.set_fold_norms(true);
    folded_eager.set_use_graphs(false);
    plain.set_fold_norms(false);
    ASSERT_TRUE(folded.decode_folds_norms());
    ASSERT_FALSE(plain.decode_folds_norms());
    expect_close_decodes(c, folded, plain, 1, 5, 8, 23, 1e-2);
    expect_equal_decodes(c, folded_eager, folded, 1, 6, 6, 29);
  }
  // What does not fold at one row: LayerNorm blocks; MIMO (measured slower folded there); an attention layer.
  for (size_t ci : {size_t(0), size_t(2), size_t(3)}) {
    const Case cs = random_cases()[ci];
    const ModelConfig c = ModelConfig::from_json(cs.config, cs.name);
    cuda::CudaModel m(c, init_weights(c, 3), cs.name, Precision::BF16);
    m.set_fold_norms(true);
    EXPECT_FALSE(m.decode_folds_norms()) << cs.name;
  }
}

// A SISO + MLP model whose products take the stream GEMM's forms (every K a multiple of 8).
ModelConfig wide_batch_config() {
  const json cfg = {{"d_model", 512},
                    {"n_layer", 2},
                    {"vocab_size", 203},
                    {"d_intermediate", 1032},
                    {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 32}, {"headdim", 64}, {"chunk_size", 16}}}};
  return ModelConfig::from_json(cfg, "SISO d_model 512 + MLP");
}
// MIMO R = 4 at N = 128, P = 64: the head kernel's tensor-core rows (with deferred state writes by default).
ModelConfig wide_batch_mimo_config() {
  const json cfg = {{"d_model", 512},
                    {"n_layer", 2},
                    {"vocab_size", 203},
                    {"d_intermediate", 1032},
                    {"ssm_cfg",
                     {{"layer", "Mamba3"},
                      {"d_state", 128},
                      {"headdim", 64},
                      {"chunk_size", 16},
                      {"is_mimo", true},
                      {"mimo_rank", 4}}}};
  return ModelConfig::from_json(cfg, "MIMO R=4 d_model 512 + MLP");
}

// Batches of 65–128 rows: the bf16 decode (its products through cuBLAS by default, through the stream GEMM's wide
// form with fc1's activation in its epilogue under MAMBA3_STREAM_GEMM=all: ctest test_model_gpu_stream_gemm_wide)
// tracks the f32 decode within bf16 rounding, and graph replay equals eager decode bit for bit.
TEST(ModelGpu, WideBatchDecodeTracksF32) {
  MAMBA3_REQUIRE_GPU();
  const ModelConfig c = wide_batch_config();
  const TensorMap w = init_weights(c, 31);
  cuda::CudaModel f32(c, w, "f32", Precision::F32), b16(c, w, "bf16", Precision::BF16),
      b16_eager(c, w, "bf16 eager", Precision::BF16);
  b16_eager.set_use_graphs(false);
  // The stream GEMM's shape conditions hold for every product (K: d_model, d_inner, d_intermediate), so that under
  // MAMBA3_STREAM_GEMM=all on sm_90 the decode reaches it rather than falling back to cuBLAS.
  cuda::Context ctx;
  if (ctx.info().cc_major == 9 && ctx.info().cc_minor == 0) {
    cuda::DeviceBuffer buf(size_t(128 * 1032) * 2);
    for (int64_t K : {int64_t(512), int64_t(1024), int64_t(1032)}) {
      EXPECT_TRUE(cuda::stream_gemm_supported(ctx, 128, 2048, K, K, buf.raw(), buf.raw())) << "K " << K;
    }
  }
  for (int64_t B : {70, 128}) {
    SCOPED_TRACE("batch " + std::to_string(B));
    expect_close_decodes(c, b16, f32, B, 5, 4, 37, 2e-2);
    expect_equal_decodes(c, b16_eager, b16, B, 3, 3, 41);
  }
}

// The norms folded into the wide class's products at 70 and 128 rows (the default route on sm_90, and
// MAMBA3_STREAM_GEMM=all, ctest test_model_gpu_stream_gemm_wide): logits within bf16 rounding of the unfolded step,
// graph replay equal to eager decode. Random norm weights, so that a product folding the wrong norm shows. Under
// MAMBA3_STREAM_GEMM=0 nothing folds at these rows, which the test also checks.
void expect_wide_batch_folds_track_norm_kernels(const ModelConfig& c) {
  TensorMap w = init_weights(c, 43);
  std::mt19937 wrng(7);
  for (auto& [wname, t] : w)
    if (wname.find("norm") != std::string::npos && wname.ends_with(".weight"))
      t = random_tensor(wrng, t.shape(), 0.5f, 1.5f);
  cuda::CudaModel folded(c, w, "folded", Precision::BF16), plain(c, w, "plain", Precision::BF16),
      folded_eager(c, w, "folded eager", Precision::BF16);
  folded.set_fold_norms(true);
  folded_eager.set_fold_norms(true);
  folded_eager.set_use_graphs(false);
  plain.set_fold_norms(false);
  cuda::Context ctx;
  const bool routed = cuda::stream_gemm_folds_preferred(70) && ctx.info().cc_major == 9 && ctx.info().cc_minor == 0;
  for (int64_t B : {70, 128}) {
    SCOPED_TRACE("batch " + std::to_string(B));
    EXPECT_EQ(folded.decode_folds_norms(B), routed);
    EXPECT_FALSE(plain.decode_folds_norms(B));
    expect_close_decodes(c, folded, plain, B, 5, 6, 47, 1e-2);
    expect_equal_decodes(c, folded_eager, folded, B, 3, 3, 53);
  }
  EXPECT_FALSE(folded.decode_folds_norms(64));  // the narrow forms do not fold
}

// SISO and MIMO mixers (MIMO folds at these rows, not at one).
TEST(ModelGpu, WideBatchFoldedNormsTrackTheNormKernels) {
  MAMBA3_REQUIRE_GPU();
  SCOPED_TRACE("SISO");
  expect_wide_batch_folds_track_norm_kernels(wide_batch_config());
  SCOPED_TRACE("MIMO R = 4");
  expect_wide_batch_folds_track_norm_kernels(wide_batch_mimo_config());
}

// l2_prefetch reads nothing back and writes nothing: ranges of awkward lengths (cut to whole 16-byte units, one
// request and many, up to the allocation's end) leave the bytes as they were; a misaligned address is refused.
TEST(ModelGpu, L2PrefetchLeavesMemoryAsItWas) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  const size_t n = (size_t(5) << 20) + 112;
  std::vector<uint8_t> host(n);
  std::mt19937 rng(5);
  for (auto& b : host) b = uint8_t(rng());
  cuda::DeviceBuffer buf(n);
  buf.upload(host.data(), n);
  const char* p = static_cast<const char*>(buf.raw());
  for (size_t bytes : {size_t(0), size_t(15), size_t(16), size_t(100), size_t(32 * 1024), size_t(32 * 1024 + 16), n})
    cuda::l2_prefetch(ctx.stream(), p, bytes);
  cuda::l2_prefetch(ctx.stream(), p + 64, n - 64);
  cuda::l2_prefetch(ctx.stream(), p + 16, n - 16, /*evict_last=*/true);
  cuda::l2_prefetch(ctx.stream(), nullptr, 4096);
  ctx.sync();
  std::vector<uint8_t> back(n);
  buf.download(back.data(), n);
  EXPECT_EQ(back, host);
  try {
    cuda::l2_prefetch(ctx.stream(), p + 8, 4096);
    FAIL() << "no error for a misaligned address";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("l2_prefetch"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mamba3::test
