#pragma once
// What the server's scheduler (engine.h) needs from a model on one device. The engine decides what runs when
// (admission, prefill segments, the prefix cache, stop strings, streaming); a backend computes and samples:
//  - prompt states: one sequence's decode state while its prompt is prefilled, copyable (the prefix cache keeps
//    copies, n choices start from one);
//  - a decoding set that sequences join and leave at any step; step() feeds every joined sequence the token it
//    sampled last and samples the next one, so a GPU backend keeps logits and sampling on the device.
// Backends: CpuBackend (cpu_backend.h, lanes of ModelCache rows) and CudaBackend (cuda_backend.h, fixed GPU slots).
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "infer/sampler.h"
#include "model/model_config.h"

namespace mamba3::server {

// One sequence's decode state (a prompt being prefilled, or a copy in the prefix cache). Backend-specific.
class PromptState {
 public:
  virtual ~PromptState() = default;
  virtual size_t bytes() const = 0;
};

// How one choice samples: the request's parameters with the seed already offset for the choice, and OpenAI's
// additive penalties over the tokens it generated (logit −= presence + frequency·count, before the Sampler's own
// pipeline).
struct SequenceSampling {
  SamplingParams params;
  float presence_penalty = 0, frequency_penalty = 0;
};

class EngineBackend {
 public:
  virtual ~EngineBackend() = default;
  virtual const ModelConfig& config() const = 0;
  virtual std::string device() const = 0;
  // Decoding sequences the backend can hold at once (the engine's max_batch must not exceed it).
  virtual int64_t max_sequences() const = 0;
  // Longest sequence (prompt + generated) a row can hold; 0 when unbounded.
  virtual int64_t max_sequence_length() const = 0;

  virtual std::unique_ptr<PromptState> new_prompt_state() = 0;
  virtual std::unique_ptr<PromptState> copy(const PromptState& state) = 0;
  // Feeds `ids` into `state`; `logits` becomes the (V_pad) logits of the last one.
  virtual void prefill(std::span<const int64_t> ids, PromptState& state, std::vector<float>& logits) = 0;
  // Several prompts' segments of equal length at once (segments[i] into states[i], logits into *logits[i]).
  // Default: one by one.
  virtual void prefill_batch(std::span<const std::span<const int64_t>> segments, std::span<PromptState* const> states,
                             std::span<std::vector<float>* const> logits) {
    for (size_t i = 0; i < segments.size(); ++i) prefill(segments[i], *states[i], *logits[i]);
  }

  // Sequence `seq` (an id unique among the joined ones) starts decoding from a copy of `state` (which stays valid:
  // n choices join from one state). Its first token is sampled from `logits` with `sampling` and `prompt` as the
  // repetition-penalty history; returns that token. Throws when no room is left.
  virtual int64_t join(int64_t seq, const PromptState& state, std::span<const float> logits,
                       std::span<const int64_t> prompt, const SequenceSampling& sampling) = 0;
  // `seq` stops decoding; its room is free at once.
  virtual void leave(int64_t seq) = 0;
  // One token for every joined sequence: feeds each the token it sampled last and samples the next;
  // out = (seq, next token) for every joined sequence.
  virtual void step(std::vector<std::pair<int64_t, int64_t>>& out) = 0;
  virtual int64_t joined() const = 0;
};

}  // namespace mamba3::server
