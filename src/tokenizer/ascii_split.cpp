#include "tokenizer/ascii_split.h"

#include <array>
#include <cstdint>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "tokenizer/pretokenizer.h"

namespace mamba3 {
namespace {

// Character classes of an ASCII byte; kHigh marks a byte ≥ 0x80 (never classified). The end of the text has class 0.
enum : uint8_t {
  kUpper = 1,   // [A-Z]   \p{Lu}
  kLower = 2,   // [a-z]   \p{Ll}
  kDigit = 4,   // [0-9]   \p{N}
  kSpace = 8,   // [\t\n\v\f\r ]   \p{White_Space}
  kNewline = 16,  // [\r\n]
  kOther = 32,  // every other ASCII byte: [^\s\p{L}\p{N}]
  kHigh = 64,   // ≥ 0x80: undecided
  kSlash = 128,  // '/' (also kOther)
  kLetter = kUpper | kLower,
};

constexpr std::array<uint8_t, 256> make_classes() {
  std::array<uint8_t, 256> t{};
  for (int c = 0; c < 256; ++c) {
    uint8_t k;
    if (c >= 0x80)
      k = kHigh;
    else if (c >= 'A' && c <= 'Z')
      k = kUpper;
    else if (c >= 'a' && c <= 'z')
      k = kLower;
    else if (c >= '0' && c <= '9')
      k = kDigit;
    else if (c == '\n' || c == '\r')
      k = kSpace | kNewline;
    else if (c == '\t' || c == '\v' || c == '\f' || c == ' ')
      k = kSpace;
    else
      k = c == '/' ? kOther | kSlash : kOther;
    t[size_t(c)] = k;
  }
  return t;
}
constexpr std::array<uint8_t, 256> kClass = make_classes();

constexpr size_t kUndecided = SIZE_MAX;  // ascii_match reports it as 0 (a real match end is always > pos ≥ 0)

struct Text {
  const unsigned char* s;
  size_t n;
  uint8_t at(size_t k) const { return k < n ? kClass[s[k]] : 0; }
  // The end of the run of characters in `mask` from k (greedy `[mask]*`), or kUndecided when the character that
  // ends it is non-ASCII (it might belong to the class).
  size_t run(size_t k, uint8_t mask) const {
#if defined(__SSE2__)
    // Letter runs (most of the text) 16 bytes at a time: a byte b is in [lo, hi] iff b + (128 - lo), wrapped and
    // read as signed, is below -128 + (hi - lo + 1); upper and lower case together through b | 0x20. Exact for every
    // byte value; the scalar loop below finishes the run.
    if (mask == kLetter || mask == kUpper || mask == kLower) {
      const __m128i fold = _mm_set1_epi8(mask == kLetter ? 0x20 : 0);
      const char lo = mask == kUpper ? 'A' : 'a';
      const __m128i shift = _mm_set1_epi8(char(128 - lo)), limit = _mm_set1_epi8(char(-128 + 26));
      while (k + 16 <= n) {
        const __m128i v = _mm_or_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)), fold);
        const unsigned in = unsigned(_mm_movemask_epi8(_mm_cmplt_epi8(_mm_add_epi8(v, shift), limit)));
        if (in != 0xFFFF) {
          k += size_t(__builtin_ctz(~in));
          return s[k] >= 0x80 ? kUndecided : k;
        }
        k += 16;
      }
    }
#endif
    while (k < n && (kClass[s[k]] & mask)) ++k;
    return k < n && s[k] >= 0x80 ? kUndecided : k;
  }
  // The contractions 's|'t|'re|'ve|'m|'ll|'d at k (s[k] == '\''), in that order; case-insensitive when `fold`.
  // Returns the end, k when none matches, or kUndecided when a character it reads is non-ASCII.
  size_t contraction(size_t k, bool fold) const {
    if (k + 1 >= n) return k;
    unsigned char c1 = s[k + 1];
    if (c1 >= 0x80) return kUndecided;
    if (fold && (kClass[c1] & kUpper)) c1 |= 0x20;
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return k + 2;
    if (c1 != 'r' && c1 != 'v' && c1 != 'l') return k;
    if (k + 2 >= n) return k;
    unsigned char c2 = s[k + 2];
    if (c2 >= 0x80) return kUndecided;
    if (fold && (kClass[c2] & kUpper)) c2 |= 0x20;
    return c2 == (c1 == 'l' ? 'l' : 'e') ? k + 3 : k;
  }
  // `\s*[\r\n]+|\s+(?!\S)|\s+` at i (s[i] white space), for cl100k/llama3/o200k; `\s+(?!\S)|\s+` when !newline_alt.
  //  - \s* takes the whole white-space run [i, j) first, and [\r\n]+ cannot match at j (not white space); giving
  //    back one character at a time, the first position p with s[p] in [\r\n] (scanning down from j-1) lets
  //    [\r\n]+ match, and it takes only s[p] since no later character of the run is \r or \n: match [i, p+1).
  //  - Otherwise \s+ takes [i, j): at the end of the text (?!\S) holds, so [i, j); before a non-space it fails, and
  //    giving back one character leaves a space after the match, so [i, j-1) when that is not empty.
  //  - Otherwise (a single space before a non-space) \s+ matches [i, i+1).
  size_t spaces(size_t i, bool newline_alt) const {
    const size_t j = run(i, kSpace);
    if (j == kUndecided) return kUndecided;
    if (newline_alt)
      for (size_t p = j; p > i; --p)
        if (kClass[s[p - 1]] & kNewline) return p;
    if (j == n) return j;
    return j - 1 > i ? j - 1 : j;
  }
};

