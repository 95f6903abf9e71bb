#include "train/train_engine.h"

#include "core/error.h"

namespace mamba3 {

namespace {

class CpuTrainEngine final : public TrainEngine {
 public:
  CpuTrainEngine(const ModelConfig& config, TensorMap& params, AdamW& optimizer, LossFn loss, LabelLossFn label_loss)
      : config_(config), params_(params), optimizer_(optimizer), loss_(std::move(loss)),
        label_loss_(std::move(label_loss)) {
    MAMBA3_CHECK(static_cast<bool>(loss_), "cpu train engine: no loss function");
  }

  double accumulate(const int64_t* tokens, int64_t B, int64_t L, double scale) override {
    const double l = loss_(config_, params_, tokens, B, L, &g_);
    accumulate_grads(sum_, g_, scale);
    return l;
  }
  double accumulate_labels(const int64_t* inputs, const int64_t* targets, int64_t B, int64_t L,
                           double scale) override {
    MAMBA3_CHECK(static_cast<bool>(label_loss_), "cpu train engine: no labelled loss function");
    const double l = label_loss_(config_, params_, inputs, targets, B, L, &g_);
    accumulate_grads(sum_, g_, scale);
    return l;
  }
  double loss(const int64_t* tokens, int64_t B, int64_t L) override {
    return loss_(config_, params_, tokens, B, L, nullptr);
  }
  double clip(double max_norm) override { return clip_grad_norm(sum_, max_norm); }
  void update(double lr) override {
    optimizer_.step(params_, sum_, lr);
    sum_.clear();  // the next step allocates zeroed sums again (accumulate_grads)
  }
  void sync_to_host() override {}

 private:
  const ModelConfig& config_;
  TensorMap& params_;
  AdamW& optimizer_;
  LossFn loss_;
  LabelLossFn label_loss_;
  TensorMap g_;    // the loss function's output, reused across calls
  TensorMap sum_;  // the gradient sum of the current step
};

}  // namespace

std::unique_ptr<TrainEngine> cpu_train_engine(const ModelConfig& config, TensorMap& params, AdamW& optimizer,
                                              LossFn loss, LabelLossFn label_loss) {
  return std::make_unique<CpuTrainEngine>(config, params, optimizer, std::move(loss), std::move(label_loss));
}

}  // namespace mamba3
