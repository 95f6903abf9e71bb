#include "server/engine.h"

#include <algorithm>
#include <unordered_map>

#include "server/cpu_backend.h"
#include "server/prefix_cache.h"
#include "server/stop_matcher.h"

namespace mamba3::server {

// ---------------------------------------------------------------------------------------------------------- Job

bool Job::take(std::vector<JobEvent>& out, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !events_.empty() || over_; });
  while (!events_.empty()) {
    out.push_back(std::move(events_.front()));
    events_.pop_front();
  }
  return !over_;
}

std::vector<JobEvent> Job::wait_all() {
  std::vector<JobEvent> all;
  while (take(all, std::chrono::milliseconds(1000))) {
  }
  return all;
}

std::optional<std::string> Job::error() const {
  std::lock_guard lock(mu_);
  return error_;
}

void Job::push(JobEvent e, bool last) {
  {
    std::lock_guard lock(mu_);
    events_.push_back(std::move(e));
    if (last && ++finished_choices_ == request_.n) over_ = true;
  }
  cv_.notify_all();
}

void Job::fail(const std::string& message) {
  {
    std::lock_guard lock(mu_);
    cancelled_ = true;  // the engine drops whatever of it still runs
    if (over_) return;
    error_ = message;
    over_ = true;
  }
  cv_.notify_all();
}

// ------------------------------------------------------------------------------------------------- engine state

struct Engine::Choice {
  std::shared_ptr<Job> job;
  int64_t index = 0;
  StreamDecoder decoder;
  StopMatcher stop;
  int64_t generated = 0;
};

struct Engine::Prefill {
  std::shared_ptr<Job> job;
  bool started = false;                // planned: ends, snapshots, prefix-cache lookup
  bool over = false;                   // done, cancelled or failed: leaves at the end of run_prefills
  std::shared_ptr<const PromptState> cached;  // a prefix-cache hit not yet copied into `state`
  std::unique_ptr<PromptState> state;  // 1 sequence
  std::vector<int64_t> ends;           // ascending segment ends; the last is the prompt length
  std::vector<int64_t> snapshots;      // ends after which the state goes into the prefix cache
  int64_t pos = 0;
  std::vector<float> logits;           // of the last token prefilled (V_pad)
  int64_t accounted = 0;               // choices already joined or ended (their slots are theirs to release)
};

Engine::Engine(const LanguageModel& model, const Tokenizer& tokenizer, EngineOptions options)
    : Engine(std::make_unique<CpuBackend>(model, options.lane_rows), tokenizer, options) {}

