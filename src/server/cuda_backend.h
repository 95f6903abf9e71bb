#pragma once
// The server's CUDA backend: decoding sequences occupy `slots` rows of one GPU cache, and every decode step runs
// all slots as one captured CUDA graph (model forward + per-row sampling on the device), so only the sampled ids
// cross to the host. The step's shape never changes, which keeps a sequence's results independent of its
// neighbours; idle slots are masked (the Mamba-3 kernels skip their state, the sampler skips them), so they cost
// little beyond the matrix products' extra rows. A prompt is prefilled alone in a 1-row cache of its own and copied
// into a free slot when it starts decoding (n choices: n copies).
//
// Sampling semantics are those of the GPU sampler in per-row mode (cuda/sampling_gpu.h): greedy ids equal the CPU
// Sampler's on equal logits, the random stream is (seed + choice, step) of a counter-based generator, so the same
// seed gives a different (but equally reproducible) sample than the CPU server.
#include <unordered_map>

#include "cuda/cuda_model.h"
#include "cuda/sampling_gpu.h"
#include "server/engine_backend.h"

namespace mamba3::server {

// Spare 1-row caches: a prompt state's device memory is reused, not freed (cudaFree synchronises the device and
// a 1.5B model's state is ~50 MB).
struct GpuCachePool {
  std::vector<cuda::GpuCache> spare;
  size_t max_spare = 8;
};

class CudaPromptState final : public PromptState {
 public:
  CudaPromptState(cuda::GpuCache cache, size_t bytes, std::weak_ptr<GpuCachePool> pool)
      : cache(std::move(cache)), bytes_(bytes), pool_(std::move(pool)) {}
  ~CudaPromptState() override;
  size_t bytes() const override { return bytes_; }
  cuda::GpuCache cache;  // 1 row

 private:
  size_t bytes_;
  std::weak_ptr<GpuCachePool> pool_;
};

class CudaBackend final : public EngineBackend {
 public:
  // capacity: tokens per sequence the attention layers hold (prompt + generated); unused by pure Mamba-3 models.
  CudaBackend(const cuda::CudaModel& model, int64_t slots, int64_t capacity);
  ~CudaBackend() override;

  const ModelConfig& config() const override { return model_.config(); }
  std::string device() const override { return "cuda"; }
  int64_t max_sequences() const override { return slots_; }
  int64_t max_sequence_length() const override { return has_attention_ ? capacity_ : 0; }

  std::unique_ptr<PromptState> new_prompt_state() override;
  std::unique_ptr<PromptState> copy(const PromptState& state) override;
  void prefill(std::span<const int64_t> ids, PromptState& state, std::vector<float>& logits) override;
  // Equal-length segments of several prompts in one model call: each state is copied into a row of a staging
  // cache, prefilled together, and copied back.
  void prefill_batch(std::span<const std::span<const int64_t>> segments, std::span<PromptState* const> states,
                     std::span<std::vector<float>* const> logits) override;

  int64_t join(int64_t seq, const PromptState& state, std::span<const float> logits, std::span<const int64_t> prompt,
               const SequenceSampling& sampling) override;
  void leave(int64_t seq) override;
  void step(std::vector<std::pair<int64_t, int64_t>>& out) override;
  int64_t joined() const override { return int64_t(slot_of_.size()); }

 private:
  const cuda::CudaModel& model_;
  int64_t slots_, capacity_;
  bool has_attention_ = false;
  cuda::GpuCache cache_;     // (slots) rows
  cuda::GpuSampler sampler_;  // per-row mode, one row per slot
  cuda::DeviceBuffer first_logits_;  // (V_pad) f32: a prompt's last logits, for its choices' first tokens
  std::vector<uint8_t> active_;      // (slots)
  std::vector<int64_t> seq_of_;      // (slots) the sequence in each slot, −1 when free
  std::vector<int64_t> free_;        // free slots (a stack; lowest slot on top)
  std::unordered_map<int64_t, int64_t> slot_of_;
  std::vector<int32_t> ids_;         // (slots) the step's sampled ids on the host
  std::shared_ptr<GpuCachePool> pool_;
  std::unique_ptr<cuda::GpuCache> batch_cache_;  // staging rows of prefill_batch (grown on demand)
  std::vector<int64_t> batch_ids_;
  size_t row_bytes_ = 0;
  std::unique_ptr<CudaPromptState> take_state();  // from the pool (contents undefined) or new
};

}  // namespace mamba3::server
