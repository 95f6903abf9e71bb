#pragma once
// GPT-2's byte-level alphabet: each of the 256 byte values is written as one printable code point in the strings of a
// Hugging Face tokenizer.json (space becomes 'Ġ' U+0120, newline 'Ċ' U+010A, …). The engine keeps raw bytes
// internally and converts only when reading such a file.
#include <optional>
#include <string>
#include <string_view>

namespace mamba3::byte_level {

// The code point that stands for byte `b`.
char32_t to_symbol(unsigned char b);
// The byte a code point stands for, or nullopt when it is not one of the 256 symbols.
std::optional<unsigned char> from_symbol(char32_t cp);
// Decodes a byte-level string (UTF-8 of symbols) into raw bytes; nullopt if a character is not a symbol or the
// string is not valid UTF-8.
std::optional<std::string> decode(std::string_view symbols);
// Encodes raw bytes as a byte-level string.
std::string encode(std::string_view bytes);

}  // namespace mamba3::byte_level
