#include "cuda/train/train_engine_gpu.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "cuda/train/adamw_gpu.h"
#include "cuda/train/lm_train_gpu.h"
#include "train/data.h"

namespace mamba3::cuda {

namespace {

class CudaTrainEngine final : public TrainEngine {
 public:
  CudaTrainEngine(const ModelConfig& config, TensorMap& params, AdamW& optimizer, Precision precision)
      : params_(params), optimizer_(optimizer), trainer_(config, params, precision) {
    GpuParamStore& s = trainer_.store();
    // The optimizer's moments (zero, or a resumed checkpoint's) and step count.
    std::map<std::string, Tensor> moments;
    for (auto& [name, t] : optimizer.state_tensors()) moments[name] = t;
    s.upload(s.exp_avg(), moments, "exp_avg.", "optimizer state");
    s.upload(s.exp_avg_sq(), moments, "exp_avg_sq.", "optimizer state");
    steps_ = optimizer.steps();
    for (const GpuParamStore::Entry& e : s.entries()) decay_.push_back(uses_weight_decay(e.name));
  }

  double accumulate(const int64_t* tokens, int64_t B, int64_t L, double scale) override {
    split(tokens, B, L);
    return trainer_.run(inputs_.data(), targets_.data(), B, L, true, scale);
  }
  double accumulate_labels(const int64_t* inputs, const int64_t* targets, int64_t B, int64_t L,
                           double scale) override {
    return trainer_.run(inputs, targets, B, L, true, scale);
  }
  double loss(const int64_t* tokens, int64_t B, int64_t L) override {
    split(tokens, B, L);
    return trainer_.run(inputs_.data(), targets_.data(), B, L, false, 0.0);
  }
  double clip(double max_norm) override {
    GpuParamStore& s = trainer_.store();
    const cudaStream_t st = trainer_.context().stream();
    const double norm = std::sqrt(sum_of_squares_gpu(st, s.grads(), s.total(), reduce_));
    if (max_norm > 0 && norm > max_norm) scale_gpu(st, s.grads(), s.total(), float(max_norm / (norm + 1e-6)));
    return norm;
  }
  void update(double lr) override {
    GpuParamStore& s = trainer_.store();
    const cudaStream_t st = trainer_.context().stream();
    const AdamWConfig& a = optimizer_.config();
    ++steps_;
    const auto& entries = s.entries();
    for (size_t i = 0; i < entries.size(); ++i) {
      const int64_t off = entries[i].offset;
      AdamWStepParams p;
      p.lr = lr, p.beta1 = a.beta1, p.beta2 = a.beta2, p.eps = a.eps;
      p.weight_decay = decay_[i] ? a.weight_decay : 0.0;
      p.t = steps_;
      adamw_update_gpu(st, s.params() + off, s.grads() + off, s.exp_avg() + off, s.exp_avg_sq() + off,
                       entries[i].numel, p);
    }
    MAMBA3_CUDA_CHECK(cudaMemsetAsync(s.grads(), 0, size_t(s.total()) * 4, st));
  }
  void sync_to_host() override {
    GpuParamStore& s = trainer_.store();
    trainer_.context().sync();
    s.download(s.params(), params_);
    TensorMap moments;
    s.download(s.exp_avg(), moments, "exp_avg.");
    s.download(s.exp_avg_sq(), moments, "exp_avg_sq.");
    optimizer_.load_state(moments, steps_, "GPU optimizer state");
  }

 private:
  void split(const int64_t* tokens, int64_t B, int64_t L) { split_windows(tokens, B, L, inputs_, targets_); }

  TensorMap& params_;
  AdamW& optimizer_;
  GpuLmTrainer trainer_;
  std::vector<bool> decay_;
  int64_t steps_ = 0;
  ReduceScratch reduce_;
  std::vector<int64_t> inputs_, targets_;
};

}  // namespace

std::unique_ptr<TrainEngine> cuda_train_engine(const ModelConfig& config, TensorMap& params, AdamW& optimizer,
                                               Precision precision) {
  return std::make_unique<CudaTrainEngine>(config, params, optimizer, precision);
}

TrainEngineFactory cuda_train_engine_factory(Precision precision) {
  return [precision](const ModelConfig& config, TensorMap& params, AdamW& optimizer) {
    return cuda_train_engine(config, params, optimizer, precision);
  };
}

}  // namespace mamba3::cuda
