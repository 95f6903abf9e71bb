#pragma once
// A flat open-addressing hash map from byte strings to a small value, for the hot lookups of encoding (piece → token
// id, piece → cached ids). Keys live in one arena; a slot holds the key's hash tag, length, arena offset and value,
// so a probe touches one slot and, on a tag match, one key. std::unordered_map's node chasing cost ~3× more here.
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace mamba3 {

namespace detail {
inline uint64_t load64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint64_t load32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t fold(uint64_t a, uint64_t b) {
  const __uint128_t p = __uint128_t(a) * b;
  return uint64_t(p) ^ uint64_t(p >> 64);
}
// Equality of two byte ranges of length n without a library call (pieces are mostly a few bytes).
inline bool same_bytes(const char* a, const char* b, size_t n) {
  if (n >= 8) {
    for (size_t i = 0; i + 8 <= n; i += 8)
      if (load64(a + i) != load64(b + i)) return false;
    return load64(a + n - 8) == load64(b + n - 8);
  }
  if (n >= 4) return load32(a) == load32(b) && load32(a + n - 4) == load32(b + n - 4);
  for (size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return false;
  return true;
}
}  // namespace detail

// 64-bit hash of a byte string: every byte is read through (possibly overlapping) fixed-size loads, never past the
// end, and mixed with 64×64→128-bit multiplies.
inline uint64_t hash_bytes(std::string_view s) {
  using namespace detail;
  constexpr uint64_t k0 = 0xa0761d6478bd642full, k1 = 0xe7037ed1a0b428dbull, k2 = 0x8ebc6af09c88c6e3ull;
  const char* p = s.data();
  const size_t n = s.size();
  uint64_t a, b;
  if (n >= 8) {
    uint64_t h = k0 ^ n;
    size_t i = 0;
    for (; i + 16 < n; i += 8) h = fold(h ^ load64(p + i), k1);
    a = load64(p + i) ^ h;
    b = load64(p + n - 8);
  } else if (n >= 4) {
    a = load32(p) << 32 | load32(p + n - 4);
    b = n;
  } else if (n > 0) {
    a = uint64_t(uint8_t(p[0])) << 16 | uint64_t(uint8_t(p[n / 2])) << 8 | uint8_t(p[n - 1]);
    b = n;
  } else {
    a = b = 0;
  }
  return fold(a ^ k1, b ^ k2 ^ n);
}

template <typename Value>
class StringTable {
 public:
  size_t size() const { return count_; }
  bool empty() const { return count_ == 0; }
  void clear() {
    arena_.clear();
    slots_.assign(slots_.size(), Slot{});
    count_ = 0;
  }

  const Value* find(std::string_view key) const {
    if (slots_.empty()) return nullptr;
    const uint64_t h = hash_bytes(key);
    const uint32_t tag = uint32_t(h >> 32) | 1;  // never 0: 0 marks an empty slot
    const size_t mask = slots_.size() - 1;
    for (size_t i = size_t(h) & mask;; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (s.tag == 0) return nullptr;
      if (s.tag == tag && s.len == key.size() && detail::same_bytes(arena_.data() + s.offset, key.data(), key.size()))
        return &s.value;
    }
  }
  // Inserts key → value unless the key is present; returns false (changing nothing) if it was.
  bool insert(std::string_view key, const Value& value) {
    if ((count_ + 1) * 2 > slots_.size()) grow();
    const uint64_t h = hash_bytes(key);
    const uint32_t tag = uint32_t(h >> 32) | 1;
    const size_t mask = slots_.size() - 1;
    size_t i = size_t(h) & mask;
    for (;; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (s.tag == 0) break;
      if (s.tag == tag && s.len == key.size() && detail::same_bytes(arena_.data() + s.offset, key.data(), key.size()))
        return false;
    }
    slots_[i] = Slot{tag, uint32_t(key.size()), uint32_t(arena_.size()), value};
    arena_.append(key);
    ++count_;
    return true;
  }
  // Visits every (key, value), in no particular order.
  template <typename F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_)
      if (s.tag != 0) f(std::string_view(arena_.data() + s.offset, s.len), s.value);
  }

 private:
  struct Slot {
    uint32_t tag = 0, len = 0, offset = 0;
    Value value{};
  };
  void grow() {
    std::vector<Slot> old(slots_.empty() ? 64 : slots_.size() * 2);
    slots_.swap(old);
    const size_t mask = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.tag == 0) continue;
      size_t i = size_t(hash_bytes(std::string_view(arena_.data() + s.offset, s.len))) & mask;
      while (slots_[i].tag != 0) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }
  std::vector<Slot> slots_;
  std::string arena_;
  size_t count_ = 0;
};

}  // namespace mamba3
