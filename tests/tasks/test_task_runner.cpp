// Short CPU runs of every state-tracking task through run_task (seconds): the loss falls, the run is a pure function
// of its options (same seed, same losses and accuracies; another seed differs), the evaluation counts what it
// says, the result JSON and the accuracy plot hold what they should, and bad options are rejected. (Whether the
// tasks are learned is measured by the real runs of docs/state_tracking.md: minutes, not seconds.)
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "model/language_model.h"
#include "tasks/accuracy_plot.h"
#include "tasks/task_runner.h"

namespace mamba3::tasks {
namespace {

ModelConfig tiny_config(bool no_rotary = false, bool euler = false) {
  nlohmann::json j = {{"d_model", 32},
                      {"n_layer", 1},
                      {"vocab_size", kVocabSize},
                      {"ssm_cfg",
                       {{"layer", "Mamba3"},
                        {"d_state", 16},
                        {"headdim", 16},
                        {"rope_fraction", 1.0},
                        {"chunk_size", 16},
                        {"A_activation", "softplus"},
                        {"no_rotary", no_rotary},
                        {"euler", euler}}}};
  return ModelConfig::from_json(j, "tiny task model");
}

TaskTrainOptions smoke_options() {
  TaskTrainOptions o;
  o.steps = 30, o.batch = 8, o.lr = 5e-3, o.warmup = 5, o.eval_samples = 16, o.log_every = 5;
  o.test_lengths = {8, 24};
  return o;
}

TEST(TaskRunner, SmokeEveryTask) {
  for (const std::string& name : task_names()) {
    SCOPED_TRACE(name);
    const TaskSpec spec = task_spec(name);
    const ModelConfig c = tiny_config();
    const TaskRunResult r = run_task(spec, c, smoke_options());
    ASSERT_EQ(r.records.size(), 6u);
    for (const StepRecord& s : r.records) EXPECT_TRUE(std::isfinite(s.loss));
    EXPECT_LT(r.records.back().loss, r.records.front().loss) << "the loss must fall";
    ASSERT_EQ(r.accuracy.size(), 2u);
    EXPECT_EQ(r.accuracy[0].length, spec.valid_length(8));
    EXPECT_EQ(r.accuracy[1].length, spec.valid_length(24));
    for (const LengthAccuracy& a : r.accuracy) {
      EXPECT_EQ(a.samples, 16);
      EXPECT_GE(a.correct, 0);
      EXPECT_LE(a.correct, 16);
    }
    const nlohmann::json j = task_result_json(spec, c, smoke_options(), r, "cpu", 1);
    EXPECT_EQ(j["task"], name);
    EXPECT_EQ(j["accuracy"].size(), 2u);
    EXPECT_EQ(j["accuracy"][1]["correct"], r.accuracy[1].correct);
    EXPECT_EQ(j["model_config"], c.to_json());
    EXPECT_EQ(j["device"], "cpu");
  }
}

TEST(TaskRunner, DeterministicGivenTheSeed) {
  const TaskSpec spec = task_spec("mod_arith");
  TaskTrainOptions o = smoke_options();
  o.steps = 10;
  const ModelConfig c = tiny_config(false, true);
  const TaskRunResult a = run_task(spec, c, o), b = run_task(spec, c, o);
  o.seed = 1;
  const TaskRunResult d = run_task(spec, c, o);
  ASSERT_EQ(a.records.size(), b.records.size());
  for (size_t i = 0; i < a.records.size(); ++i) EXPECT_EQ(a.records[i].loss, b.records[i].loss);
  for (size_t i = 0; i < a.accuracy.size(); ++i) EXPECT_EQ(a.accuracy[i].correct, b.accuracy[i].correct);
  EXPECT_NE(a.records.back().loss, d.records.back().loss);
}

// evaluate_task counts exactly the examples whose answer is the argmax over the answer ids at '=': recount here
// with the same test examples and the model's logits.
TEST(TaskRunner, EvaluationCountsArgmaxAtEquals) {
  const TaskSpec spec = task_spec("mod_arith_brackets");
  const ModelConfig c = tiny_config(true, false);
  TaskTrainOptions o = smoke_options();
  const TaskRunResult r = run_task(spec, c, o);
  const LanguageModel m(c, r.params, "recount");
  for (const LengthAccuracy& a : r.accuracy) {
    int64_t correct = 0;
    for (int64_t i = 0; i < a.samples; ++i) {
      TaskRng rng = TaskRng::stream(o.eval_seed, uint64_t(a.length), uint64_t(i));
      const Example ex = generate_example(spec, a.length, rng);
      ModelCache cache = m.new_cache(1);
      const Tensor all = m.prefill(ex.ids, cache, 0, true);  // (L, V_pad): the last row is the output at '='
      const float* l = all.data<float>() + (int64_t(ex.ids.size()) - 1) * c.vocab_padded();
      int64_t best = 0;
      for (int64_t k = 0; k < spec.classes; ++k)
        if (l[k] > l[best]) best = k;
      correct += best == ex.answer;
    }
    EXPECT_EQ(correct, a.correct) << "length " << a.length;
  }
}

TEST(TaskRunner, BadOptionsAndConfigs) {
  const TaskSpec spec = task_spec("parity");
  TaskTrainOptions o = smoke_options();
  o.steps = 0;
  EXPECT_THROW(run_task(spec, tiny_config(), o), Error);
  o = smoke_options();
  o.test_lengths = {0};
  EXPECT_THROW(run_task(spec, tiny_config(), o), Error);
  nlohmann::json j = tiny_config().to_json();
  j["vocab_size"] = 8;
  EXPECT_THROW(run_task(spec, ModelConfig::from_json(j, "small vocab"), smoke_options()), Error);
}

TEST(TaskRunner, AccuracyPlot) {
  const std::string svg = accuracy_plot_svg({{"Mamba-3", {{40, 1.0}, {64, 0.98}, {256, 0.5}}},
                                             {"no <rotary>", {{40, 0.6}, {64, 0.5}, {256, 0.5}}}},
                                            "task parity", 0.5, 40);
  EXPECT_NE(svg.find("<svg"), std::string::npos);
  EXPECT_NE(svg.find("no &lt;rotary&gt;"), std::string::npos);
  EXPECT_NE(svg.find("length 256, 50.0%"), std::string::npos);
  EXPECT_NE(svg.find("longest training length"), std::string::npos);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
}

}  // namespace
}  // namespace mamba3::tasks

