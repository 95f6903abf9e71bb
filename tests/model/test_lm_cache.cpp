// The model cache through the public API, on a golden hybrid model (Mamba-3 + attention + MLP): fork, save/load
// and clone continue exactly as if nothing had happened; rows of a batch do not interact; bad cache files fail.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "model/language_model.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

namespace fs = std::filesystem;

fs::path model_dir(const char* name) {
  fs::path p = golden_dir() / name;
  if (!fs::exists(p)) ADD_FAILURE() << "golden model " << p << " not found (set MAMBA3_GOLDEN_DIR)";
  return p;
}

// Greedy continuation of `n` tokens for every row, returning all logits produced.
std::vector<Tensor> continue_greedy(const LanguageModel& m, ModelCache& cache, std::vector<int64_t> last, int n) {
  std::vector<Tensor> out;
  const int64_t B = cache.batch(), V = m.config().vocab_padded();
  for (int i = 0; i < n; ++i) {
    Tensor logits = Tensor::empty(DType::F32, {B, V});
    m.step(last, cache, logits);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = logits.data<float>() + b * V;
      last[size_t(b)] = int64_t(std::max_element(row, row + m.config().vocab_size) - row);
    }
    out.push_back(logits);
  }
  return out;
}

class LmCache : public ::testing::TestWithParam<const char*> {};

TEST_P(LmCache, SaveLoadForkAndCloneContinueExactly) {
  LanguageModel m = LanguageModel::load(model_dir(GetParam()).string());
  const std::vector<int64_t> prompt = {5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13};
  ModelCache cache = m.new_cache(1);
  m.prefill(prompt, cache, 0);
  ModelCache cloned = cache.clone();
  const fs::path file = fs::temp_directory_path() / ("mamba3_cache_test_" + std::string(GetParam()) + ".safetensors");
  cache.save(file.string());
  ModelCache restored = ModelCache::load(file.string(), m.config());
  fs::remove(file);
  EXPECT_EQ(restored.nbytes(), cache.nbytes());
  EXPECT_EQ(restored.position(0), int64_t(prompt.size()));
  ModelCache forked = cache.fork(0, 3);

  auto base = continue_greedy(m, cache, {1}, 6);
  auto again = continue_greedy(m, restored, {1}, 6);
  auto from_clone = continue_greedy(m, cloned, {1}, 6);
  auto from_fork = continue_greedy(m, forked, {1, 1, 1}, 6);
  for (size_t i = 0; i < base.size(); ++i) {
    EXPECT_EQ(rel_l2(again[i], base[i]), 0.0) << "restored cache, step " << i;
    EXPECT_EQ(rel_l2(from_clone[i], base[i]), 0.0) << "cloned cache, step " << i;
    for (int64_t r = 0; r < 3; ++r)
      EXPECT_EQ(rel_l2(from_fork[i].slice(r, r + 1), base[i]), 0.0) << "fork row " << r << ", step " << i;
  }
}

TEST_P(LmCache, BatchedRowsMatchSingleRows) {
  LanguageModel m = LanguageModel::load(model_dir(GetParam()).string());
  const std::vector<std::vector<int64_t>> prompts = {{1, 2, 3}, {40, 41, 42, 43, 44, 45, 46, 47}, {9}};
  ModelCache batch = m.new_cache(3);
  for (int64_t b = 0; b < 3; ++b) m.prefill(prompts[size_t(b)], batch, b);
  auto together = continue_greedy(m, batch, {4, 5, 6}, 4);
  for (int64_t b = 0; b < 3; ++b) {
    ModelCache single = m.new_cache(1);
    m.prefill(prompts[size_t(b)], single, 0);
    auto alone = continue_greedy(m, single, {4 + b}, 4);
    for (size_t i = 0; i < alone.size(); ++i)
      EXPECT_LE(rel_l2(together[i].slice(b, b + 1), alone[i]), 1e-6) << "row " << b << " step " << i;
  }
}

TEST_P(LmCache, BadInputsAreClearErrors) {
  LanguageModel m = LanguageModel::load(model_dir(GetParam()).string());
  ModelCache cache = m.new_cache(2);
  auto err = [](auto fn) -> std::string {
    try {
      fn();
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  using ::testing::HasSubstr;
  EXPECT_THAT(err([&] { m.prefill(std::vector<int64_t>{}, cache, 0); }), HasSubstr("prompt is empty"));
  EXPECT_THAT(err([&] { m.prefill(std::vector<int64_t>{1, m.config().vocab_size}, cache, 0); }),
              HasSubstr("outside the vocabulary"));
  EXPECT_THAT(err([&] { m.prefill(std::vector<int64_t>{1, -1}, cache, 0); }), HasSubstr("token id -1 at position 1"));
  EXPECT_THAT(err([&] { m.prefill(std::vector<int64_t>{1}, cache, 2); }), HasSubstr("row 2"));
  Tensor logits = Tensor::empty(DType::F32, {2, m.config().vocab_padded()});
  EXPECT_THAT(err([&] { m.step(std::vector<int64_t>{1}, cache, logits); }), HasSubstr("1 ids for a cache of 2 rows"));
  const fs::path file = fs::temp_directory_path() / "mamba3_cache_bad.safetensors";
  cache.save(file.string());
  ModelConfig other = m.config();
  other.d_model += 8;
  EXPECT_THAT(err([&] { ModelCache::load(file.string(), other); }), HasSubstr("another configuration"));
  fs::remove(file);
}

INSTANTIATE_TEST_SUITE_P(Golden, LmCache, ::testing::Values("lm_hybrid", "lm_mimo", "lm_siso_mlp"));

}  // namespace
}  // namespace mamba3::test
