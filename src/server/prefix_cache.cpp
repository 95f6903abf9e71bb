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
    return Hit{len, e.state, e.logits};
  }
  return std::nullopt;
}

void PrefixCache::insert(std::span<const int64_t> prefix, const PromptState& state, std::span<const float> logits,
                         const Copier& copy) {
  if (budget_ == 0 || prefix.empty()) return;
  std::string key = key_of(prefix);
  const size_t bytes = state.bytes() + logits.size() * sizeof(float) + key.size();
  if (bytes > budget_) return;
  if (auto it = index_.find(key); it != index_.end()) {  // already there: refresh its recency only
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  evict_to(budget_ - bytes);
  Entry e{key, std::shared_ptr<const PromptState>(copy(state)), std::vector<float>(logits.begin(), logits.end()), bytes};
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
