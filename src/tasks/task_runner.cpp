#include "tasks/task_runner.h"

#include <chrono>
#include <cmath>

#include "core/error.h"
#include "model/init_weights.h"
#include "model/language_model.h"
#include "train/lm_gradients.h"
#include "train/optimizer.h"

namespace mamba3::tasks {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

void TaskTrainOptions::validate() const {
  MAMBA3_CHECK(steps >= 1, "--steps must be ≥ 1 (got {})", steps);
  MAMBA3_CHECK(batch >= 1, "--batch must be ≥ 1 (got {})", batch);
  MAMBA3_CHECK(std::isfinite(lr) && lr > 0, "--lr must be > 0 (got {})", lr);
  MAMBA3_CHECK(min_lr_ratio >= 0 && min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1] (got {})", min_lr_ratio);
  MAMBA3_CHECK(warmup >= 0, "--warmup must be ≥ 0 (got {})", warmup);
  MAMBA3_CHECK(weight_decay >= 0, "--weight-decay must be ≥ 0 (got {})", weight_decay);
  MAMBA3_CHECK(clip >= 0, "--clip must be ≥ 0 (got {})", clip);
  MAMBA3_CHECK(eval_samples >= 1, "--eval-samples must be ≥ 1 (got {})", eval_samples);
  MAMBA3_CHECK(log_every >= 1, "log_every must be ≥ 1 (got {})", log_every);
  MAMBA3_CHECK(curriculum >= 0, "--curriculum must be ≥ 0 steps (got {})", curriculum);
  for (int64_t n : test_lengths) MAMBA3_CHECK(n >= 1, "--test-lengths: {} is not a length (≥ 1)", n);
}

int64_t curriculum_max_length(const TaskSpec& spec, int64_t step, int64_t curriculum) {
  if (curriculum <= 0 || step >= curriculum) return spec.train_max;
  return spec.train_min + (spec.train_max - spec.train_min) * (step + 1) / curriculum;
}

double LengthAccuracy::scaled(int64_t classes) const {
  const double chance = 1.0 / double(classes);
  return (accuracy() - chance) / (1.0 - chance);
}

std::vector<LengthAccuracy> evaluate_task(const TaskSpec& spec, const ModelConfig& config, const TensorMap& params,
                                          const std::vector<int64_t>& lengths, int64_t samples, uint64_t eval_seed) {
  LanguageModel model(config, params, "task " + spec.name);
  std::vector<LengthAccuracy> out;
  for (int64_t requested : lengths) {
    LengthAccuracy acc;
    acc.length = spec.valid_length(requested);
    acc.samples = samples;
    for (int64_t i = 0; i < samples; ++i) {
      TaskRng rng = TaskRng::stream(eval_seed, uint64_t(acc.length), uint64_t(i));
      const Example ex = generate_example(spec, acc.length, rng);
      ModelCache cache = model.new_cache(1);
      const Tensor logits = model.prefill(ex.ids, cache, 0);  // (1, V_pad), the output at '='
      const float* l = logits.data<float>();
      int64_t best = 0;
      for (int64_t k = 1; k < spec.classes; ++k)
        if (l[k] > l[best]) best = k;
      acc.correct += best == ex.answer;
    }
    out.push_back(acc);
  }
  return out;
}

TaskRunResult run_task(const TaskSpec& spec, const ModelConfig& config, const TaskTrainOptions& o) {
  o.validate();
  MAMBA3_CHECK(config.vocab_size >= kVocabSize,
               "task {}: the model's vocab_size {} is smaller than the task vocabulary ({} ids: 0-4 + - * ( ) = ^)",
               spec.name, config.vocab_size, kVocabSize);
  TaskRunResult r;
  r.params = init_weights(config, o.seed);
  AdamW opt({0.9, 0.95, 1e-8, o.weight_decay}, r.params);
  LrSchedule sched;
  sched.peak = o.lr, sched.min_lr_ratio = o.min_lr_ratio, sched.warmup = o.warmup, sched.total = o.steps;
  std::unique_ptr<TrainEngine> engine =
      o.engine ? o.engine(config, r.params, opt)
               : cpu_train_engine(config, r.params, opt, lm_loss_and_grad, lm_loss_and_grad_labels);
  std::vector<int64_t> inputs, labels;
  const auto t0 = std::chrono::steady_clock::now();
  double window_loss = 0, window_norm = 0;
  int64_t window = 0;
  for (int64_t step = 0; step < o.steps; ++step) {
    TaskRng len_rng = TaskRng::stream(o.seed, uint64_t(step), 0xffffffffULL);
    TaskSpec lengths = spec;
    lengths.train_max = curriculum_max_length(spec, step, o.curriculum);
    const int64_t n = sample_train_length(lengths, len_rng), L = n + 2;
    inputs.resize(size_t(o.batch * L));
    labels.resize(size_t(o.batch * L));
    for (int64_t b = 0; b < o.batch; ++b) {
      TaskRng rng = TaskRng::stream(o.seed, uint64_t(step), uint64_t(b));
      const Example ex = generate_example(spec, n, rng);
      std::copy(ex.ids.begin(), ex.ids.end(), inputs.begin() + b * L);
      std::copy(ex.labels.begin(), ex.labels.end(), labels.begin() + b * L);
    }
    const double loss = engine->accumulate_labels(inputs.data(), labels.data(), o.batch, L, 1.0);
    MAMBA3_CHECK(std::isfinite(loss), "task {}: the loss is not finite at step {} (lower --lr?)", spec.name, step + 1);
    const double norm = engine->clip(o.clip);
    const double lr = sched.at(step);
    engine->update(lr);
    window_loss += loss, window_norm += norm, ++window;
    if ((step + 1) % o.log_every == 0 || step + 1 == o.steps) {
      StepRecord rec;
      rec.step = step + 1, rec.loss = window_loss / double(window), rec.lr = lr;
      rec.grad_norm = window_norm / double(window);
      r.records.push_back(rec);
      if (o.progress)
        std::fprintf(o.progress, "%s step %lld/%lld  loss %.4f  grad norm %.3f  lr %.2e  %.1f s\n", spec.name.c_str(),
                     static_cast<long long>(step + 1), static_cast<long long>(o.steps), rec.loss, rec.grad_norm, lr,
                     seconds_since(t0));
      window_loss = window_norm = 0, window = 0;
    }
  }
  engine->sync_to_host();
  r.train_seconds = seconds_since(t0);
  const auto t1 = std::chrono::steady_clock::now();
  r.accuracy = evaluate_task(spec, config, r.params, o.test_lengths.empty() ? spec.test_lengths : o.test_lengths,
                             o.eval_samples, o.eval_seed);
  r.eval_seconds = seconds_since(t1);
  return r;
}

nlohmann::json task_result_json(const TaskSpec& spec, const ModelConfig& config, const TaskTrainOptions& o,
                                const TaskRunResult& r, const std::string& device, int threads) {
  nlohmann::json acc = nlohmann::json::array();
  for (const LengthAccuracy& a : r.accuracy)
    acc.push_back({{"length", a.length},
                   {"samples", a.samples},
                   {"correct", a.correct},
                   {"accuracy", a.accuracy()},
                   {"scaled_accuracy", a.scaled(spec.classes)},
                   {"beyond_training", a.length > spec.train_max}});
  nlohmann::json losses = nlohmann::json::array();
  for (const StepRecord& s : r.records) losses.push_back({{"step", s.step}, {"loss", s.loss}, {"grad_norm", s.grad_norm}});
  return {{"task", spec.name},
          {"classes", spec.classes},
          {"train_lengths", {spec.train_min, spec.train_max}},
          {"odd_lengths_only", spec.odd_lengths_only},
          {"labels", labels_name(spec.labels)},
          {"vocabulary", "0-4 digits, 5 '+', 6 '-', 7 '*', 8 '(', 9 ')', 10 '=', 11 '^' (start)"},
          {"accuracy", acc},
          {"options",
           {{"steps", o.steps},
            {"batch", o.batch},
            {"lr", o.lr},
            {"min_lr_ratio", o.min_lr_ratio},
            {"warmup", o.warmup},
            {"curriculum", o.curriculum},
            {"weight_decay", o.weight_decay},
            {"clip", o.clip},
            {"seed", o.seed},
            {"eval_seed", o.eval_seed},
            {"eval_samples", o.eval_samples}}},
          {"model_config", config.to_json()},
          {"parameters", [&] {
             int64_t n = 0;
             for (const auto& [name, t] : r.params)
               if (!(config.tie_embeddings && name == "lm_head.weight")) n += t.numel();
             return n;
           }()},
          {"final_loss", r.records.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.records.back().loss)},
          {"losses", losses},
          {"train_seconds", r.train_seconds},
          {"eval_seconds", r.eval_seconds},
          {"device", device},
          {"threads", threads}};
}

}  // namespace mamba3::tasks
