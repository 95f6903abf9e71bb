#pragma once
// An exact specialisation of the known split patterns to ASCII text: for a position whose match PCRE2 would decide by
// looking only at ASCII characters, it computes that match without calling PCRE2; whenever it would have to look at a
// byte ≥ 0x80 it answers "undecided" and SplitRegex asks PCRE2 instead. It is not an approximation of the regex:
//
//  * Scope. Only the four pattern strings of patterns:: (gpt2, cl100k, o200k, llama3 — llama3 is the cl100k string;
//    a tokenizer.json whose Split regex is byte-for-byte one of them qualifies too). Any other pattern has no fast
//    path. The patterns have no anchors and no lookbehind, so the match PCRE2 returns for start offset `pos` depends
//    only on the characters from `pos` on that its backtracking search inspects.
//  * Classes. On ASCII the Unicode properties of the patterns reduce to fixed sets: \p{L} = [A-Za-z] (\p{Lu} = [A-Z],
//    \p{Ll} = [a-z]; \p{Lt}, \p{Lm}, \p{Lo} and \p{M} have no ASCII members), \p{N} = [0-9], and \s (rewritten to
//    \p{White_Space}) = [\t\n\v\f\r ] — U+001C..U+001F are not White_Space. Case-insensitive letters of the
//    contractions (?i:'s|…) fold to non-ASCII characters too (U+017F ſ folds to s), which is one more reason why a
//    non-ASCII byte is never classified here.
//  * Search order. Each scanner below walks the alternatives of its pattern in PCRE2's order (leftmost alternative
//    first, greedy quantifiers longest first, backtracking one character at a time), with the outcome of every step
//    worked out in closed form for runs of one class (derivations next to the code). It reads a character only
//    where the backtracking search would, plus at most the one character that ends a run. If any character it reads
//    is non-ASCII it returns 0 ("undecided") before deciding anything, so every decided result is computed from
//    ASCII characters alone, where the class sets above are exact.
//  * Every ASCII character matches some alternative at its own position (letters, digits, white space and "other"
//    each have one), so PCRE2's unanchored search from `pos` also returns a match that starts at `pos`, which is
//    what the scanner reports.
//
// tests/tokenizer/test_unit.cpp checks the claim by comparing the pieces with PCRE2's on every string of up to
// 4 characters over an alphabet that covers every class and contraction letter (with non-ASCII letters, digits,
// marks, white space and ſ mixed in), on every 1- and 2-byte ASCII string, on random strings, and on the Brown
// corpus and the reference test strings (test_refs.cpp).
#include <cstddef>
#include <string_view>

namespace mamba3 {

enum class AsciiPattern : unsigned char { None, Gpt2, Cl100k, O200k };

// Which scanner applies to a split pattern (the pattern as written, before the \s rewrite).
AsciiPattern ascii_pattern_for(std::string_view pattern);

// The end of the match that starts at `pos` (pos < n, s[pos] < 0x80), or 0 when the answer depends on a non-ASCII
// character. Defined for p != None.
size_t ascii_match(AsciiPattern p, const char* s, size_t n, size_t pos);

}  // namespace mamba3
