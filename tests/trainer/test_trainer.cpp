// The training loop on a small differentiable problem (a bigram softmax regression whose parameters live in a
// TensorMap, standing in for the language model): it learns, logs, evaluates and checkpoints; accumulation equals a
// bigger batch; an interrupted and resumed run repeats the uninterrupted loss sequence exactly; bad input fails
// before the first step.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "train/checkpoint.h"
#include "train/trainer.h"

namespace mamba3 {
namespace {

namespace fs = std::filesystem;
constexpr int64_t kVocab = 16;

ModelConfig tiny_config() {
  const nlohmann::json j = {{"d_model", 16}, {"d_intermediate", 0}, {"n_layer", 1}, {"vocab_size", kVocab},
                            {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 8}, {"chunk_size", 8}}}};
  return ModelConfig::from_json(j, "tiny test config");
}

// logits(x) = W[x] + b; mean cross-entropy of every next token; exact gradients. Counts its calls.
struct Bigram {
  int64_t calls = 0;
  double operator()(const ModelConfig&, const TensorMap& p, const int64_t* tokens, int64_t B, int64_t L,
                    TensorMap* grads) {
    ++calls;
    const float* W = p.at("bigram.weight").data<float>();
    const float* bias = p.at("bigram.bias").data<float>();
    float *gW = nullptr, *gb = nullptr;
    if (grads) {
      (*grads)["bigram.weight"] = Tensor::zeros(DType::F32, {kVocab, kVocab});
      (*grads)["bigram.bias"] = Tensor::zeros(DType::F32, {kVocab});
      gW = (*grads)["bigram.weight"].data<float>();
      gb = (*grads)["bigram.bias"].data<float>();
    }
    const double n = double(B * L);
    double loss = 0;
    for (int64_t r = 0; r < B; ++r)
      for (int64_t t = 0; t < L; ++t) {
        const int64_t x = tokens[r * (L + 1) + t], y = tokens[r * (L + 1) + t + 1];
        double logits[kVocab], mx = -1e300, sum = 0;
        for (int64_t v = 0; v < kVocab; ++v) mx = std::max(mx, logits[v] = double(W[x * kVocab + v]) + bias[v]);
        for (int64_t v = 0; v < kVocab; ++v) sum += std::exp(logits[v] - mx);
        loss += (mx + std::log(sum) - logits[y]) / n;
        if (!gW) continue;
        for (int64_t v = 0; v < kVocab; ++v) {
          const double g = (std::exp(logits[v] - mx) / sum - (v == y)) / n;
          gW[x * kVocab + v] += float(g);
          gb[v] += float(g);
        }
      }
    return loss;
  }
};

TensorMap bigram_init() {
  TensorMap p{{"bigram.weight", Tensor::zeros(DType::F32, {kVocab, kVocab})},
              {"bigram.bias", Tensor::zeros(DType::F32, {kVocab})}};
  for (int64_t i = 0; i < kVocab * kVocab; ++i) p["bigram.weight"].data<float>()[i] = float((i * 37 % 11) - 5) * 0.01f;
  return p;
}

// A mostly deterministic successor rule with some noise, so the loss has something to learn and a floor.
TokenData bigram_data() {
  TokenData d;
  d.vocab_size = kVocab;
  d.source = "bigram data";
  uint32_t x = 1, noise = 7;
  for (int i = 0; i < 4000; ++i) {
    noise = noise * 1103515245u + 12345u;
    x = (noise >> 16) % 5 == 0 ? (noise >> 20) % kVocab : (x * 3 + 1) % kVocab;
    (i < 3600 ? d.train : d.val).push_back(x);
  }
  return d;
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mamba3_trainer_loop_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  TrainJob job(const std::string& name, Bigram& loss) {
    TrainJob j;
    j.config = tiny_config();
    j.params = bigram_init();
    j.data = &data_;
    j.options.steps = 10;
    j.options.batch = 4;
    j.options.seq_len = 12;
    j.options.lr = 0.05;
    j.options.warmup = 2;
    j.options.eval_every = 3;
    j.options.eval_windows = 8;
    j.options.save_every = 4;
    j.options.seed = 11;
    j.out_dir = (dir_ / name).string();
    j.loss = [&loss](const ModelConfig& c, const TensorMap& p, const int64_t* t, int64_t B, int64_t L,
                     TensorMap* g) { return loss(c, p, t, B, L, g); };
    return j;
  }
  fs::path dir_;
  TokenData data_ = bigram_data();
};