Engine::Engine(std::unique_ptr<EngineBackend> backend, const Tokenizer& tokenizer, EngineOptions options)
    : backend_(std::move(backend)), tokenizer_(tokenizer), options_(options),
      prefix_cache_(std::make_unique<PrefixCache>(options.state_cache_bytes)) {
  MAMBA3_CHECK(options_.max_batch >= 1 && options_.max_queue >= 0 && options_.lane_rows >= 1 &&
                   options_.prefill_block >= 1 && options_.prefill_budget >= 1 && options_.prefill_batch >= 1,
               "engine: max_batch {}, lane_rows {}, prefill_block {}, prefill_budget {}, prefill_batch {} must be at "
               "least 1 and max_queue {} non-negative",
               options_.max_batch, options_.lane_rows, options_.prefill_block, options_.prefill_budget,
               options_.prefill_batch, options_.max_queue);
  MAMBA3_CHECK(options_.max_batch <= backend_->max_sequences(),
               "engine: max_batch {} exceeds the {} sequences the {} backend holds", options_.max_batch,
               backend_->max_sequences(), backend_->device());
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() { stop(); }

void Engine::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<Job> Engine::submit(GenerationRequest r) {
  const int64_t V = backend_->config().vocab_size;
  MAMBA3_CHECK(!r.prompt.empty(), "the prompt is empty (it must hold at least one token)");
  for (int64_t id : r.prompt) MAMBA3_CHECK(id >= 0 && id < V, "prompt token id {} is outside the vocabulary [0, {})", id, V);
  MAMBA3_CHECK(r.n >= 1 && r.n <= options_.max_batch, "n must lie in [1, {}], got {}", options_.max_batch, r.n);
  MAMBA3_CHECK(r.max_tokens >= 1, "max_tokens must be at least 1, got {}", r.max_tokens);
  if (const int64_t cap = backend_->max_sequence_length(); cap > 0)
    MAMBA3_CHECK(int64_t(r.prompt.size()) + r.max_tokens <= cap,
                 "the prompt ({} tokens) plus max_tokens ({}) exceed the {} tokens a sequence may hold on this server",
                 r.prompt.size(), r.max_tokens, cap);
  r.sampling.validate();
  auto job = std::make_shared<Job>(std::move(r));
  {
    std::lock_guard lock(mu_);
    MAMBA3_CHECK(!stopping_, "the server is shutting down");
    if (int64_t(queue_.size()) >= options_.max_queue) {
      ++metrics_.rejected;
      throw QueueFull();
    }
    queue_.push_back(job);
    ++metrics_.requests;
    metrics_.prompt_tokens += int64_t(job->request().prompt.size());
    metrics_.queue_depth = int64_t(queue_.size());
  }
  cv_.notify_all();
  return job;
}

EngineMetrics Engine::metrics() const {
  std::lock_guard lock(mu_);
  EngineMetrics m = metrics_;
  m.active_sequences = active_;
  if (!recent_.empty()) {
    int64_t tokens = 0;
    for (const auto& [t, n] : recent_) tokens += n;
    const double span =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - recent_.front().first).count();
    m.tokens_per_second = double(tokens) / std::clamp(span, 1.0, 10.0);
  }
  return m;
}

// ------------------------------------------------------------------------------------------------ the main loop

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !prefills_.empty() || !choices_.empty(); });
      if (stopping_) break;
    }
    admit();
    run_prefills();
    decode();
    std::lock_guard lock(mu_);
    metrics_.cache_bytes = prefix_cache_->bytes();
    metrics_.cache_entries = prefix_cache_->entries();
  }
  // Shutting down: every job still known fails (its request thread then answers or closes the stream).
  std::lock_guard lock(mu_);
  for (auto& j : queue_) j->fail("the server is shutting down");
  for (auto& p : prefills_) p->job->fail("the server is shutting down");
  for (auto& [seq, c] : choices_) c->job->fail("the server is shutting down");
  queue_.clear(), prefills_.clear(), choices_.clear();
}

bool Engine::admit() {
  std::lock_guard lock(mu_);
  std::erase_if(queue_, [&](const std::shared_ptr<Job>& j) {
    if (!j->cancelled()) return false;
    ++metrics_.cancelled;
    return true;
  });
  while (!queue_.empty() && active_ + queue_.front()->request().n <= options_.max_batch) {
    auto p = std::make_unique<Prefill>();
    p->job = std::move(queue_.front());
    queue_.pop_front();
    active_ += p->job->request().n;
    prefills_.push_back(std::move(p));
  }
  metrics_.queue_depth = int64_t(queue_.size());
  return !prefills_.empty() || !choices_.empty();
}

// The segments of p's prompt and the prefix-cache lookup, once. A hit only records the stored state: the copy is
// made when p first runs (or starts its choices), so a long queue does not hold one state per waiting prompt.
void Engine::plan(Prefill& p) {
  if (p.started) return;
  p.started = true;
  const GenerationRequest& r = p.job->request();
  const int64_t L = int64_t(r.prompt.size()), block = options_.prefill_block;
  for (int64_t b : r.boundaries)
    if (b > 0 && b < L) p.ends.push_back(b), p.snapshots.push_back(b);
  for (int64_t b = block; b < L; b += block) p.ends.push_back(b);
  p.ends.push_back(L);
  std::sort(p.ends.begin(), p.ends.end());
  p.ends.erase(std::unique(p.ends.begin(), p.ends.end()), p.ends.end());
  if (L / block * block > 0) p.snapshots.push_back(L / block * block);
  p.snapshots.push_back(L);
  auto hit = prefix_cache_->lookup(r.prompt, p.ends);
  std::lock_guard lock(mu_);
  if (hit) {
    p.cached = std::move(hit->state);
    p.pos = hit->tokens;
    p.logits = std::move(hit->logits);
    p.job->cached_tokens_ = hit->tokens;
    ++metrics_.cache_hits;
    metrics_.cache_hit_tokens += hit->tokens;
  } else {
    ++metrics_.cache_misses;
  }
}

