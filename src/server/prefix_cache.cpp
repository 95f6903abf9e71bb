#include "server/prefix_cache.h"

#include <algorithm>
#include <cstring>

namespace mamba3::server {

std::string PrefixCache::key_of(std::span<const int64_t> prefix) {
  std::string key(prefix.size() * sizeof(int64_t), '\0');
  if (!prefix.empty()) std::memcpy(key.data(), prefix.data(), key.size());
  return key;
}

std::optional<PrefixCache::Hit> PrefixCache::lookup(std::span<const int64_t> ids, std::span<const int64_t> lengths) {
  if (lru_.empty()) return std::nullopt;
  std::vector<int64_t> order(lengths.begin(), lengths.end());
  std::sort(order.rbegin(), order.rend());
  for (int64_t len : order) {
    if (len < 1 || len > int64_t(ids.size())) continue;
    auto it = index_.find(key_of(ids.first(size_t(len))));
    if (it == index_.end()) continue;
    lru_.splice(lru_.begin(), lru_, it->second);  // now most recently used
    const Entry& e = *it->second;
    return Hit{len, e.state.clone(), e.logits};
  }
  return std::nullopt;
}

void PrefixCache::insert(std::span<const int64_t> prefix, const ModelCache& state, std::span<const float> logits) {
  if (budget_ == 0 || prefix.empty()) return;
  std::string key = key_of(prefix);
  const size_t bytes = state.nbytes() / size_t(std::max<int64_t>(state.batch(), 1)) + logits.size() * sizeof(float) +
                       key.size();
  if (bytes > budget_) return;
  if (auto it = index_.find(key); it != index_.end()) {  // already there: refresh its recency only
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  evict_to(budget_ - bytes);
  Entry e{key, state.batch() == 1 ? state.clone() : state.fork(0, 1), std::vector<float>(logits.begin(), logits.end()),
          bytes};
  lru_.push_front(std::move(e));
  index_.emplace(std::move(key), lru_.begin());
  bytes_ += bytes;
}

void PrefixCache::evict_to(size_t budget) {
  while (bytes_ > budget && !lru_.empty()) {
    bytes_ -= lru_.back().bytes;
    index_.erase(lru_.back().key);
    lru_.pop_back();
  }
}

}  // namespace mamba3::server
