#include "server/engine.h"

#include <algorithm>
#include <unordered_map>

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
  Sampler sampler;
  std::vector<int64_t> history;                // prompt + generated ids (repetition penalty)
  std::unordered_map<int64_t, int64_t> counts;  // generated id → times (presence/frequency penalties)
  StreamDecoder decoder;
  StopMatcher stop;
  int64_t generated = 0;
  int64_t last = -1;  // the token fed at the next step
};

struct Engine::Lane {
  ModelCache cache;
  std::vector<std::unique_ptr<Choice>> rows;  // rows[r] is row r of cache
  Tensor logits;                              // (lane_rows, V_pad)
  std::vector<int64_t> ids;
};

struct Engine::Prefill {
  std::shared_ptr<Job> job;
  bool started = false;
  ModelCache cache;                  // 1 row
  std::vector<int64_t> ends;         // ascending segment ends; the last is the prompt length
  std::vector<int64_t> snapshots;    // ends after which the state goes into the prefix cache
  int64_t pos = 0;
  std::vector<float> logits;         // of the last token prefilled (V_pad)
  int64_t accounted = 0;             // choices already placed in a lane or ended (their rows are theirs to release)
};

Engine::Engine(const LanguageModel& model, const Tokenizer& tokenizer, EngineOptions options)
    : model_(model), tokenizer_(tokenizer), options_(options),
      prefix_cache_(std::make_unique<PrefixCache>(options.state_cache_bytes)) {
  MAMBA3_CHECK(options_.max_batch >= 1 && options_.max_queue >= 0 && options_.lane_rows >= 1 &&
                   options_.prefill_block >= 1 && options_.prefill_budget >= 1,
               "engine: max_batch {}, lane_rows {}, prefill_block {}, prefill_budget {} must be at least 1 and "
               "max_queue {} non-negative",
               options_.max_batch, options_.lane_rows, options_.prefill_block, options_.prefill_budget,
               options_.max_queue);
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
  const int64_t V = model_.config().vocab_size;
  MAMBA3_CHECK(!r.prompt.empty(), "the prompt is empty (it must hold at least one token)");
  for (int64_t id : r.prompt) MAMBA3_CHECK(id >= 0 && id < V, "prompt token id {} is outside the vocabulary [0, {})", id, V);
  MAMBA3_CHECK(r.n >= 1 && r.n <= options_.max_batch, "n must lie in [1, {}], got {}", options_.max_batch, r.n);
  MAMBA3_CHECK(r.max_tokens >= 1, "max_tokens must be at least 1, got {}", r.max_tokens);
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
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty() || !prefills_.empty() || !lanes_.empty(); });
      if (stopping_) break;
    }
    admit();
    run_prefills();
    decode_lanes();
    compact_lanes();
    std::lock_guard lock(mu_);
    metrics_.lanes = int64_t(lanes_.size());
    metrics_.cache_bytes = prefix_cache_->bytes();
    metrics_.cache_entries = prefix_cache_->entries();
  }
  // Shutting down: every job still known fails (its request thread then answers or closes the stream).
  std::lock_guard lock(mu_);
  for (auto& j : queue_) j->fail("the server is shutting down");
  for (auto& p : prefills_) p->job->fail("the server is shutting down");
  for (auto& l : lanes_)
    for (auto& c : l->rows) c->job->fail("the server is shutting down");
  queue_.clear(), prefills_.clear(), lanes_.clear();
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
  return !prefills_.empty() || !lanes_.empty();
}

void Engine::run_prefills() {
  const int64_t block = options_.prefill_block;
  int64_t spent = 0;
  for (auto it = prefills_.begin(); it != prefills_.end() && spent < options_.prefill_budget;) {
    Prefill& p = **it;
    const GenerationRequest& r = p.job->request();
    const int64_t L = int64_t(r.prompt.size());
    bool drop = false;
    try {
      if (p.job->cancelled()) {
        drop = true;
        std::lock_guard lock(mu_);
        ++metrics_.cancelled;
      } else {
        if (!p.started) {
          p.started = true;
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
            p.cache = std::move(hit->state);
            p.pos = hit->tokens;
            p.logits = std::move(hit->logits);
            p.job->cached_tokens_ = hit->tokens;
            ++metrics_.cache_hits;
            metrics_.cache_hit_tokens += hit->tokens;
          } else {
            p.cache = model_.new_cache(1);
            ++metrics_.cache_misses;
          }
        }
        while (p.pos < L && spent < options_.prefill_budget) {
          const int64_t end = *std::upper_bound(p.ends.begin(), p.ends.end(), p.pos);
          std::span<const int64_t> seg(r.prompt.data() + p.pos, size_t(end - p.pos));
          Tensor lg = model_.prefill(seg, p.cache, 0);  // (1, V_pad)
          p.logits.assign(lg.data<float>(), lg.data<float>() + lg.numel());
          spent += end - p.pos;
          {
            std::lock_guard lock(mu_);
            metrics_.prefilled_tokens += end - p.pos;
          }
          p.pos = end;
          if (std::find(p.snapshots.begin(), p.snapshots.end(), end) != p.snapshots.end())
            prefix_cache_->insert(std::span(r.prompt).first(size_t(end)), p.cache, p.logits);
        }
        if (p.pos == L) {
          start_choices(p);
          drop = true;
        }
      }
    } catch (const std::exception& e) {
      p.job->fail(std::string("prefill failed: ") + e.what());
      drop = true;
    }
    if (drop) {
      if (p.accounted < r.n) {  // cancelled or failed before every choice was placed or ended
        std::lock_guard lock(mu_);
        active_ -= r.n - p.accounted;
      }
      it = prefills_.erase(it);
    } else {
      ++it;
    }
  }
}