namespace mamba3::tasks {
namespace {

TEST(TaskRunner, CurriculumGrowsTheLongestTrainingLength) {
  const TaskSpec spec = task_spec("mod_arith_brackets");
  ASSERT_LT(spec.train_min, spec.train_max);
  EXPECT_EQ(curriculum_max_length(spec, 0, 0), spec.train_max);  // off
  EXPECT_EQ(curriculum_max_length(spec, 0, 100), spec.train_min + (spec.train_max - spec.train_min) / 100);
  EXPECT_EQ(curriculum_max_length(spec, 99, 100), spec.train_max);
  EXPECT_EQ(curriculum_max_length(spec, 5000, 100), spec.train_max);
  int64_t last = 0;
  for (int64_t s = 0; s < 100; ++s) {
    const int64_t m = curriculum_max_length(spec, s, 100);
    EXPECT_GE(m, spec.train_min);
    EXPECT_LE(m, spec.train_max);
    EXPECT_GE(m, last) << "step " << s;
    last = m;
  }
  EXPECT_LT(curriculum_max_length(spec, 10, 100), spec.train_max / 2);
  TaskTrainOptions o;
  o.curriculum = -1;
  EXPECT_THROW(o.validate(), Error);
}

}  // namespace
}  // namespace mamba3::tasks
