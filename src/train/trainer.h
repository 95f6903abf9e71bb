#pragma once
// The training loop of `mamba3 train`, independent of the model: it drives any loss-and-gradient function over
// parameters held in a TensorMap (the language model's lm_loss_and_grad, or a small problem in the tests).
//
// One optimizer step = `accum` micro-batches of `batch` random windows of seq_len + 1 tokens; the gradients are
// averaged (so accum × batch equals one batch of that size), clipped by global norm, and AdamW updates the
// parameters at the schedule's learning rate. Sequence i of step s is WindowSampler(seed).sample(s, i), so the run
// is a pure function of (config, initial weights, data, options): resuming from a checkpoint reproduces exactly the
// losses of an uninterrupted run.
//
// Files in the output directory: the checkpoint (see train/checkpoint.h), log.jsonl (one JSON object per logged
// step: step, loss, lr, grad_norm, tokens_per_s, and val_loss, val_ppl when evaluated), and loss.svg (the loss
// curve, rewritten with every checkpoint).
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "model/model_config.h"
#include "train/data.h"
#include "train/train_engine.h"

namespace mamba3 {

// LossFn (train/train_engine.h): tokens (B, L+1) ids, inputs [0, L), targets [1, L] → the mean cross-entropy (or
// whatever the problem's mean loss is), filling (*grads)[name] (f32, the shape of params[name]) for every parameter
// when grads != nullptr, overwriting what the map holds (the same map comes back on every call).

struct TrainOptions {
  int64_t steps = 1000;  // optimizer steps in total (a resumed run continues up to this)
  int64_t batch = 8;     // sequences per micro-batch
  int64_t seq_len = 256;
  int64_t accum = 1;  // micro-batches per optimizer step
  double lr = 1e-3;   // peak learning rate
  double min_lr_ratio = 0.1;
  int64_t warmup = 100;
  std::string schedule = "cosine";  // cosine | wsd
  double decay_fraction = 0.2;      // wsd: share of the steps spent decaying
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double clip = 1.0;           // global gradient norm; 0 = off
  int64_t eval_every = 100;    // 0 = never (then no validation split is needed)
  int64_t eval_windows = 16;   // validation windows per evaluation (fixed, from the start of the split)
  int64_t save_every = 500;    // 0 = only at the end
  int64_t log_every = 1;
  uint64_t seed = 0;

  void validate() const;  // throws naming the option
  nlohmann::json to_json() const;
  static TrainOptions from_json(const nlohmann::json& j, const std::string& context);
};

struct StepRecord {
  int64_t step = 0;  // optimizer steps done (1-based)
  double loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0;
  std::optional<double> val_loss;
};

struct TrainJob {
  ModelConfig config;
  TensorMap params;  // the initial weights (f32); ignored when resuming (the checkpoint's are used)
  const TokenData* data = nullptr;
  TrainOptions options;
  std::string out_dir;
  LossFn loss;                          // the CPU engine's loss (unused when `engine` is set)
  TrainEngineFactory engine;            // the device engine (e.g. CUDA); empty = the CPU engine over `loss`
  bool resume = false;                  // continue from the checkpoint in out_dir
  std::FILE* progress = nullptr;        // progress lines (stderr in the CLI); nullptr = silent
  int64_t stop_after = -1;              // tests: return after this step without the final save (a simulated kill)
};

struct TrainResult {
  std::vector<StepRecord> records;  // the steps this call ran
  int64_t first_step = 0;           // steps already done when it started (0, or the checkpoint's step)
  int64_t final_step = 0;
  TensorMap params;                 // the weights after the last step
};

// Checks everything that can be checked before the first step (options, data against the model's vocabulary and
// the window length, output directory writable, no checkpoint overwritten by a fresh run, the resume checkpoint
// readable), then trains. Errors before training are mamba3::Error with a clear message.
TrainResult train(TrainJob job);

// log.jsonl lines, parsed (for the loss curve of a resumed run and for tests).
std::vector<StepRecord> read_train_log(const std::string& path);

}  // namespace mamba3
