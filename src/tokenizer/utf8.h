#pragma once
// UTF-8 helpers shared by the tokenizers: validation, lossy repair, and finding where a byte stream can be cut.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace mamba3::utf8 {

// Length in bytes of the longest valid UTF-8 prefix of `s`.
size_t valid_prefix(std::string_view s);
inline bool is_valid(std::string_view s) { return valid_prefix(s) == s.size(); }

// `s` with every maximal invalid subpart replaced by U+FFFD (EF BF BD) — the WHATWG/Unicode rule that JavaScript's
// TextDecoder and Rust's String::from_utf8_lossy follow, so text repaired here matches what the references see.
std::string repair(std::string_view s);
// Appends repair(s) to `out`. When `hold_incomplete` is set, a trailing sequence that is a valid but unfinished
// prefix of a character is not written; the number of bytes held back is returned (0 otherwise).
size_t repair_append(std::string_view s, std::string& out, bool hold_incomplete);

// Appends the UTF-8 encoding of code point `cp` (must be a scalar value).
void append(std::string& out, char32_t cp);

}  // namespace mamba3::utf8
