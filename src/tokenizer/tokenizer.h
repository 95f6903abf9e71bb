#pragma once
// Byte-level BPE tokenizers: Hugging Face tokenizer.json (model BPE, byte-level pre-tokenizer/decoder), tiktoken rank
// files (base64 token + rank per line, with a named split pattern and its special tokens), and a plain byte
// tokenizer (ids 0–255 are the bytes, specials follow). Immutable once loaded; copies share the tables; every
// method is const and safe to call from several threads.
//
//   auto tok = Tokenizer::load("models/x/tokenizer.json");
//   std::vector<uint32_t> ids = tok.encode("Hello world");     // special-token text is encoded as plain text
//   std::string text = tok.decode(ids);                         // == "Hello world"
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/added_tokens.h"

namespace mamba3 {

class Tokenizer {
 public:
  enum class Kind { HuggingFace, Tiktoken, Bytes };

  // A tokenizer.json (by its leading '{') or a tiktoken rank file; `pattern` applies to rank files only.
  static Tokenizer load(const std::string& path, std::string_view pattern = {});
  // Hugging Face tokenizer.json. `origin` names the source in error messages.
  static Tokenizer from_hf_json(const std::string& path);
  static Tokenizer from_hf_json_text(std::string_view json, const std::string& origin);
  // tiktoken rank file. `pattern`: "cl100k" | "o200k" | "llama3" | "gpt2" (alias "r50k"), which also selects the
  // special tokens; empty picks it from the number of ranks (100256, 199998, 128000, 50256) or fails.
  static Tokenizer from_tiktoken(const std::string& path, std::string_view pattern = {});
  static Tokenizer from_tiktoken_text(std::string_view text, const std::string& origin, std::string_view pattern);
  // Bytes: ids 0–255 are the bytes; `specials` take ids 256, 257, …
  static Tokenizer bytes(const std::vector<std::string>& specials = {});
  // The tokenizer of a model directory: tokenizer.json, else tokenizer.model (a tiktoken rank file, as Llama 3 ships).
  static Tokenizer from_model_dir(const std::string& dir);

  // Text → ids. Invalid UTF-8 is first repaired (each maximal invalid subpart becomes U+FFFD), which is what the
  // references do when bytes reach them as a string. Special tokens in the text become their ids only when
  // `allow_special`; otherwise they are encoded as ordinary text. Non-special added tokens are always matched.
  // With `threads` > 1, a long text (≥ 1 MiB) is cut at line starts where the split pattern provably cannot match
  // across (see tokenizer.cpp) and the parts are encoded on that many threads (a small pool that lives as long as
  // the process); the ids are the same as with one thread.
  std::vector<uint32_t> encode(std::string_view text, bool allow_special = false, unsigned threads = 1) const;
  void encode_into(std::string_view text, bool allow_special, std::vector<uint32_t>& out, unsigned threads = 1) const;
  // Ids → bytes, concatenated (may be invalid UTF-8 when a character is split across tokens).
  std::string decode_bytes(std::span<const uint32_t> ids) const;
  // Ids → text: decode_bytes with invalid sequences replaced by U+FFFD, as the references decode.
  std::string decode(std::span<const uint32_t> ids) const;

  // The bytes of one token (a special token's text for special ids). Throws for an id outside the vocabulary.
  const std::string& token_bytes(uint32_t id) const;
  bool contains(uint32_t id) const;
  // One more than the largest id (regular or added).
  uint32_t vocab_size() const;
  // Id of an added/special token by its text, or of a regular token by its bytes.
  std::optional<uint32_t> token_id(std::string_view text) const;
  bool is_special(uint32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;
  // Ids the file's post-processor puts around a single sequence (e.g. Llama 3's <|begin_of_text|>). encode() never
  // adds them; a caller that wants them prepends/appends these.
  const std::vector<uint32_t>& template_prefix() const;
  const std::vector<uint32_t>& template_suffix() const;

  Kind kind() const;
  // One line: kind, source, vocabulary size, merges, pattern.
  std::string describe() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
  friend struct TokenizerBuilder;
};

// Streaming decoder for generation: feed ids one at a time and get the text that is complete so far. A character
// split across tokens is held back until its last byte arrives; bytes that can never form a character come out as
// U+FFFD. The concatenation of every push() and finish() equals Tokenizer::decode of all the ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer) : tokenizer_(&tokenizer) {}
  std::string push(uint32_t id);
  // Flushes what is held back (an unfinished character becomes U+FFFD) and resets.
  std::string finish();
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer* tokenizer_;
  std::string pending_;
};

}  // namespace mamba3
