#pragma once
// The shared state behind Tokenizer, filled by the loaders (load_hf_json.cpp, load_tiktoken.cpp, tokenizer.cpp).
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer.h"

namespace mamba3 {

// One pre-tokenization step, applied to every piece the previous steps produced.
struct PreStep {
  std::unique_ptr<SplitRegex> regex;  // split (Isolated) when set
  bool prefix_space = false;          // otherwise: prepend ' ' unless the piece starts with one (ByteLevel option)
};

struct Tokenizer::Impl {
  enum : uint8_t { kAbsent = 0, kRegular = 1, kAdded = 2, kSpecial = 3 };

  Kind kind = Kind::HuggingFace;
  std::string origin;       // the file (or "bytes")
  std::string pattern_note; // for describe()
  BpeModel bpe;
  std::vector<PreStep> steps;
  AddedTokenMatcher added;
  std::vector<std::string> id_bytes;
  std::vector<uint8_t> id_kind;
  std::vector<uint32_t> prefix, suffix;
  bool cache_pieces = true;  // memoise BPE results of pieces (per thread, across calls: tokenizer.cpp)
  uint64_t serial = next_serial();  // names this tokenizer's caches; never reused

  static uint64_t next_serial() {
    static std::atomic<uint64_t> counter{0};
    return ++counter;
  }

  // Records the bytes that decode yields for `id` (added/special content overrides a regular entry).
  void set_id(uint32_t id, const std::string& bytes, uint8_t what) {
    if (id >= id_bytes.size()) {
      id_bytes.resize(size_t(id) + 1);
      id_kind.resize(size_t(id) + 1, kAbsent);
    }
    id_bytes[id] = bytes;
    id_kind[id] = what;
  }
};

// Builds Tokenizer objects for the loaders (Tokenizer's constructor is private).
struct TokenizerBuilder {
  static Tokenizer make(std::shared_ptr<Tokenizer::Impl> impl) { return Tokenizer(std::move(impl)); }
};

}  // namespace mamba3