void Engine::start_choices(Prefill& p) {
  const GenerationRequest& r = p.job->request();
  for (int64_t i = 0; i < r.n; ++i) {
    SamplingParams sp = r.sampling;
    sp.seed = r.sampling.seed + uint64_t(i);
    auto c = std::unique_ptr<Choice>(new Choice{p.job, i, Sampler(sp, model_.config().vocab_size), r.prompt, {},
                                                StreamDecoder(tokenizer_), StopMatcher(r.stop), 0, -1});
    std::vector<float> logits = p.logits;
    const bool live = advance(*c, logits.data());
    ++p.accounted;  // from here on the choice's row is released by its lane or was released by advance
    if (live) place(std::move(c), p.cache);
  }
}

void Engine::place(std::unique_ptr<Choice> c, const ModelCache& row_state) {
  Lane* best = nullptr;
  for (auto& l : lanes_)
    if (int64_t(l->rows.size()) < options_.lane_rows && (!best || l->rows.size() > best->rows.size())) best = l.get();
  if (!best) {
    auto lane = std::make_unique<Lane>();
    lane->cache = row_state.fork(0, 1);
    lane->cache.reserve(options_.lane_rows);
    lane->logits = Tensor::empty(DType::F32, {options_.lane_rows, model_.config().vocab_padded()});
    lane->rows.push_back(std::move(c));
    lanes_.push_back(std::move(lane));
    return;
  }
  best->cache.append(row_state);
  best->rows.push_back(std::move(c));
}

bool Engine::advance(Choice& c, float* logits) {
  const GenerationRequest& r = c.job->request();
  if (r.presence_penalty != 0 || r.frequency_penalty != 0)
    for (const auto& [id, n] : c.counts) logits[id] -= r.presence_penalty + r.frequency_penalty * float(n);
  const int64_t id = c.sampler.sample(logits, model_.config().vocab_padded(), c.history);
  ++c.generated;
  ++produced_;
  ++c.job->completion_tokens_;
  c.history.push_back(id);
  ++c.counts[id];
  c.last = id;
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

void Engine::decode_lanes() {
  const int64_t Vp = model_.config().vocab_padded();
  for (auto& lane_ptr : lanes_) {
    Lane& lane = *lane_ptr;
    try {
      // Cancelled sequences leave before the step (the last row moves into the freed place).
      for (int64_t r = int64_t(lane.rows.size()) - 1; r >= 0; --r) {
        if (!lane.rows[size_t(r)]->job->cancelled()) continue;
        lane.cache.remove_row(r);
        lane.rows[size_t(r)] = std::move(lane.rows.back());
        lane.rows.pop_back();
        std::lock_guard lock(mu_);
        --active_;
        ++metrics_.cancelled;
      }
      const int64_t B = int64_t(lane.rows.size());
      if (B == 0) continue;
      lane.ids.resize(size_t(B));
      for (int64_t r = 0; r < B; ++r) lane.ids[size_t(r)] = lane.rows[size_t(r)]->last;
      Tensor logits = lane.logits.slice(0, B);
      model_.step(lane.ids, lane.cache, logits);
      std::vector<int64_t> done;
      for (int64_t r = 0; r < B; ++r)
        if (!advance(*lane.rows[size_t(r)], logits.data<float>() + r * Vp)) done.push_back(r);
      for (auto r = done.rbegin(); r != done.rend(); ++r) {
        lane.cache.remove_row(*r);
        lane.rows[size_t(*r)] = std::move(lane.rows.back());
        lane.rows.pop_back();
      }
    } catch (const std::exception& e) {
      for (auto& c : lane.rows) c->job->fail(std::string("decoding failed: ") + e.what());
      std::lock_guard lock(mu_);
      active_ -= int64_t(lane.rows.size());
      lane.rows.clear();
      lane.cache = ModelCache();
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

void Engine::compact_lanes() {
  std::erase_if(lanes_, [](const std::unique_ptr<Lane>& l) { return l->rows.empty(); });
  // Merge the two smallest lanes while they fit in one: fewer decode calls per step.
  for (;;) {
    if (lanes_.size() < 2) return;
    std::sort(lanes_.begin(), lanes_.end(), [](const auto& a, const auto& b) { return a->rows.size() < b->rows.size(); });
    Lane& small = *lanes_[0];
    Lane& big = *lanes_[1];
    if (int64_t(small.rows.size() + big.rows.size()) > options_.lane_rows) return;
    big.cache.append(small.cache);
    for (auto& c : small.rows) big.rows.push_back(std::move(c));
    lanes_.erase(lanes_.begin());
  }
}

}  // namespace mamba3::server