// gpt2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
size_t match_gpt2(const Text& t, size_t i) {
  const unsigned char c = t.s[i];
  const uint8_t k = kClass[c];
  if (c == '\'') {
    const size_t r = t.contraction(i, false);
    if (r != i) return r;  // a contraction, or undecided
  }
  if (k & kLetter) return t.run(i, kLetter);
  if (k & kDigit) return t.run(i, kDigit);
  if (c == ' ') {  // the optional space of the next three alternatives, taken when a run of their class follows
    const uint8_t k1 = t.at(i + 1);
    if (k1 & kHigh) return kUndecided;
    if (k1 & kLetter) return t.run(i + 1, kLetter);
    if (k1 & kDigit) return t.run(i + 1, kDigit);
    if (k1 & kOther) return t.run(i + 1, kOther);
  }
  if (k & kOther) return t.run(i, kOther);
  return t.spaces(i, false);
}

// cl100k and llama3:
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
size_t match_cl100k(const Text& t, size_t i) {
  const unsigned char c = t.s[i];
  const uint8_t k = kClass[c];
  if (c == '\'') {
    const size_t r = t.contraction(i, true);
    if (r != i) return r;
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+ : a letter run from i; or, when s[i] is in the optional class, the optional character
  // followed by a letter run from i+1 (taking it is tried first; without it \p{L}+ fails at the non-letter s[i]).
  if (k & kLetter) return t.run(i, kLetter);
  if (k & kDigit) {  // \p{N}{1,3}
    size_t j = i + 1;
    while (j < i + 3 && j < t.n && (kClass[t.s[j]] & kDigit)) ++j;
    return j < i + 3 && j < t.n && t.s[j] >= 0x80 ? kUndecided : j;
  }
  if (!(k & kNewline)) {
    const uint8_t k1 = t.at(i + 1);
    if (k1 & kHigh) return kUndecided;
    if (k1 & kLetter) return t.run(i + 1, kLetter);
    if (c == ' ' && (k1 & kOther)) {  // ` ?[^\s\p{L}\p{N}]+[\r\n]*` with the space
      const size_t j = t.run(i + 1, kOther);
      return j == kUndecided ? kUndecided : t.run(j, kNewline);
    }
  }
  if (k & kOther) {  // the same without the space; the trailing [\r\n]* never fails, so greedy runs are the match
    const size_t j = t.run(i, kOther);
    return j == kUndecided ? kUndecided : t.run(j, kNewline);
  }
  return t.spaces(i, true);
}

// o200k:
// [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
// |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
// |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
// On ASCII the two letter classes are [A-Z] and [a-z], which are disjoint.
struct O200kWord {
  const Text& t;
  static constexpr size_t kFail = SIZE_MAX - 1;
  // The optional contraction after the letters, at e (s[e] is ASCII or the end).
  size_t suffix(size_t e) const {
    if (e < t.n && t.s[e] == '\'') return t.contraction(e, true);  // e itself when none matches
    return e;
  }
  // First alternative's letters from a: [A-Z]* takes the upper-case run [a, b); [a-z]+ needs s[b] lower-case
  // (giving back upper-case letters cannot help: they are not lower-case), then takes the lower-case run.
  size_t first(size_t a) const {
    const size_t b = t.run(a, kUpper);
    if (b == kUndecided) return kUndecided;
    if (!(t.at(b) & kLower)) return kFail;
    const size_t e = t.run(b, kLower);
    return e == kUndecided ? kUndecided : suffix(e);
  }
  // Second alternative's letters from a: a non-empty upper-case run, then the (possibly empty) lower-case run.
  size_t second(size_t a) const {
    const size_t b = t.run(a, kUpper);
    if (b == kUndecided) return kUndecided;
    if (b == a) return kFail;
    const size_t e = t.run(b, kLower);
    return e == kUndecided ? kUndecided : suffix(e);
  }
  // Both alternatives from a, in order (kFail when neither matches).
  size_t either(size_t a) const {
    const size_t r = first(a);
    return r != kFail ? r : second(a);
  }
};

size_t match_o200k(const Text& t, size_t i) {
  const unsigned char c = t.s[i];
  const uint8_t k = kClass[c];
  const O200kWord w{t};
  if (k & kLetter) return w.either(i);  // s[i] is not in the optional class, so the optional part is empty
  if (k & kDigit) {
    size_t j = i + 1;
    while (j < i + 3 && j < t.n && (kClass[t.s[j]] & kDigit)) ++j;
    return j < i + 3 && j < t.n && t.s[j] >= 0x80 ? kUndecided : j;
  }
  if (!(k & kNewline)) {
    // The optional class holds s[i]; taking it is tried first in each alternative. Without it the letters would
    // have to start at the non-letter s[i], so both alternatives fail; with it they start at i+1 (a letter there is
    // needed for either to match).
    const uint8_t k1 = t.at(i + 1);
    if (k1 & kHigh) return kUndecided;
    if (k1 & kLetter) {
      const size_t r = w.either(i + 1);
      if (r != O200kWord::kFail) return r;
    }
    if (c == ' ' && (k1 & kOther)) {
      const size_t j = t.run(i + 1, kOther);
      return j == kUndecided ? kUndecided : t.run(j, kNewline | kSlash);
    }
  }
  if (k & kOther) {
    const size_t j = t.run(i, kOther);
    return j == kUndecided ? kUndecided : t.run(j, kNewline | kSlash);
  }
  return t.spaces(i, true);
}

}  // namespace

AsciiPattern ascii_pattern_for(std::string_view pattern) {
  if (pattern == patterns::gpt2) return AsciiPattern::Gpt2;
  if (pattern == patterns::cl100k || pattern == patterns::llama3) return AsciiPattern::Cl100k;
  if (pattern == patterns::o200k) return AsciiPattern::O200k;
  return AsciiPattern::None;
}

size_t ascii_match(AsciiPattern p, const char* s, size_t n, size_t pos) {
  const Text t{reinterpret_cast<const unsigned char*>(s), n};
  size_t end = kUndecided;
  switch (p) {
    case AsciiPattern::Gpt2:
      end = match_gpt2(t, pos);
      break;
    case AsciiPattern::Cl100k:
      end = match_cl100k(t, pos);
      break;
    case AsciiPattern::O200k:
      end = match_o200k(t, pos);
      break;
    case AsciiPattern::None:
      break;
  }
  return end == kUndecided ? 0 : end;
}

}  // namespace mamba3