TEST_F(TrainerTest, LearnsLogsEvaluatesAndCheckpoints) {
  Bigram loss;
  TrainJob j = job("run", loss);
  j.options.steps = 60;
  j.options.eval_every = 20;
  j.options.save_every = 0;
  const TrainResult r = train(j);
  ASSERT_EQ(r.records.size(), 60u);
  EXPECT_LT(r.records.back().loss, r.records.front().loss - 1.0);
  EXPECT_LT(*r.records.back().val_loss, std::log(double(kVocab)) - 1.0);
  const auto log = read_train_log(j.out_dir + "/log.jsonl");
  ASSERT_EQ(log.size(), 60u);
  std::ifstream in(j.out_dir + "/log.jsonl");
  std::string first;
  std::getline(in, first);
  const auto first_json = nlohmann::json::parse(first);
  for (const char* key : {"step", "loss", "lr", "tokens_per_s"}) EXPECT_TRUE(first_json.contains(key)) << key;
  EXPECT_FALSE(first_json.contains("val_loss"));
  int evaluated = 0;
  for (const StepRecord& s : log) {
    evaluated += s.val_loss.has_value();
    EXPECT_EQ(s.val_loss.has_value(), s.step % 20 == 0) << s.step;
  }
  EXPECT_EQ(evaluated, 3);
  for (const char* f : {"config.json", "model.safetensors", "trainer_state.safetensors", "loss.svg"})
    EXPECT_TRUE(fs::exists(j.out_dir + "/" + f)) << f;
  std::ifstream svg(j.out_dir + "/loss.svg");
  const std::string text((std::istreambuf_iterator<char>(svg)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text.rfind("<svg", 0), 0u);
  EXPECT_NE(text.find("<polyline"), std::string::npos);
  EXPECT_NE(text.find("validation loss"), std::string::npos);
  const Checkpoint ck = load_checkpoint(j.out_dir);
  EXPECT_EQ(ck.step, 60);
  EXPECT_EQ(ck.params.at("bigram.bias").data<float>()[3], r.params.at("bigram.bias").data<float>()[3]);
}

TEST_F(TrainerTest, AccumulationEqualsABiggerBatch) {
  Bigram l1, l2;
  TrainJob big = job("big", l1), acc = job("acc", l2);
  big.options.batch = 4;
  acc.options.batch = 2;
  acc.options.accum = 2;
  const TrainResult a = train(big), b = train(acc);
  ASSERT_EQ(a.records.size(), b.records.size());
  for (size_t i = 0; i < a.records.size(); ++i) {
    EXPECT_NEAR(a.records[i].loss, b.records[i].loss, 1e-6) << i;
    EXPECT_NEAR(a.records[i].grad_norm, b.records[i].grad_norm, 1e-6) << i;
  }
  const Tensor &wa = a.params.at("bigram.weight"), &wb = b.params.at("bigram.weight");
  for (int64_t i = 0; i < wa.numel(); ++i) ASSERT_NEAR(wa.data<float>()[i], wb.data<float>()[i], 1e-5) << i;
  EXPECT_EQ(l2.calls, 2 * l1.calls);  // twice the loss calls of half the size
}

TEST_F(TrainerTest, ResumeAfterInterruptRepeatsTheLossSequence) {
  Bigram l1, l2, l3;
  for (const char* schedule : {"cosine", "wsd"}) {
    TrainJob full = job(std::string("full_") + schedule, l1);
    full.options.schedule = schedule;
    const TrainResult whole = train(full);

    TrainJob first = job(std::string("cut_") + schedule, l2);
    first.options.schedule = schedule;
    first.stop_after = 6;  // "killed" after step 6: the last checkpoint is step 4, the log runs to 6
    train(first);
    TrainJob second = job(std::string("cut_") + schedule, l3);
    second.options.schedule = schedule;
    second.params.clear();  // the checkpoint's weights are used
    second.resume = true;
    const TrainResult resumed = train(second);
    ASSERT_EQ(resumed.first_step, 4);
    ASSERT_EQ(resumed.records.size(), 6u);
    for (size_t i = 0; i < resumed.records.size(); ++i) {
      const StepRecord &a = whole.records[i + 4], &b = resumed.records[i];
      EXPECT_EQ(a.step, b.step);
      EXPECT_EQ(a.loss, b.loss) << "step " << a.step;  // bit-identical
      EXPECT_EQ(a.lr, b.lr);
      EXPECT_EQ(a.grad_norm, b.grad_norm);
      EXPECT_EQ(a.val_loss, b.val_loss);
    }
    for (const auto& [name, t] : whole.params)
      for (int64_t i = 0; i < t.numel(); ++i)
        ASSERT_EQ(t.data<float>()[i], resumed.params.at(name).data<float>()[i]) << name;
    // The log of the resumed run reads like the uninterrupted one (steps 5, 6 replaced, not duplicated).
    const auto la = read_train_log(full.out_dir + "/log.jsonl"), lb = read_train_log(second.out_dir + "/log.jsonl");
    ASSERT_EQ(la.size(), lb.size());
    for (size_t i = 0; i < la.size(); ++i) {
      EXPECT_EQ(la[i].step, lb[i].step);
      EXPECT_EQ(la[i].loss, lb[i].loss);
      EXPECT_EQ(la[i].val_loss, lb[i].val_loss);
    }
  }
}

std::string error_of(const TrainJob& j) {
  try {
    train(j);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST_F(TrainerTest, BadInputFailsBeforeTheFirstStep) {
  Bigram loss;
  {  // ids ≥ the model's vocabulary
    TokenData bad = data_;
    bad.train[100] = kVocab;
    TrainJob j = job("vocab", loss);
    j.data = &bad;
    EXPECT_NE(error_of(j).find("≥ the model's vocab_size 16"), std::string::npos) << error_of(j);
  }
  {  // too short for one window
    TokenData small;
    small.source = "small";
    small.train = {1, 2, 3};
    small.val = {1, 2, 3};
    TrainJob j = job("short", loss);
    j.data = &small;
    EXPECT_NE(error_of(j).find("too few for one window"), std::string::npos) << error_of(j);
  }
  {  // non-writable output directory: a path below a regular file
    fs::create_directories(dir_);
    std::ofstream(dir_ / "file") << "x";
    TrainJob j = job("file/sub", loss);
    EXPECT_NE(error_of(j).find("cannot be created"), std::string::npos) << error_of(j);
  }
  {
    TrainJob j = job("opts", loss);
    j.options.steps = 0;
    EXPECT_NE(error_of(j).find("--steps"), std::string::npos);
    j.options.steps = 5;
    j.options.schedule = "linear";
    EXPECT_NE(error_of(j).find("unknown learning-rate schedule"), std::string::npos);
  }
  {
    TrainJob j = job("noresume", loss);
    j.resume = true;
    EXPECT_NE(error_of(j).find("no checkpoint to resume"), std::string::npos) << error_of(j);
  }
  EXPECT_EQ(loss.calls, 0);  // none of these reached a step
  {  // a fresh run never overwrites a checkpoint
    TrainJob j = job("twice", loss);
    j.options.steps = 2;
    train(j);
    EXPECT_NE(error_of(j).find("already holds a checkpoint"), std::string::npos);
  }
}

}  // namespace
}  // namespace mamba3
