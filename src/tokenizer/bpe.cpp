#include "tokenizer/bpe.h"

#include <algorithm>
#include <cstring>
#include <queue>

#include "core/error.h"

namespace mamba3 {

namespace {
inline size_t mix(uint64_t k) {
  k ^= k >> 31;
  k *= 0x7fb5d329728ea185ull;
  k ^= k >> 27;
  return size_t(k);
}
constexpr uint32_t kNoRank = UINT32_MAX;
}  // namespace

bool BpeModel::add_token(uint32_t id, std::string_view bytes) {
  if (!byte_ids_init_) {
    std::fill(std::begin(byte_ids_), std::end(byte_ids_), kNone);
    byte_ids_init_ = true;
  }
  if (bytes.size() == 1) {
    auto& slot = byte_ids_[static_cast<unsigned char>(bytes[0])];
    if (slot == kNone) slot = id;
  }
  return token_ids_.insert(bytes, id);
}

void BpeModel::grow_pairs() {
  std::vector<Pair> old = std::move(pairs_);
  pairs_.assign(old.empty() ? 1024 : old.size() * 2, Pair{});
  const size_t mask = pairs_.size() - 1;
  for (const Pair& p : old) {
    if (p.key == kEmpty) continue;
    size_t i = mix(p.key) & mask;
    while (pairs_[i].key != kEmpty) i = (i + 1) & mask;
    pairs_[i] = p;
  }
}

void BpeModel::add_merge(uint32_t left, uint32_t right, uint32_t rank, uint32_t merged) {
  if ((pair_count_ + 1) * 2 > pairs_.size()) grow_pairs();
  const uint64_t key = pair_key(left, right);
  const size_t mask = pairs_.size() - 1;
  size_t i = mix(key) & mask;
  while (pairs_[i].key != kEmpty && pairs_[i].key != key) i = (i + 1) & mask;
  if (pairs_[i].key == kEmpty) ++pair_count_;
  pairs_[i] = Pair{key, rank, merged};
}

void BpeModel::add_merges_from_ranks() {
  token_ids_.for_each([&](std::string_view t, uint32_t id) {
    for (size_t k = 1; k < t.size(); ++k) {
      const auto l = find(t.substr(0, k));
      if (!l) continue;
      const auto r = find(t.substr(k));
      if (r) add_merge(*l, *r, id, id);
    }
  });
}

std::optional<uint32_t> BpeModel::find(std::string_view bytes) const {
  const uint32_t* id = token_ids_.find(bytes);
  if (!id) return std::nullopt;
  return *id;
}

const BpeModel::Pair* BpeModel::find_pair(uint32_t l, uint32_t r) const {
  if (pairs_.empty()) return nullptr;
  const uint64_t key = pair_key(l, r);
  const size_t mask = pairs_.size() - 1;
  size_t i = mix(key) & mask;
  while (true) {
    const Pair& p = pairs_[i];
    if (p.key == key) return &p;
    if (p.key == kEmpty) return nullptr;
    i = (i + 1) & mask;
  }
}

uint32_t BpeModel::byte_token(unsigned char b) const {
  const uint32_t id = byte_ids_init_ ? byte_ids_[b] : kNone;
  if (id == kNone) fail("the vocabulary has no token for byte 0x{:02X}, which the input needs", b);
  return id;
}

void BpeModel::encode_piece(std::string_view piece, std::vector<uint32_t>& out) const {
  if (piece.size() == 1) {
    out.push_back(byte_token(static_cast<unsigned char>(piece[0])));
    return;
  }
  if (whole_piece_) {
    if (const auto id = find(piece)) {
      out.push_back(*id);
      return;
    }
  }
  if (pair_count_ == 0) {
    for (unsigned char b : piece) out.push_back(byte_token(b));
    return;
  }
  merge(piece, out);
}

void BpeModel::merge_scan(std::string_view piece, std::vector<uint32_t>& out) const {
  const size_t n = piece.size();
  // ids[i]: token i of the current split; rank[i]/merged[i]: the merge of tokens i and i+1, if any.
  std::vector<uint32_t> buffer(3 * n);
  uint32_t* ids = buffer.data();
  uint32_t* rank = ids + n;
  uint32_t* merged = rank + n;
  for (size_t i = 0; i < n; ++i) ids[i] = byte_token(static_cast<unsigned char>(piece[i]));
  auto update = [&](size_t i, size_t m) {
    const Pair* p = i + 1 < m ? find_pair(ids[i], ids[i + 1]) : nullptr;
    rank[i] = p ? p->rank : kNoRank;
    merged[i] = p ? p->merged : 0;
  };
  size_t m = n;
  for (size_t i = 0; i < m; ++i) update(i, m);
  while (m > 1) {
    size_t best = 0;
    uint32_t best_rank = kNoRank;
    for (size_t i = 0; i + 1 < m; ++i)
      if (rank[i] < best_rank) {
        best_rank = rank[i];
        best = i;
      }
    if (best_rank == kNoRank) break;
    ids[best] = merged[best];
    const size_t tail = m - best - 2;  // entries after best+1
    std::memmove(ids + best + 1, ids + best + 2, tail * sizeof(uint32_t));
    std::memmove(rank + best + 1, rank + best + 2, tail * sizeof(uint32_t));
    std::memmove(merged + best + 1, merged + best + 2, tail * sizeof(uint32_t));
    --m;
    update(best, m);
    if (best > 0) update(best - 1, m);
  }
  out.insert(out.end(), ids, ids + m);
}

void BpeModel::merge_heap(std::string_view piece, std::vector<uint32_t>& out) const {
  const size_t n = piece.size();
  // A doubly linked list over byte positions; a merge keeps the left node. Heap entries are checked lazily: an entry
  // is live when both nodes still hold the ids it was made from (a node's token only ever grows, so ids identify
  // its state).
  std::vector<uint32_t> ids(n), prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    ids[i] = byte_token(static_cast<unsigned char>(piece[i]));
    prev[i] = uint32_t(i) - 1;  // wraps to UINT32_MAX for the first
    next[i] = uint32_t(i + 1);
  }
  struct Entry {
    uint32_t rank, pos, left, right;
    bool operator>(const Entry& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;
  auto push = [&](uint32_t i) {
    if (i == UINT32_MAX || next[i] >= n) return;
    if (const Pair* p = find_pair(ids[i], ids[next[i]])) heap.push({p->rank, i, ids[i], ids[next[i]]});
  };
  for (uint32_t i = 0; i + 1 < n; ++i) push(i);
  std::vector<bool> dead(n, false);
  while (!heap.empty()) {
    const Entry e = heap.top();
    heap.pop();
    const uint32_t i = e.pos;
    if (dead[i] || next[i] >= n || ids[i] != e.left || ids[next[i]] != e.right) continue;
    const uint32_t j = next[i];
    ids[i] = find_pair(e.left, e.right)->merged;
    dead[j] = true;
    next[i] = next[j];
    if (next[j] < n) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  for (uint32_t i = 0; i < n; i = next[i]) out.push_back(ids[i]);
}

}  // namespace mamba3
