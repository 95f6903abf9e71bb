// ModelCache rows joining and leaving a batch (continuous batching): a row's logits after append/remove_row are
// bit-identical to that sequence decoded alone, on every golden model kind (SISO+MLP, MIMO, hybrid attention).
#include <gtest/gtest.h>

#include <cstring>

#include "model/language_model.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

class CacheRows : public ::testing::TestWithParam<const char*> {};

std::vector<float> row_of(const Tensor& logits, int64_t r) {
  const int64_t V = logits.dim(1);
  return std::vector<float>(logits.data<float>() + r * V, logits.data<float>() + (r + 1) * V);
}

TEST_P(CacheRows, AppendAndRemoveKeepEveryRowExact) {
  const auto dir = golden_dir() / GetParam();
  ASSERT_TRUE(std::filesystem::exists(dir)) << dir << " missing (set MAMBA3_GOLDEN_DIR)";
  LanguageModel m = LanguageModel::load(dir.string());
  const int64_t Vp = m.config().vocab_padded();
  // Four sequences with different prompts, each prefilled into its own 1-row cache.
  std::vector<std::vector<int64_t>> prompts = {{1, 2, 3}, {7, 8, 9, 10, 11}, {42}, {99, 5, 17, 23}};
  std::vector<ModelCache> alone;
  for (auto& p : prompts) {
    alone.push_back(m.new_cache(1));
    m.prefill(p, alone.back(), 0);
  }
  ModelCache batch = alone[0].clone();
  for (size_t i = 1; i < alone.size(); ++i) batch.append(alone[i]);
  EXPECT_EQ(batch.batch(), 4);
  EXPECT_EQ(batch.position(1), 5);
  EXPECT_GE(batch.capacity(), 4);
  std::vector<int64_t> who = {0, 1, 2, 3};  // which sequence each batch row holds
  std::vector<int64_t> next = {4, 12, 43, 24};
  auto check_step = [&](const char* when) {
    Tensor lb = Tensor::empty(DType::F32, {batch.batch(), Vp});
    std::vector<int64_t> ids;
    for (int64_t s : who) ids.push_back(next[size_t(s)]);
    m.step(ids, batch, lb);
    for (int64_t r = 0; r < batch.batch(); ++r) {
      const int64_t s = who[size_t(r)];
      Tensor la = Tensor::empty(DType::F32, {1, Vp});
      m.step(std::vector<int64_t>{next[size_t(s)]}, alone[size_t(s)], la);
      EXPECT_EQ(row_of(lb, r), row_of(la, 0)) << when << ": sequence " << s << " in row " << r;
      EXPECT_EQ(batch.position(r), alone[size_t(s)].position(0)) << when;
      next[size_t(s)] = (next[size_t(s)] * 7 + 3) % 256;
    }
  };
  check_step("after append");
  batch.remove_row(1);  // sequence 3 moves into row 1
  who = {0, 3, 2};
  check_step("after removing a middle row");
  batch.remove_row(2);  // the last row: nothing moves
  who = {0, 3};
  check_step("after removing the last row");
  // A newcomer joins into spare capacity, after others left.
  std::vector<int64_t> p5 = {200, 201, 202};
  alone.push_back(m.new_cache(1));
  m.prefill(p5, alone.back(), 0);
  next.push_back(203);
  batch.append(alone.back());
  who = {0, 3, 4};
  check_step("after a newcomer joined");
  check_step("one more step");
  // Emptying the batch is allowed; a tight copy of a grown cache stays exact.
  ModelCache copy = batch.clone();
  EXPECT_EQ(copy.capacity(), copy.batch());
  while (batch.batch() > 0) batch.remove_row(0);
  EXPECT_EQ(batch.batch(), 0);
  EXPECT_THROW(batch.remove_row(0), Error);
}

TEST_P(CacheRows, ReserveAndMismatchedModels) {
  LanguageModel m = LanguageModel::load((golden_dir() / GetParam()).string());
  ModelCache c = m.new_cache(2);
  c.reserve(16);
  EXPECT_EQ(c.capacity(), 16);
  EXPECT_EQ(c.batch(), 2);
  const char* other = std::string(GetParam()) == "lm_mimo" ? "lm_siso_mlp" : "lm_mimo";
  LanguageModel m2 = LanguageModel::load((golden_dir() / other).string());
  EXPECT_THROW(c.append(m2.new_cache(1)), Error);
}

INSTANTIATE_TEST_SUITE_P(Golden, CacheRows, ::testing::Values("lm_siso_mlp", "lm_mimo", "lm_hybrid"));

}  // namespace
}  // namespace mamba3::test
