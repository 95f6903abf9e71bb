#include "tokenizer/utf8.h"

namespace mamba3::utf8 {
namespace {

// Length of the valid (possibly unfinished) sequence starting at s[i], following the well-formed byte table of
// Unicode §3.9 (Table 3-7). `complete` is set when the whole sequence is present. A return of 0 means s[i] cannot
// start a sequence; otherwise the value is the count of bytes that belong to the maximal subpart.
size_t scan(std::string_view s, size_t i, bool& complete) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  complete = true;
  if (b0 < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    complete = false;
    return 0;
  }
  size_t k = 1;
  for (; k < need; ++k) {
    if (i + k >= s.size()) {
      complete = false;
      return k;  // ran out of input inside a valid prefix
    }
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) {
      complete = false;
      return k;  // the maximal subpart ends before this byte
    }
  }
  return need;
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

}  // namespace

size_t valid_prefix(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // ASCII fast path: eight bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      __builtin_memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    bool complete;
    const size_t n = scan(s, i, complete);
    if (!complete) return i;
    i += n;
  }
  return s.size();
}

size_t repair_append(std::string_view s, std::string& out, bool hold_incomplete) {
  size_t i = 0;
  while (i < s.size()) {
    const size_t good = valid_prefix(s.substr(i));
    out.append(s.substr(i, good));
    i += good;
    if (i >= s.size()) break;
    bool complete;
    const size_t n = scan(s, i, complete);
    if (n > 0 && i + n == s.size() && hold_incomplete) return n;  // unfinished at the very end: keep for later
    out.append(kReplacement);
    i += n == 0 ? 1 : n;
  }
  return 0;
}

std::string repair(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  repair_append(s, out, false);
  return out;
}

void append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace mamba3::utf8
