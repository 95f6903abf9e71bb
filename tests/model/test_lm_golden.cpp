// Every lm_* golden case: prompt logits and the greedy continuation (ids identical, each step's logits within the
// golden README's float32 tolerance), from model.safetensors and from pytorch_model.bin (identical logits).
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "io/torch_checkpoint.h"
#include "io/weights.h"
#include "model/language_model.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

constexpr double kLogitTol = 1e-5;

std::vector<std::vector<int64_t>> read_ids(const nlohmann::json& j) {
  return j.get<std::vector<std::vector<int64_t>>>();
}

// Row b (and token t when the tensor is 3-D) of an expected-logits tensor as an f32 (rows, V) tensor.
Tensor logits_at(const Tensor& t, int64_t b, int64_t t0, int64_t t1) {
  const int64_t T = t.dim(1), V = t.dim(2);
  Tensor all = t.to(DType::F32);
  Tensor out = Tensor::empty(DType::F32, {t1 - t0, V});
  std::copy_n(all.data<float>() + (b * T + t0) * V, (t1 - t0) * V, out.data<float>());
  return out;
}

int64_t argmax(const float* x, int64_t n) { return int64_t(std::max_element(x, x + n) - x); }

struct Result {
  double worst = 0;
  std::vector<Tensor> logits;  // every logits tensor produced, for comparing two loaders
};

Result run_case(const LanguageModel& model, const std::filesystem::path& dir) {
  auto expected = SafetensorsFile::open((dir / "expected.safetensors").string());
  std::ifstream pj(dir / "prompt.json");
  nlohmann::json prompt = nlohmann::json::parse(pj);
  auto inputs = read_ids(prompt["input_ids"]);
  auto greedy = read_ids(prompt["greedy_ids"]);
  const int64_t B = int64_t(inputs.size()), V = model.config().vocab_padded(), vocab = model.config().vocab_size;
  const Tensor& prefill_ref = expected.get("prefill_logits_f64");
  const Tensor& step_ref = expected.get("step_logits_f64");
  Result r;
  ModelCache cache = model.new_cache(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = int64_t(inputs[size_t(b)].size());
    Tensor logits = model.prefill(inputs[size_t(b)], cache, b, true);
    double e = rel_l2(logits, logits_at(prefill_ref, b, 0, L));
    EXPECT_LE(e, kLogitTol) << dir << " prefill row " << b;
    r.worst = std::max(r.worst, e);
    EXPECT_EQ(argmax(logits.data<float>() + (L - 1) * V, vocab), greedy[size_t(b)][0]) << dir << " row " << b;
    r.logits.push_back(logits);
  }
  const int64_t T = int64_t(greedy[0].size());
  Tensor logits = Tensor::empty(DType::F32, {B, V});
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> ids;
    for (int64_t b = 0; b < B; ++b) ids.push_back(greedy[size_t(b)][size_t(t)]);
    model.step(ids, cache, logits);
    for (int64_t b = 0; b < B; ++b) {
      Tensor row = logits.slice(b, b + 1);
      double e = rel_l2(row, logits_at(step_ref, b, t, t + 1));
      EXPECT_LE(e, kLogitTol) << dir << " step " << t << " row " << b;
      r.worst = std::max(r.worst, e);
      if (t + 1 < T) {
        EXPECT_EQ(argmax(row.data<float>(), vocab), greedy[size_t(b)][size_t(t + 1)]) << dir << " step " << t;
      }
    }
    r.logits.push_back(logits.clone());
  }
  return r;
}

TEST(LmGolden, EveryCaseFromSafetensorsAndPytorchBin) {
  auto cases = golden_cases("lm_");
  ASSERT_FALSE(cases.empty()) << "no lm_* cases in " << golden_dir() << " (set MAMBA3_GOLDEN_DIR)";
  for (const auto& dir : cases) {
    SCOPED_TRACE(dir.string());
    LanguageModel model = LanguageModel::load(dir.string());
    Result a = run_case(model, dir);
    std::printf("  %-14s safetensors         worst rel L2 %.2e\n", dir.filename().c_str(), a.worst);
    const auto bin = dir / "pytorch_model.bin";
    if (!std::filesystem::exists(bin)) continue;
    TensorMap w;
    for (auto& [name, t] : read_torch_checkpoint(bin.string())) w[name] = t;
    LanguageModel from_bin(ModelConfig::load((dir / "config.json").string()), w, bin.string());
    Result b = run_case(from_bin, dir);
    ASSERT_EQ(a.logits.size(), b.logits.size());
    for (size_t i = 0; i < a.logits.size(); ++i)
      EXPECT_EQ(rel_l2(a.logits[i], b.logits[i]), 0.0) << "safetensors vs pytorch_model.bin logits differ";
    std::printf("  %-14s pytorch_model.bin   identical logits\n", dir.filename().c_str());
  }
}

// Weights stored as bf16 or f16 on disk load (widened to f32) and stay within the bf16 tolerance of the golden
// README; the same greedy continuation comes out.
TEST(LmGolden, HalfPrecisionCheckpointsLoad) {
  auto cases = golden_cases("lm_");
  ASSERT_FALSE(cases.empty());
  for (const auto& dir : cases) {
    Weights w = load_weights(dir.string());
    for (DType dt : {DType::BF16, DType::F16}) {
      TensorMap half;
      for (const auto& [name, t] : w.tensors()) half[name] = t.to(dt);
      const auto file = std::filesystem::temp_directory_path() / "mamba3_half.safetensors";
      NamedTensors named(half.begin(), half.end());
      write_safetensors(file.string(), named);
      auto reread = SafetensorsFile::open(file.string());
      LanguageModel m(ModelConfig::load((dir / "config.json").string()), reread.tensors(), file.string());
      std::filesystem::remove(file);
      auto expected = SafetensorsFile::open((dir / "expected.safetensors").string());
      std::ifstream pj(dir / "prompt.json");
      auto inputs = read_ids(nlohmann::json::parse(pj)["input_ids"]);
      ModelCache cache = m.new_cache(1);
      Tensor logits = m.prefill(inputs[0], cache, 0, true);
      const double e = rel_l2(logits, logits_at(expected.get("prefill_logits_f64"), 0, 0, int64_t(inputs[0].size())));
      EXPECT_LE(e, 2e-2) << dir << " " << dtype_name(dt);
      EXPECT_GT(e, 0.0) << dir << ": rounding to " << dtype_name(dt) << " should change something";
    }
  }
}

}  // namespace
}  // namespace mamba3::test
