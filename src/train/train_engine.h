#pragma once
// What the training loop needs from a device, so that trainer.cpp is written once for CPU and GPU: the gradient of
// a micro-batch summed into the engine's gradient buffer, global-norm clipping, the AdamW update, a loss without
// gradients (validation), and the weights and optimizer moments brought back to the host for checkpoints.
//
// The CPU engine works directly on the trainer's host TensorMap and AdamW (cpu_train_engine); the CUDA engine keeps
// everything on the device and copies to the host only in sync_to_host (src/cuda/train/train_engine_gpu.h).
#include <cstdint>
#include <functional>
#include <memory>

#include "core/tensor.h"
#include "model/model_config.h"
#include "train/optimizer.h"

namespace mamba3 {

class TrainEngine {
 public:
  virtual ~TrainEngine() = default;
  // tokens (B, L+1): inputs [0, L), targets [1, L]. Adds scale·∇(mean loss) to the gradient sum; returns the mean
  // loss (natural log).
  virtual double accumulate(const int64_t* tokens, int64_t B, int64_t L, double scale) = 0;
  // Labels given apart (inputs (B, L), targets (B, L), < 0 = no loss at that position), as lm_loss_and_grad_labels.
  virtual double accumulate_labels(const int64_t* inputs, const int64_t* targets, int64_t B, int64_t L,
                                   double scale) = 0;
  // Mean loss of tokens (B, L+1), no gradients.
  virtual double loss(const int64_t* tokens, int64_t B, int64_t L) = 0;
  // Scales the gradient sum by max_norm / (norm + 1e-6) when its global norm exceeds max_norm (≤ 0: off); returns
  // the norm before clipping.
  virtual double clip(double max_norm) = 0;
  // One AdamW step of every parameter at learning rate lr, then the gradient sum is zeroed.
  virtual void update(double lr) = 0;
  // Writes the current weights and optimizer moments (and its step count) into the host objects the engine was
  // made from. A no-op for the CPU engine, which works on them directly.
  virtual void sync_to_host() = 0;
};

// tokens (B, L+1) → mean loss, and the gradient (grads != nullptr) — lm_loss_and_grad's signature.
using LossFn = std::function<double(const ModelConfig& config, const TensorMap& params, const int64_t* tokens,
                                    int64_t B, int64_t L, TensorMap* grads)>;
// The same with labels apart (lm_loss_and_grad_labels's signature); may be empty when only accumulate() is used.
using LabelLossFn = std::function<double(const ModelConfig& config, const TensorMap& params, const int64_t* inputs,
                                         const int64_t* targets, int64_t B, int64_t L, TensorMap* grads)>;

// The CPU engine over host parameters and optimizer that outlive it.
std::unique_ptr<TrainEngine> cpu_train_engine(const ModelConfig& config, TensorMap& params, AdamW& optimizer,
                                              LossFn loss, LabelLossFn label_loss = {});

// Makes the engine a training run uses; the host params and optimizer outlive it and receive sync_to_host().
using TrainEngineFactory =
    std::function<std::unique_ptr<TrainEngine>(const ModelConfig& config, TensorMap& params, AdamW& optimizer)>;

}  // namespace mamba3
