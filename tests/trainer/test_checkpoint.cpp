// Checkpoints: the official layout (config.json + model.safetensors, tied lm_head left out) loads with
// LanguageModel::load and computes what the in-memory weights compute; optimizer state, step and options round-trip;
// a torn checkpoint is refused.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/init_weights.h"
#include "model/language_model.h"
#include "train/checkpoint.h"

namespace mamba3 {
namespace {

namespace fs = std::filesystem;

ModelConfig config(bool tied) {
  const nlohmann::json j = {{"d_model", 32},
                            {"d_intermediate", 48},
                            {"n_layer", 2},
                            {"vocab_size", 50},
                            {"tie_embeddings", tied},
                            {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 8}, {"chunk_size", 8}}}};
  return ModelConfig::from_json(j, "checkpoint test config");
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mamba3_trainer_ckpt_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

void expect_same_logits(const LanguageModel& a, const LanguageModel& b) {
  const std::vector<int64_t> ids = {3, 1, 4, 1, 5, 9, 2, 6, 49, 0};
  ModelCache ca = a.new_cache(1), cb = b.new_cache(1);
  const Tensor la = a.prefill(ids, ca, 0, true), lb = b.prefill(ids, cb, 0, true);
  ASSERT_EQ(la.shape(), lb.shape());
  for (int64_t i = 0; i < la.numel(); ++i) ASSERT_EQ(la.data<float>()[i], lb.data<float>()[i]) << i;
}

TEST_F(CheckpointTest, OfficialLayoutLoadsWithLanguageModel) {
  for (bool tied : {true, false}) {
    const std::string dir = (dir_ / (tied ? "tied" : "untied")).string();
    const ModelConfig c = config(tied);
    TensorMap params = init_weights(c, 7);
    if (tied) params["lm_head.weight"] = params.at("backbone.embedding.weight");  // must not be stored twice
    AdamW opt(AdamWConfig{}, params);
    save_checkpoint(dir, c, params, opt, 3, {{"seed", 7}});
    const SafetensorsFile f = SafetensorsFile::open(dir + "/model.safetensors");
    EXPECT_TRUE(f.has("backbone.embedding.weight"));
    EXPECT_EQ(f.has("lm_head.weight"), !tied);
    EXPECT_EQ(f.metadata().at("format"), "pt");
    const LanguageModel loaded = LanguageModel::load(dir);
    if (tied) params.erase("lm_head.weight");
    const LanguageModel direct(c, params, "memory");
    expect_same_logits(loaded, direct);
  }
}

TEST_F(CheckpointTest, RoundTripOfWeightsOptimizerStepAndOptions) {
  const ModelConfig c = config(true);
  TensorMap params = init_weights(c, 1);
  AdamW opt(AdamWConfig{}, params);
  TensorMap grads;
  for (const auto& [name, p] : params) {
    grads[name] = Tensor::zeros(DType::F32, p.shape());
    for (int64_t i = 0; i < p.numel(); ++i) grads[name].data<float>()[i] = float((i % 7) - 3) * 0.01f;
  }
  opt.step(params, grads, 1e-3);
  opt.step(params, grads, 1e-3);
  const nlohmann::json options = {{"lr", 0.001}, {"seed", 1}};
  save_checkpoint(dir_.string(), c, params, opt, 2, options);
  const Checkpoint ck = load_checkpoint(dir_.string());
  EXPECT_EQ(ck.step, 2);
  EXPECT_EQ(ck.optimizer_steps, 2);
  EXPECT_EQ(ck.options, options);
  EXPECT_EQ(ck.config.to_json(), c.to_json());
  ASSERT_EQ(ck.params.size(), params.size());
  for (const auto& [name, p] : params)
    for (int64_t i = 0; i < p.numel(); ++i) ASSERT_EQ(ck.params.at(name).data<float>()[i], p.data<float>()[i]);
  // Restored moments give the same next step as the original optimizer.
  AdamW restored(AdamWConfig{}, ck.params);
  restored.load_state(ck.optimizer_tensors, ck.optimizer_steps, "test");
  TensorMap pa = params, pb = ck.params;
  for (auto& [n, t] : pa) t = t.clone();
  opt.step(pa, grads, 1e-3);
  restored.step(pb, grads, 1e-3);
  for (const auto& [name, p] : pa)
    for (int64_t i = 0; i < p.numel(); ++i) ASSERT_EQ(pb.at(name).data<float>()[i], p.data<float>()[i]) << name;
}

TEST_F(CheckpointTest, TornCheckpointIsRefused) {
  const ModelConfig c = config(true);
  const TensorMap params = init_weights(c, 1);
  AdamW opt(AdamWConfig{}, params);
  save_checkpoint((dir_ / "a").string(), c, params, opt, 3, nlohmann::json::object());
  save_checkpoint((dir_ / "b").string(), c, params, opt, 5, nlohmann::json::object());
  fs::copy_file(dir_ / "b/model.safetensors", dir_ / "a/model.safetensors", fs::copy_options::overwrite_existing);
  try {
    load_checkpoint((dir_ / "a").string());
    FAIL() << "a torn checkpoint was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("interrupted while saving"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_checkpoint((dir_ / "none").string()), Error);
}

TEST_F(CheckpointTest, OutputDirectoryChecks) {
  EXPECT_NO_THROW(prepare_output_dir((dir_ / "new/nested").string()));
  EXPECT_TRUE(fs::is_directory(dir_ / "new/nested"));
  EXPECT_TRUE(fs::is_empty(dir_ / "new/nested"));  // the probe is gone
  std::ofstream(dir_ / "plain") << "x";
  EXPECT_THROW(prepare_output_dir((dir_ / "plain").string()), Error);
  EXPECT_THROW(prepare_output_dir((dir_ / "plain/sub").string()), Error);
}

}  // namespace
}  // namespace mamba3
