#pragma once
// Training and evaluation of a Mamba-3 language model on one state-tracking task (tasks/state_tracking.h), on CPU,
// with the project's training pieces: init_weights, lm_loss_and_grad_labels (cross-entropy on the labelled
// positions only), clip_grad_norm, AdamW and the warmup + cosine schedule.
//
// Step s draws one training length n (uniform over the task's training lengths) and `batch` examples of that
// length from TaskRng::stream(seed, s, ·): every sequence of a batch has the same length (as in Delétang et al.),
// so no padding is needed, and the run is a pure function of (task, config, options).
// Evaluation runs the inference path (LanguageModel::prefill) on `eval_samples` fresh examples per test length,
// drawn from TaskRng::stream(eval_seed, length, i) — the same test set for every model and training seed — and
// takes the argmax of the logits at '=' over the task's answer ids.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "model/model_config.h"
#include "tasks/state_tracking.h"
#include "train/trainer.h"

namespace mamba3::tasks {

struct TaskTrainOptions {
  int64_t steps = 2000;
  int64_t batch = 32;
  double lr = 2e-3;  // peak
  double min_lr_ratio = 0.1;
  int64_t warmup = 100;
  double weight_decay = 0.1;
  double clip = 1.0;
  uint64_t seed = 0;                  // initial weights and training data
  uint64_t eval_seed = 1234;          // the test set
  int64_t eval_samples = 500;         // per test length
  std::vector<int64_t> test_lengths;  // empty: the task's defaults
  int64_t log_every = 50;
  // Length curriculum: over the first `curriculum` steps the longest training length grows linearly from the
  // task's shortest to its longest (step s draws from [train_min, train_min + (train_max − train_min)·(s+1)/c]);
  // 0 = off (every step draws from all training lengths).
  int64_t curriculum = 0;
  std::FILE* progress = nullptr;  // progress lines; nullptr = silent
  TrainEngineFactory engine;      // where training runs (e.g. CUDA); empty = CPU. Evaluation runs on the CPU.

  void validate() const;  // throws naming the option
};

// The longest training length step `step` may draw under a curriculum of `curriculum` steps (see TaskTrainOptions).
int64_t curriculum_max_length(const TaskSpec& spec, int64_t step, int64_t curriculum);

struct LengthAccuracy {
  int64_t length = 0, samples = 0, correct = 0;
  double accuracy() const { return samples ? double(correct) / double(samples) : 0.0; }
  // (accuracy − chance) / (1 − chance), chance = 1 / classes: 0 at chance, 1 when perfect.
  double scaled(int64_t classes) const;
};

struct TaskRunResult {
  std::vector<StepRecord> records;  // every logged step (loss = mean of the logged window)
  std::vector<LengthAccuracy> accuracy;
  double train_seconds = 0, eval_seconds = 0;
  TensorMap params;  // the trained weights
};

// Accuracy of `params` on each length (each made valid for the task).
std::vector<LengthAccuracy> evaluate_task(const TaskSpec& spec, const ModelConfig& config, const TensorMap& params,
                                          const std::vector<int64_t>& lengths, int64_t samples, uint64_t eval_seed);

// Fresh weights (init_weights(config, seed)), `steps` AdamW steps, then the evaluation. The config's vocabulary
// must hold the task's ids (vocab_size ≥ kVocabSize).
TaskRunResult run_task(const TaskSpec& spec, const ModelConfig& config, const TaskTrainOptions& options);

// result.json: task, format, lengths, options, model config, accuracy per length, timings, final loss.
nlohmann::json task_result_json(const TaskSpec& spec, const ModelConfig& config, const TaskTrainOptions& options,
                                const TaskRunResult& result, const std::string& device, int threads);

}  // namespace mamba3::tasks
