#pragma once
// The scheduler: one thread owns the backend (the model on its device) and runs continuous batching. Request
// threads only submit a Job and read its events. Each iteration the engine (1) admits queued jobs while the active
// sequences stay within max_batch, (2) prefills admitted prompts (a bounded number of tokens per iteration, so
// running streams keep flowing), reusing states from the prefix cache, and lets a finished prompt's n choices join
// the decoding set, (3) advances every decoding sequence by one token and (4) lets finished or cancelled sequences
// leave at once. The backend (engine_backend.h) computes and samples; the engine owns text, stops and metrics.
//
// Exactness. A prompt is prefilled in segments that end at fixed places: the caller's boundaries (chat message
// ends), every multiple of prefill_block, and the prompt's end. The prefix cache stores states only at such ends
// and a lookup accepts only a length that is also a segment end of the new prompt, so a cache hit computes exactly
// what a miss computes. Choice i samples with seed + i, and both backends decode a sequence independently of its
// neighbours (CPU: lanes of ≤ 16 rows keep the batch-invariant small-M kernel; CUDA: a fixed number of slots, so
// every step has the same shape): a request's output does not depend on what else is running.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "infer/sampler.h"
#include "model/language_model.h"
#include "server/engine_backend.h"
#include "tokenizer/tokenizer.h"

namespace mamba3::server {

struct EngineOptions {
  int64_t max_batch = 64;        // active sequences (decoding or being prefilled)
  int64_t max_queue = 256;       // jobs waiting for admission; beyond it submit() refuses
  int64_t lane_rows = 16;        // rows per decode call (CPU backend)
  int64_t prefill_block = 256;   // prompts are prefilled in segments ending at multiples of this
  int64_t prefill_budget = 512;  // prompt tokens prefilled per iteration (whole segments; at least one)
  // Prompts whose next segments have equal length are prefilled together, up to this many per backend call (the
  // CPU backend still runs them one by one). On CUDA, set the model's prefill row block (CudaModel::
  // set_prefill_row_block) with it, or a batched matrix product may round differently than the same rows alone.
  int64_t prefill_batch = 1;
  size_t state_cache_bytes = size_t(1) << 30;
};

struct GenerationRequest {
  std::vector<int64_t> prompt;      // ≥ 1 token
  std::vector<int64_t> boundaries;  // extra segment ends inside the prompt (chat message ends)
  int64_t n = 1;
  int64_t max_tokens = 16;
  SamplingParams sampling;          // choice i uses seed + i
  float presence_penalty = 0, frequency_penalty = 0;  // OpenAI's additive penalties over generated tokens
  std::vector<std::string> stop;    // stop strings
  std::vector<int64_t> stop_ids;    // end-of-sequence ids (not part of the text)
};

struct JobEvent {
  int64_t choice = 0;
  std::string text;            // new text of this choice (may be empty)
  std::string finish_reason;   // "" while running, else "stop" | "length"
};

// One request: the engine appends events, the request thread takes them. Thread-safe.
class Job {
 public:
  explicit Job(GenerationRequest request) : request_(std::move(request)) {}
  const GenerationRequest& request() const { return request_; }

  // Moves pending events into `out`, waiting up to `timeout` for one. Returns false once everything has been taken
  // and the job is over (all choices finished, or failed).
  bool take(std::vector<JobEvent>& out, std::chrono::milliseconds timeout);
  // Waits for the end and returns every event (non-streaming use).
  std::vector<JobEvent> wait_all();
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  // Set when the job failed inside the engine (the message is for the client).
  std::optional<std::string> error() const;
  int64_t completion_tokens() const { return completion_tokens_; }
  int64_t cached_tokens() const { return cached_tokens_; }

 private:
  friend class Engine;
  void push(JobEvent e, bool last);
  void fail(const std::string& message);

  GenerationRequest request_;
  std::atomic<bool> cancelled_{false};
  std::atomic<int64_t> completion_tokens_{0}, cached_tokens_{0};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<JobEvent> events_;
  int64_t finished_choices_ = 0;
  bool over_ = false;
  std::optional<std::string> error_;
};

struct EngineMetrics {
  int64_t requests = 0, rejected = 0, cancelled = 0;
  int64_t prompt_tokens = 0, prefilled_tokens = 0, generated_tokens = 0;
  int64_t cache_hits = 0, cache_misses = 0, cache_hit_tokens = 0;
  int64_t queue_depth = 0, active_sequences = 0;
  size_t cache_bytes = 0, cache_entries = 0;
  double tokens_per_second = 0;  // generated tokens over the last 10 s
};

class QueueFull : public std::runtime_error {
 public:
  QueueFull() : std::runtime_error("the server's request queue is full; retry later") {}
};

class Engine {
 public:
  // On the CPU (a CpuBackend with options.lane_rows).
  Engine(const LanguageModel& model, const Tokenizer& tokenizer, EngineOptions options);
  // On any backend (max_batch must not exceed backend->max_sequences()).
  Engine(std::unique_ptr<EngineBackend> backend, const Tokenizer& tokenizer, EngineOptions options);
  ~Engine();  // stops the thread; unfinished jobs fail
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a job (throws QueueFull beyond max_queue, mamba3::Error for a request the model cannot take).
  std::shared_ptr<Job> submit(GenerationRequest request);
  void stop();
  EngineMetrics metrics() const;
  const EngineOptions& options() const { return options_; }
  const EngineBackend& backend() const { return *backend_; }

 private:
  struct Choice;
  struct Prefill;
  void loop();
  bool admit();                      // moves queued jobs into prefills_; false when there is nothing to do
  void run_prefills();
  void plan(Prefill& p);             // segments and prefix-cache lookup, once
  void open(Prefill& p);             // p's own state (a copy of the cached prefix, or a fresh one)
  void start_choices(Prefill& p);    // every choice joins the backend with its first token
  void decode();
  // Takes c's newly sampled token `id`, emits text; returns whether c goes on.
  bool accept(Choice& c, int64_t id);
  void leave(int64_t seq);           // the backend lets go of seq and the engine forgets it

  std::unique_ptr<EngineBackend> backend_;
  const Tokenizer& tokenizer_;
  EngineOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  EngineMetrics metrics_;  // under mu_
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> recent_;  // (time, tokens) for tokens/s

  // Engine-thread state.
  std::vector<std::unique_ptr<Prefill>> prefills_;
  std::unordered_map<int64_t, std::unique_ptr<Choice>> choices_;  // decoding, by backend sequence id
  int64_t next_seq_ = 0;
  std::vector<std::pair<int64_t, int64_t>> stepped_;              // the backend's (seq, token) of one step
  std::unique_ptr<class PrefixCache> prefix_cache_;
  std::atomic<int64_t> active_{0};
  int64_t produced_ = 0;  // tokens sampled since the last metrics update
  std::thread thread_;
};

}  // namespace mamba3::server
