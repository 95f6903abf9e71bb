#include "tokenizer/byte_level.h"

#include <array>

#include "tokenizer/utf8.h"

namespace mamba3::byte_level {
namespace {

// Bytes that are printable Latin-1 keep their own code point; the others (controls, space, DEL, NBSP, soft hyphen)
// take 256, 257, … in byte order.
bool keeps_itself(unsigned b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; }

struct Tables {
  std::array<char32_t, 256> to{};
  std::array<int, 512> from{};  // every symbol is below 0x144
  Tables() {
    from.fill(-1);
    char32_t next = 256;
    for (unsigned b = 0; b < 256; ++b) {
      to[b] = keeps_itself(b) ? char32_t(b) : next++;
      from[to[b]] = int(b);
    }
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

char32_t to_symbol(unsigned char b) { return tables().to[b]; }

std::optional<unsigned char> from_symbol(char32_t cp) {
  if (cp >= 512 || tables().from[cp] < 0) return std::nullopt;
  return static_cast<unsigned char>(tables().from[cp]);
}

std::optional<std::string> decode(std::string_view s) {
  if (!utf8::is_valid(s)) return std::nullopt;
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    char32_t cp;
    if (b0 < 0x80) {
      cp = b0;
      i += 1;
    } else if (b0 < 0xE0) {
      cp = char32_t(b0 & 0x1F) << 6 | (static_cast<unsigned char>(s[i + 1]) & 0x3F);
      i += 2;
    } else {
      return std::nullopt;  // every symbol is below U+0800
    }
    const auto b = from_symbol(cp);
    if (!b) return std::nullopt;
    out += static_cast<char>(*b);
  }
  return out;
}

std::string encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) utf8::append(out, to_symbol(b));
  return out;
}

}  // namespace mamba3::byte_level
