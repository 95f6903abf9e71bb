// tiktoken rank files → Tokenizer. Each line is "<base64 of the token's bytes> <rank>"; the rank is the id and the
// merge priority. The split pattern and special tokens are not in the file: they come with the pattern name.
#include <charconv>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace mamba3 {
namespace {

struct Flavour {
  const char* name;
  size_t ranks;  // the size of the published rank file, used to recognise it
  std::vector<std::pair<std::string, uint32_t>> specials;
  bool bos;  // the first special is prepended by the model's template (Llama 3's <|begin_of_text|>)
};

const std::vector<Flavour>& flavours() {
  static const std::vector<Flavour> list = [] {
    std::vector<Flavour> v;
    v.push_back({"gpt2", 50256, {{"<|endoftext|>", 50256}}, false});
    v.push_back({"cl100k",
                 100256,
                 {{"<|endoftext|>", 100257},
                  {"<|fim_prefix|>", 100258},
                  {"<|fim_middle|>", 100259},
                  {"<|fim_suffix|>", 100260},
                  {"<|endofprompt|>", 100276}},
                 false});
    v.push_back({"o200k", 199998, {{"<|endoftext|>", 199999}, {"<|endofprompt|>", 200018}}, false});
    Flavour llama{"llama3", 128000, {}, true};
    // Llama 3.1's 256 reserved ids after the 128,000 ranks.
    const char* named[] = {"<|begin_of_text|>",          "<|end_of_text|>",       "<|reserved_special_token_0|>",
                           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                           "<|start_header_id|>",        "<|end_header_id|>",     "<|eom_id|>",
                           "<|eot_id|>",                 "<|python_tag|>"};
    uint32_t id = 128000;
    for (const char* n : named) llama.specials.emplace_back(n, id++);
    for (int k = 3; id < 128256; ++k) llama.specials.emplace_back(fmt::format("<|reserved_special_token_{}|>", k), id++);
    v.push_back(std::move(llama));
    return v;
  }();
  return list;
}

int base64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

// Standard base64 with optional '=' padding; nullopt when malformed.
std::optional<std::string> base64_decode(std::string_view s) {
  while (!s.empty() && s.back() == '=') s.remove_suffix(1);
  if (s.size() % 4 == 1) return std::nullopt;
  std::string out;
  out.reserve(s.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (unsigned char c : s) {
    const int v = base64_value(c);
    if (v < 0) return std::nullopt;
    acc = acc << 6 | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xFF);
    }
  }
  return out;
}

}  // namespace

Tokenizer Tokenizer::from_tiktoken_text(std::string_view text, const std::string& origin, std::string_view pattern) {
  auto impl = std::make_shared<Impl>();
  Impl& t = *impl;
  t.kind = Kind::Tiktoken;
  t.origin = origin;
  t.bpe.set_whole_piece_lookup(true);

  size_t line_no = 0, count = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    const size_t sp = line.find(' ');
    if (sp == std::string_view::npos || line.find(' ', sp + 1) != std::string_view::npos)
      fail("{}: line {}: expected \"<base64 token> <rank>\", got \"{:.60}\"", origin, line_no, line);
    const auto bytes = base64_decode(line.substr(0, sp));
    if (!bytes || bytes->empty()) fail("{}: line {}: \"{:.60}\" is not base64 of a token", origin, line_no, line.substr(0, sp));
    const std::string_view rank_text = line.substr(sp + 1);
    uint32_t rank = 0;
    const auto [ptr, ec] = std::from_chars(rank_text.data(), rank_text.data() + rank_text.size(), rank);
    if (ec != std::errc() || ptr != rank_text.data() + rank_text.size() || rank == UINT32_MAX)
      fail("{}: line {}: rank \"{:.20}\" is not an integer id", origin, line_no, rank_text);
    if (t.id_kind.size() > rank && t.id_kind[rank] != Impl::kAbsent)
      fail("{}: line {}: rank {} appears twice", origin, line_no, rank);
    if (!t.bpe.add_token(rank, *bytes)) fail("{}: line {}: token \"{}\" appears twice", origin, line_no, line.substr(0, sp));
    t.set_id(rank, *bytes, Impl::kRegular);
    ++count;
  }
  if (count == 0) fail("{}: no ranks in the file", origin);

  const Flavour* flavour = nullptr;
  for (const auto& f : flavours())
    if (pattern.empty() ? f.ranks == count : (pattern == f.name || (pattern == "r50k" && f.name == std::string("gpt2"))))
      flavour = &f;
  if (!flavour && pattern.empty())
    fail("{}: {} ranks match no known vocabulary; name the split pattern (cl100k, o200k, llama3, gpt2)", origin, count);
  if (!flavour) patterns::by_name(pattern);  // throws the "unknown pattern" error
  t.steps.push_back(PreStep{std::make_unique<SplitRegex>(patterns::by_name(flavour->name), origin), false});
  t.pattern_note = std::string("pattern ") + flavour->name;
  for (const auto& [content, id] : flavour->specials) {
    if (id < t.id_kind.size() && t.id_kind[id] != Impl::kAbsent)
      fail("{}: the {} special token {} takes id {}, which the file already uses", origin, flavour->name, content, id);
    t.added.add(AddedToken{content, id, true});
    t.set_id(id, content, Impl::kSpecial);
  }
  if (flavour->bos) t.prefix.push_back(flavour->specials.front().second);
  t.bpe.add_merges_from_ranks();
  return TokenizerBuilder::make(std::move(impl));
}

}  // namespace mamba3
