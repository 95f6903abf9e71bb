#pragma once
// Added tokens (special tokens such as <|endoftext|> and a file's extra non-special tokens) are cut out of the text
// before pre-tokenization, leftmost-longest. Special ones only when the caller allows them; the others always, as
// Hugging Face tokenizers does.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mamba3 {

struct AddedToken {
  std::string content;
  uint32_t id = 0;
  bool special = true;
};

class AddedTokenMatcher {
 public:
  void add(const AddedToken& token);
  bool empty() const { return tokens_.empty(); }
  const std::vector<AddedToken>& tokens() const { return tokens_; }

  struct Match {
    size_t pos = std::string_view::npos, len = 0;
    uint32_t id = 0;
  };
  // The leftmost, then longest, added token in `text` at or after `from` (special ones only when allowed).
  Match find(std::string_view text, size_t from, bool allow_special) const;

 private:
  std::vector<AddedToken> tokens_;
  std::vector<std::vector<uint32_t>> by_first_byte_ = std::vector<std::vector<uint32_t>>(256);  // longest first
  bool first_byte_[256] = {};
};

}  // namespace mamba3
