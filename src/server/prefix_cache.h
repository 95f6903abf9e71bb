#pragma once
// A bounded LRU cache of decode states keyed by token prefixes: the state (one cache row) after prefilling exactly
// `prefix`, with the logits of its last token. A request whose prompt starts with a stored prefix continues from a
// copy of that state and prefills only the rest. Entries are evicted, least recently used first, to stay within
// the byte budget (state bytes + logits + key). Not thread-safe: the engine thread owns it.
#include <cstdint>
#include <list>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include <functional>
#include <memory>

#include "server/engine_backend.h"

namespace mamba3::server {

class PrefixCache {
 public:
  explicit PrefixCache(size_t budget_bytes) : budget_(budget_bytes) {}

  struct Hit {
    int64_t tokens = 0;         // length of the matched prefix
    std::shared_ptr<const PromptState> state;  // the stored state: copy it before continuing
    std::vector<float> logits;  // (V_pad) of the prefix's last token
  };
  // The longest stored prefix of `ids` whose length is one of `lengths` (any order; each in [1, ids.size()]).
  std::optional<Hit> lookup(std::span<const int64_t> ids, std::span<const int64_t> lengths);
  // Stores copy(state) for `prefix` (copy is called only when the entry is stored). Skipped when one entry alone
  // exceeds the budget.
  using Copier = std::function<std::unique_ptr<PromptState>(const PromptState&)>;
  void insert(std::span<const int64_t> prefix, const PromptState& state, std::span<const float> logits,
              const Copier& copy);

  size_t bytes() const { return bytes_; }
  size_t entries() const { return lru_.size(); }
  size_t budget() const { return budget_; }

 private:
  struct Entry {
    std::string key;  // the prefix's token ids as raw bytes
    std::shared_ptr<const PromptState> state;
    std::vector<float> logits;
    size_t bytes = 0;
  };
  static std::string key_of(std::span<const int64_t> prefix);
  void evict_to(size_t budget);

  size_t budget_, bytes_ = 0;
  std::list<Entry> lru_;  // most recently used first
  std::unordered_map<std::string, std::list<Entry>::iterator> index_;
};

}  // namespace mamba3::server
