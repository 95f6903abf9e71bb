#include "server/cpu_backend.h"

#include <algorithm>

namespace mamba3::server {

struct CpuBackend::Sequence {
  int64_t seq = 0;
  SequenceSampling sampling;
  Sampler sampler;
  std::vector<int64_t> history;                 // prompt + generated ids (repetition penalty)
  std::unordered_map<int64_t, int64_t> counts;  // generated id → times (presence/frequency penalties)
  int64_t last = -1;                            // the token fed at the next step
};

struct CpuBackend::Lane {
  ModelCache cache;
  std::vector<std::unique_ptr<Sequence>> rows;  // rows[r] is row r of cache
  Tensor logits;                                // (lane_rows, V_pad)
  std::vector<int64_t> ids;
};

CpuBackend::CpuBackend(const LanguageModel& model, int64_t lane_rows) : model_(model), lane_rows_(lane_rows) {
  MAMBA3_CHECK(lane_rows >= 1, "engine: lane_rows must be at least 1, got {}", lane_rows);
}

CpuBackend::~CpuBackend() = default;

std::unique_ptr<PromptState> CpuBackend::new_prompt_state() {
  return std::make_unique<CpuPromptState>(model_.new_cache(1));
}

std::unique_ptr<PromptState> CpuBackend::copy(const PromptState& state) {
  return std::make_unique<CpuPromptState>(dynamic_cast<const CpuPromptState&>(state).cache.clone());
}

void CpuBackend::prefill(std::span<const int64_t> ids, PromptState& state, std::vector<float>& logits) {
  Tensor lg = model_.prefill(ids, dynamic_cast<CpuPromptState&>(state).cache, 0);  // (1, V_pad)
  logits.assign(lg.data<float>(), lg.data<float>() + lg.numel());
}

int64_t CpuBackend::sample(Sequence& s, float* logits) {
  const SequenceSampling& sp = s.sampling;
  if (sp.presence_penalty != 0 || sp.frequency_penalty != 0)
    for (const auto& [id, n] : s.counts) {
      // Rounded step by step (volatile: no fused multiply-add), as the GPU sampler does.
      const volatile float scaled = sp.frequency_penalty * float(n);
      logits[id] -= sp.presence_penalty + scaled;
    }
  const int64_t id = s.sampler.sample(logits, model_.config().vocab_padded(), s.history);
  s.history.push_back(id);
  ++s.counts[id];
  s.last = id;
  return id;
}

int64_t CpuBackend::join(int64_t seq, const PromptState& state, std::span<const float> logits,
                         std::span<const int64_t> prompt, const SequenceSampling& sampling) {
  MAMBA3_CHECK(!where_.count(seq), "engine: sequence {} joined twice", seq);
  auto s = std::unique_ptr<Sequence>(new Sequence{seq, sampling, Sampler(sampling.params, model_.config().vocab_size),
                                                  std::vector<int64_t>(prompt.begin(), prompt.end()), {}, -1});
  std::vector<float> first(logits.begin(), logits.end());
  const int64_t id = sample(*s, first.data());
  const ModelCache& row_state = dynamic_cast<const CpuPromptState&>(state).cache;
  Lane* best = nullptr;  // the fullest lane with room
  for (auto& l : lanes_)
    if (int64_t(l->rows.size()) < lane_rows_ && (!best || l->rows.size() > best->rows.size())) best = l.get();
  if (!best) {
    auto lane = std::make_unique<Lane>();
    lane->cache = row_state.fork(0, 1);
    lane->cache.reserve(lane_rows_);
    lane->logits = Tensor::empty(DType::F32, {lane_rows_, model_.config().vocab_padded()});
    best = lane.get();
    lanes_.push_back(std::move(lane));
  } else {
    best->cache.append(row_state);
  }
  best->rows.push_back(std::move(s));
  where_[seq] = best;
  return id;
}

void CpuBackend::leave(int64_t seq) {
  auto it = where_.find(seq);
  if (it == where_.end()) return;
  Lane& lane = *it->second;
  where_.erase(it);
  for (size_t r = 0; r < lane.rows.size(); ++r) {
    if (lane.rows[r]->seq != seq) continue;
    // The last row moves into the freed place (O(one row)).
    lane.cache.remove_row(int64_t(r));
    lane.rows[r] = std::move(lane.rows.back());
    lane.rows.pop_back();
    break;
  }
  if (lane.rows.empty())
    std::erase_if(lanes_, [&](const std::unique_ptr<Lane>& l) { return l.get() == &lane; });
}

void CpuBackend::step(std::vector<std::pair<int64_t, int64_t>>& out) {
  out.clear();
  compact_lanes();
  const int64_t Vp = model_.config().vocab_padded();
  for (auto& lane_ptr : lanes_) {
    Lane& lane = *lane_ptr;
    const int64_t B = int64_t(lane.rows.size());
    if (B == 0) continue;
    lane.ids.resize(size_t(B));
    for (int64_t r = 0; r < B; ++r) lane.ids[size_t(r)] = lane.rows[size_t(r)]->last;
    Tensor logits = lane.logits.slice(0, B);
    model_.step(lane.ids, lane.cache, logits);
    for (int64_t r = 0; r < B; ++r) {
      Sequence& s = *lane.rows[size_t(r)];
      out.emplace_back(s.seq, sample(s, logits.data<float>() + r * Vp));
    }
  }
}

void CpuBackend::compact_lanes() {
  std::erase_if(lanes_, [](const std::unique_ptr<Lane>& l) { return l->rows.empty(); });
  // Merge the two smallest lanes while they fit in one: fewer decode calls per step.
  for (;;) {
    if (lanes_.size() < 2) return;
    std::sort(lanes_.begin(), lanes_.end(), [](const auto& a, const auto& b) { return a->rows.size() < b->rows.size(); });
    Lane& small = *lanes_[0];
    Lane& big = *lanes_[1];
    if (int64_t(small.rows.size() + big.rows.size()) > lane_rows_) return;
    big.cache.append(small.cache);
    for (auto& s : small.rows) {
      where_[s->seq] = &big;
      big.rows.push_back(std::move(s));
    }
    lanes_.erase(lanes_.begin());
  }
}

}  // namespace mamba3::server