void Engine::open(Prefill& p) {
  if (p.state) return;
  p.state = p.cached ? backend_->copy(*p.cached) : backend_->new_prompt_state();
  p.cached.reset();
}

void Engine::run_prefills() {
  int64_t spent = 0;
  auto fail = [&](Prefill& p, const std::exception& e) {
    p.job->fail(std::string("prefill failed: ") + e.what());
    p.over = true;
  };
  // Rounds: the oldest prompt with work left runs its next segment, together with up to prefill_batch − 1 later
  // prompts whose next segment has the same length (one backend call), until the budget is spent.
  while (spent < options_.prefill_budget) {
    std::vector<Prefill*> group;
    int64_t len = 0;
    for (auto& ptr : prefills_) {
      Prefill& p = *ptr;
      if (p.over) continue;
      if (p.job->cancelled()) {
        p.over = true;
        std::lock_guard lock(mu_);
        ++metrics_.cancelled;
        continue;
      }
      try {
        plan(p);
      } catch (const std::exception& e) {
        fail(p, e);
        continue;
      }
      const int64_t L = int64_t(p.job->request().prompt.size());
      if (p.pos == L) continue;
      const int64_t seg = *std::upper_bound(p.ends.begin(), p.ends.end(), p.pos) - p.pos;
      if (group.empty()) {
        len = seg;
        group.push_back(&p);
      } else if (seg == len && spent + len * int64_t(group.size() + 1) <= options_.prefill_budget) {
        group.push_back(&p);
      }
      if (int64_t(group.size()) >= options_.prefill_batch) break;
    }
    if (group.empty()) break;
    std::vector<std::span<const int64_t>> segments;
    std::vector<PromptState*> states;
    std::vector<std::vector<float>*> logits;
    try {
      for (Prefill* p : group) {
        open(*p);
        segments.emplace_back(p->job->request().prompt.data() + p->pos, size_t(len));
        states.push_back(p->state.get());
        logits.push_back(&p->logits);
      }
      backend_->prefill_batch(segments, states, logits);
    } catch (const std::exception& e) {
      for (Prefill* p : group) fail(*p, e);
      continue;
    }
    spent += len * int64_t(group.size());
    {
      std::lock_guard lock(mu_);
      metrics_.prefilled_tokens += len * int64_t(group.size());
    }
    for (Prefill* p : group) {
      const auto& prompt = p->job->request().prompt;
      p->pos += len;
      try {
        if (std::find(p->snapshots.begin(), p->snapshots.end(), p->pos) != p->snapshots.end())
          prefix_cache_->insert(std::span(prompt).first(size_t(p->pos)), *p->state, p->logits,
                                [&](const PromptState& x) { return backend_->copy(x); });
      } catch (const std::exception& e) {
        fail(*p, e);
      }
    }
  }
  // Prompts now complete start their choices; finished, cancelled and failed prefills leave.
  for (auto it = prefills_.begin(); it != prefills_.end();) {
    Prefill& p = **it;
    const GenerationRequest& r = p.job->request();
    if (!p.over && p.started && p.pos == int64_t(r.prompt.size())) {
      try {
        open(p);
        start_choices(p);
      } catch (const std::exception& e) {
        p.job->fail(std::string("prefill failed: ") + e.what());
      }
      p.over = true;
    }
    if (!p.over) {
      ++it;
      continue;
    }
    if (p.accounted < r.n) {  // cancelled or failed before every choice was placed or ended
      std::lock_guard lock(mu_);
      active_ -= r.n - p.accounted;
    }
    it = prefills_.erase(it);
  }
}

