#pragma once
// The whole language model's loss and gradient on the GPU (training): the CPU's train/lm_gradients.cpp step for
// step — forward with the activations each backward needs, the lm_head fused with the cross-entropy, then every
// layer's backward in reverse — with the parameters and their gradient sum in a GpuParamStore. Mamba-3 mixers keep
// their forward activations for the backward when the device has the memory (MAMBA3_TRAIN_KEEP; otherwise the
// backward recomputes from the mixer input); attention layers keep theirs.
#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "cuda/cuda_context.h"
#include "cuda/train/param_store_gpu.h"
#include "cuda/train/train_gemm.h"
#include "model/model_config.h"

namespace mamba3::cuda {

class GpuLmTrainer {
 public:
  // Checks the parameters exactly as lm_loss_and_grad does (every one present with its shape, no stray tensor)
  // and uploads them. precision: F32 (exact, for tests) or BF16 (mixed: bf16 matrix-product inputs, f32 rest).
  GpuLmTrainer(const ModelConfig& config, const TensorMap& params, Precision precision);
  ~GpuLmTrainer();
  GpuLmTrainer(const GpuLmTrainer&) = delete;
  GpuLmTrainer& operator=(const GpuLmTrainer&) = delete;

  // inputs, targets: host (B, L) ids (targets < 0: no loss there; at least one labelled). Returns the mean
  // cross-entropy over the labelled positions; with want_grad, adds scale·∇(that mean) to store().grads().
  double run(const int64_t* inputs, const int64_t* targets, int64_t B, int64_t L, bool want_grad, double scale);

  GpuParamStore& store() { return *store_; }
  const Context& context() const { return *ctx_; }
  const ModelConfig& config() const { return config_; }
  Precision precision() const { return gemm_.precision(); }

  // The bf16 mode's weight mirror: true gives every weight matrix's products (Mamba-3 in/out_proj, GatedMLP fc1/fc2,
  // attention in/out_proj, lm_head) the store's bf16 mirror (GpuParamStore::enable_mirror, made on the first run
  // after the switch and refreshed at the start of a run when stale) instead of rounding each weight in each product:
  // the same bits. false rounds in the products as before. Default from MAMBA3_TRAIN_WEIGHT_MIRROR, read once per
  // process: "1" or "0" (unset: 1); any other value throws. The f32 mode ignores it.
  void set_weight_mirror(bool on) { weight_mirror_ = on; }
  bool weight_mirror() const { return weight_mirror_; }
  // The bf16 mode's block outputs and input gradients in bf16: true has the Mamba-3 mixers' out_proj and the
  // GatedMLPs' fc2 write the block's output, and their du / dx products the gradient of the block's input, rounded
  // once to bf16 (as PyTorch autocast's linear layers give them), which the residual step and the norm backward read
  // (half the bytes of f32 on both sides); attention layers keep f32. false: f32 as before. Default from
  // MAMBA3_TRAIN_BLOCK_IO16, read once per process: "1" or "0" (unset: 1). The f32 mode ignores it.
  void set_block_io16(bool on) { block_io16_ = on; }
  bool block_io16() const { return block_io16_; }

 private:
  struct Layer;
  ModelConfig config_;
  std::unique_ptr<Context> ctx_;
  std::unique_ptr<GpuParamStore> store_;
  TrainGemm gemm_;
  std::vector<std::unique_ptr<Layer>> layers_;
  struct Work;
  std::unique_ptr<Work> work_;
  // Whether the Mamba-3 layers keep their forward activations for the backward (MAMBA3_TRAIN_KEEP), decided for the
  // batch shape keep_B_ × keep_L_.
  void decide_keep(int64_t B, int64_t L);
  bool keep_mamba_ = false;
  int64_t keep_B_ = -1, keep_L_ = -1;
  bool weight_mirror_ = true;  // set_weight_mirror
  bool block_io16_ = true;     // set_block_io16
};

}  // namespace mamba3::cuda
