#include "tokenizer/added_tokens.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace mamba3 {

void AddedTokenMatcher::add(const AddedToken& token) {
  MAMBA3_CHECK(!token.content.empty(), "added token {} has empty content", token.id);
  const auto b = static_cast<unsigned char>(token.content[0]);
  tokens_.push_back(token);
  auto& list = by_first_byte_[b];
  list.push_back(uint32_t(tokens_.size() - 1));
  std::stable_sort(list.begin(), list.end(),
                   [&](uint32_t x, uint32_t y) { return tokens_[x].content.size() > tokens_[y].content.size(); });
  first_byte_[b] = true;
}

AddedTokenMatcher::Match AddedTokenMatcher::find(std::string_view text, size_t from, bool allow_special) const {
  if (tokens_.empty()) return {};
  for (size_t i = from; i < text.size(); ++i) {
    const auto b = static_cast<unsigned char>(text[i]);
    if (!first_byte_[b]) continue;
    for (uint32_t k : by_first_byte_[b]) {
      const AddedToken& t = tokens_[k];
      if (t.special && !allow_special) continue;
      if (t.content.size() <= text.size() - i && std::memcmp(text.data() + i, t.content.data(), t.content.size()) == 0)
        return {i, t.content.size(), t.id};
    }
  }
  return {};
}

}  // namespace mamba3