void Engine::start_choices(Prefill& p) {
  const GenerationRequest& r = p.job->request();
  for (int64_t i = 0; i < r.n; ++i) {
    SequenceSampling sp{r.sampling, r.presence_penalty, r.frequency_penalty};
    sp.params.seed = r.sampling.seed + uint64_t(i);
    auto c = std::unique_ptr<Choice>(new Choice{p.job, i, StreamDecoder(tokenizer_), StopMatcher(r.stop), 0});
    const int64_t seq = next_seq_++;
    const int64_t first = backend_->join(seq, *p.state, p.logits, r.prompt, sp);
    ++p.accounted;  // from here on the choice's slot is released by decode() or was released by accept
    if (accept(*c, first)) {
      choices_.emplace(seq, std::move(c));
    } else {
      backend_->leave(seq);
    }
  }
}

bool Engine::accept(Choice& c, int64_t id) {
  const GenerationRequest& r = c.job->request();
  ++c.generated;
  ++produced_;
  ++c.job->completion_tokens_;
  {
    std::lock_guard lock(mu_);
    ++metrics_.generated_tokens;
  }
  auto end = [&](std::string text, const char* reason) {
    {
      std::lock_guard lock(mu_);
      --active_;  // before the client can see the end, so /health and /metrics agree with the answer
    }
    c.job->push({c.index, std::move(text), reason}, true);
    return false;
  };
  if (std::find(r.stop_ids.begin(), r.stop_ids.end(), id) != r.stop_ids.end()) {
    std::string text = c.stop.push(c.decoder.finish());
    return end(c.stop.stopped() ? text : text + c.stop.flush(), "stop");
  }
  const bool known = id < int64_t(tokenizer_.vocab_size()) && tokenizer_.contains(uint32_t(id));
  std::string text = c.stop.push(known ? c.decoder.push(uint32_t(id)) : std::string());
  if (c.stop.stopped()) return end(std::move(text), "stop");
  if (c.generated >= r.max_tokens) {
    text += c.stop.push(c.decoder.finish());
    if (c.stop.stopped()) return end(std::move(text), "stop");
    return end(text + c.stop.flush(), "length");
  }
  if (!text.empty()) c.job->push({c.index, std::move(text), ""}, false);
  return true;
}

void Engine::leave(int64_t seq) {
  backend_->leave(seq);
  choices_.erase(seq);
}

void Engine::decode() {
  // Cancelled sequences leave before the step.
  std::vector<int64_t> gone;
  for (const auto& [seq, c] : choices_)
    if (c->job->cancelled()) gone.push_back(seq);
  for (int64_t seq : gone) {
    leave(seq);
    std::lock_guard lock(mu_);
    --active_;
    ++metrics_.cancelled;
  }
  if (!choices_.empty()) {
    try {
      backend_->step(stepped_);
      for (const auto& [seq, id] : stepped_) {
        auto it = choices_.find(seq);
        if (it == choices_.end()) continue;
        if (!accept(*it->second, id)) leave(seq);
      }
    } catch (const std::exception& e) {
      // The backend's state can no longer be trusted: every decoding sequence fails.
      std::vector<int64_t> all;
      for (const auto& [seq, c] : choices_) {
        c->job->fail(std::string("decoding failed: ") + e.what());
        all.push_back(seq);
      }
      for (int64_t seq : all) {
        try {
          leave(seq);
        } catch (const std::exception&) {
          choices_.erase(seq);
        }
      }
      std::lock_guard lock(mu_);
      active_ -= int64_t(all.size());
    }
  }
  std::lock_guard lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  if (produced_ > 0) {  // tokens sampled this iteration, first tokens of new choices included
    recent_.emplace_back(now, produced_);
    produced_ = 0;
  }
  while (!recent_.empty() && now - recent_.front().first > std::chrono::seconds(10)) recent_.pop_front();
}

}  // namespace mamba3::server
