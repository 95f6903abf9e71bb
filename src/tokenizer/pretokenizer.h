#pragma once
// Pre-tokenization: a regular expression (PCRE2 in UTF + UCP mode, JIT-compiled) cuts text into pieces that BPE then
// encodes one by one. Split behaviour is Hugging Face's "Isolated": every match is a piece, and so is every stretch of
// text between matches (the split patterns below match every character, so in practice only matches occur).
// For the patterns below, positions whose match depends on ASCII characters only are matched by an exact ASCII
// specialisation instead of PCRE2 (ascii_split.h explains and tests/tokenizer checks the equivalence).
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace mamba3 {

// The split patterns of the well-known byte-level BPE vocabularies, as their reference implementations write them.
// `\s` is taken to mean Unicode White_Space (as in Rust's regex and Oniguruma, the engines of tiktoken and
// Hugging Face tokenizers); see SplitRegex.
namespace patterns {
extern const char* const gpt2;    // GPT-2, r50k/p50k, GPT-NeoX (ByteLevel with use_regex)
extern const char* const cl100k;  // GPT-3.5/4
extern const char* const o200k;   // GPT-4o
extern const char* const llama3;  // Llama 3 / 3.1 (tiktoken-style file)
// Returns the pattern for "gpt2" | "r50k" | "cl100k" | "o200k" | "llama3"; throws mamba3::Error otherwise.
const char* by_name(std::string_view name);
}  // namespace patterns

class SplitRegex {
 public:
  // Compiles `pattern` (PCRE2 syntax, which covers the Oniguruma/fancy-regex patterns of tokenizer files). Before
  // compiling, `\s`/`\S` are rewritten to \p{White_Space}/\P{White_Space}: PCRE2 alone would leave out U+0085 (NEL),
  // which the reference engines count as white space. `origin` names the file and entry for error messages.
  SplitRegex(std::string_view pattern, std::string_view origin);
  ~SplitRegex();
  SplitRegex(const SplitRegex&) = delete;
  SplitRegex& operator=(const SplitRegex&) = delete;

  // Calls `f(piece)` for the pieces of `text` (valid UTF-8, not checked), in order; they concatenate to `text`.
  template <typename F>
  void split(std::string_view text, F&& f) const {
    split_impl(text, [](void* ctx, std::string_view piece) { (*static_cast<F*>(ctx))(piece); }, &f, true);
  }
  // Appends the pieces to `out`.
  void split(std::string_view text, std::vector<std::string_view>& out) const {
    split(text, [&out](std::string_view piece) { out.push_back(piece); });
  }
  const std::string& pattern() const { return pattern_; }
  // The same split computed by PCRE2 alone, without the ASCII specialisation (ascii_split.h); for tests.
  void split_pcre2_only(std::string_view text, std::vector<std::string_view>& out) const {
    auto f = [&out](std::string_view piece) { out.push_back(piece); };
    split_impl(text, [](void* ctx, std::string_view piece) { (*static_cast<decltype(f)*>(ctx))(piece); }, &f, false);
  }
  // Whether the pattern is one of those with an exact ASCII specialisation.
  bool has_ascii_fast_path() const;

 private:
  void split_impl(std::string_view text, void (*emit)(void*, std::string_view), void* ctx, bool fast) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string pattern_;
};

// The rewrite that SplitRegex applies (exposed for tests).
std::string rewrite_whitespace_classes(std::string_view pattern);

}  // namespace mamba3
