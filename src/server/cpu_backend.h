#pragma once
// The server's CPU backend: decoding sequences live in lanes of at most lane_rows rows (one ModelCache each, one
// LanguageModel::step per lane and step); sampling on the host with one Sampler per sequence. Lanes of ≤ 16 rows
// keep the batch-invariant small-M matrix kernel, so a sequence's tokens do not depend on its neighbours.
#include <unordered_map>

#include "model/language_model.h"
#include "server/engine_backend.h"

namespace mamba3::server {

class CpuPromptState final : public PromptState {
 public:
  explicit CpuPromptState(ModelCache cache) : cache(std::move(cache)) {}
  size_t bytes() const override { return cache.nbytes(); }
  ModelCache cache;  // 1 row
};

class CpuBackend final : public EngineBackend {
 public:
  CpuBackend(const LanguageModel& model, int64_t lane_rows);
  ~CpuBackend() override;

  const ModelConfig& config() const override { return model_.config(); }
  std::string device() const override { return "cpu"; }
  int64_t max_sequences() const override { return int64_t(1) << 40; }
  int64_t max_sequence_length() const override { return 0; }

  std::unique_ptr<PromptState> new_prompt_state() override;
  std::unique_ptr<PromptState> copy(const PromptState& state) override;
  void prefill(std::span<const int64_t> ids, PromptState& state, std::vector<float>& logits) override;

  int64_t join(int64_t seq, const PromptState& state, std::span<const float> logits, std::span<const int64_t> prompt,
               const SequenceSampling& sampling) override;
  void leave(int64_t seq) override;
  void step(std::vector<std::pair<int64_t, int64_t>>& out) override;
  int64_t joined() const override { return int64_t(where_.size()); }

 private:
  struct Sequence;
  struct Lane;
  int64_t sample(Sequence& s, float* logits);  // penalties, Sampler, history
  void compact_lanes();

  const LanguageModel& model_;
  int64_t lane_rows_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  std::unordered_map<int64_t, Lane*> where_;  // seq → its lane
};

}  // namespace mamba3::server
