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
    // Which granules of the flat store take weight decay (the one-launch update).
    std::vector<uint8_t> granules(size_t((s.total() + kAdamWGranule - 1) / kAdamWGranule), 0);
    for (const GpuParamStore::Entry& e : s.entries()) {
      MAMBA3_CHECK(e.offset % kAdamWGranule == 0, "GPU AdamW: tensor {} is not granule-aligned", e.name);
      if (!uses_weight_decay(e.name)) continue;
      for (int64_t q = e.offset / kAdamWGranule; q * kAdamWGranule < e.offset + e.numel; ++q) granules[size_t(q)] = 1;
    }
    decay_granules_ = DeviceBuffer(granules.size());
    if (!granules.empty()) decay_granules_.upload(granules.data(), granules.size());
  }

  double accumulate(const int64_t* tokens, int64_t B, int64_t L, double scale) override {
    apply_pending_clip();
    split(tokens, B, L);
    return trainer_.run(inputs_.data(), targets_.data(), B, L, true, scale);
  }
  double accumulate_labels(const int64_t* inputs, const int64_t* targets, int64_t B, int64_t L,
                           double scale) override {
    apply_pending_clip();
    return trainer_.run(inputs, targets, B, L, true, scale);
  }
  double loss(const int64_t* tokens, int64_t B, int64_t L) override {
    split(tokens, B, L);
    return trainer_.run(inputs_.data(), targets_.data(), B, L, false, 0.0);
  }
  // The clipping scale is applied by the next update as it reads the gradients (the same bits as scaling them here,
  // without a pass over them); anything else that reads them first applies it.
  double clip(double max_norm) override {
    apply_pending_clip();
    GpuParamStore& s = trainer_.store();
    const cudaStream_t st = trainer_.context().stream();
    const double norm = std::sqrt(sum_of_squares_gpu(st, s.grads(), s.total(), reduce_));
    if (max_norm > 0 && norm > max_norm) pending_clip_ = float(max_norm / (norm + 1e-6));
    return norm;
  }
  void update(double lr) override {
    GpuParamStore& s = trainer_.store();
    const cudaStream_t st = trainer_.context().stream();
    const AdamWConfig& a = optimizer_.config();
    ++steps_;
    AdamWStepParams p;
    p.lr = lr, p.beta1 = a.beta1, p.beta2 = a.beta2, p.eps = a.eps, p.weight_decay = a.weight_decay, p.t = steps_;
    // The bf16 weight mirror (when the trainer made one) is written in the same pass, so it never goes stale.
    adamw_update_flat_gpu(st, s.params(), s.grads(), s.exp_avg(), s.exp_avg_sq(), s.total(),
                          decay_granules_.as<uint8_t>(), p, pending_clip_, s.params16());
    pending_clip_ = 1.0f;
    MAMBA3_CUDA_CHECK(cudaMemsetAsync(s.grads(), 0, size_t(s.total()) * 4, st));
  }
  void sync_to_host() override {
    apply_pending_clip();
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
  void apply_pending_clip() {
    if (pending_clip_ == 1.0f) return;
    GpuParamStore& s = trainer_.store();
    scale_gpu(trainer_.context().stream(), s.grads(), s.total(), pending_clip_);
    pending_clip_ = 1.0f;
  }

  TensorMap& params_;
  AdamW& optimizer_;
  GpuLmTrainer trainer_;
  DeviceBuffer decay_granules_;  // one byte per kAdamWGranule floats of the store: weight decay applies
  float pending_clip_ = 1.0f;    // clip()'s scale, not yet applied to the gradients
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
