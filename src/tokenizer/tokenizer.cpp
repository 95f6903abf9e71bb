#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/utf8.h"

namespace mamba3 {
namespace {

// Per-call memo of piece → ids: prose repeats its words, and a hash lookup is cheaper than a merge loop.
struct PieceCache {
  static constexpr size_t kMaxEntries = 1 << 16;
  StringTable<std::pair<uint32_t, uint32_t>> map;  // piece → (offset, count) in ids
  std::vector<uint32_t> ids;
};

// A direct-mapped cache in front of everything for pieces of up to 16 bytes that encode to up to 3 ids: the key is
// held inline, so the frequent words of a text are found with one access to a small (L2-sized) array instead of a
// probe into the multi-megabyte vocabulary table.
struct HotCache {
  struct Entry {
    uint64_t lo = 0, hi = 0;
    uint32_t len = 0, count = 0;  // len 0: empty
    uint32_t ids[3] = {};
    uint32_t pad = 0;
  };
  std::vector<Entry> entries;
  size_t mask = 0;
  explicit HotCache(size_t text_bytes) {
    size_t n = 16;
    while (n < 8192 && n * 8 < text_bytes) n *= 2;
    entries.resize(n);
    mask = n - 1;
  }
  // The piece's bytes as two little-endian words, zero-padded (1 ≤ n ≤ 16).
  static void key(const char* p, size_t n, uint64_t& lo, uint64_t& hi) {
    uint64_t a, b;
    if (n >= 8) {
      std::memcpy(&a, p, 8);
      std::memcpy(&b, p + n - 8, 8);
      lo = a;
      hi = n == 8 ? 0 : b >> (8 * (16 - n));
    } else if (n >= 4) {
      uint32_t x, y;
      std::memcpy(&x, p, 4);
      std::memcpy(&y, p + n - 4, 4);
      lo = uint64_t(x) | (n == 4 ? 0 : uint64_t(y >> (8 * (8 - n))) << 32);  // n == 4: x holds everything
      hi = 0;
    } else {
      lo = uint8_t(p[0]) | (n > 1 ? uint64_t(uint8_t(p[1])) << 8 : 0) | (n > 2 ? uint64_t(uint8_t(p[2])) << 16 : 0);
      hi = 0;
    }
  }
  Entry& slot(uint64_t lo, uint64_t hi, size_t n) {
    const __uint128_t m = __uint128_t(lo ^ 0xe7037ed1a0b428dbull) * (hi ^ n ^ 0x8ebc6af09c88c6e3ull);
    return entries[size_t(uint64_t(m) ^ uint64_t(m >> 64)) & mask];
  }
};

struct EncodeContext {
  const Tokenizer::Impl& t;
  std::vector<uint32_t>& out;
  std::deque<std::string> owned;                      // pieces that gained a prefix space (stable addresses)
  PieceCache cache;
  HotCache hot;

  EncodeContext(const Tokenizer::Impl& tok, std::vector<uint32_t>& ids, size_t text_bytes)
      : t(tok), out(ids), hot(text_bytes) {}

  void piece(std::string_view p) {
    if (p.empty()) return;
    if (p.size() == 1 || !t.cache_pieces) return t.bpe.encode_piece(p, out);
    if (p.size() > 16) return piece_slow(p);
    uint64_t lo, hi;
    HotCache::key(p.data(), p.size(), lo, hi);
    HotCache::Entry& e = hot.slot(lo, hi, p.size());
    if (e.len == p.size() && e.lo == lo && e.hi == hi) {
      out.insert(out.end(), e.ids, e.ids + e.count);
      return;
    }
    const size_t before = out.size();
    piece_slow(p);
    const size_t count = out.size() - before;
    if (count <= 3) {
      e.lo = lo;
      e.hi = hi;
      e.len = uint32_t(p.size());
      e.count = uint32_t(count);
      std::copy(out.begin() + before, out.end(), e.ids);
    }
  }

  void piece_slow(std::string_view p) {
    const BpeModel& bpe = t.bpe;
    if (bpe.whole_piece_lookup()) {
      if (const auto id = bpe.find(p)) return out.push_back(*id);
    }
    if (const auto* hit = cache.map.find(p)) {
      out.insert(out.end(), cache.ids.begin() + hit->first, cache.ids.begin() + hit->first + hit->second);
      return;
    }
    const size_t before = out.size();
    bpe.merge(p, out);
    if (cache.map.size() >= PieceCache::kMaxEntries) {
      cache.map.clear();
      cache.ids.clear();
    }
    cache.map.insert(p, std::pair{uint32_t(cache.ids.size()), uint32_t(out.size() - before)});
    cache.ids.insert(cache.ids.end(), out.begin() + before, out.end());
  }

  void run(size_t step, std::string_view s) {
    if (step == t.steps.size()) return piece(s);
    const PreStep& st = t.steps[step];
    if (!st.regex) {
      if (!s.empty() && s[0] == ' ') return run(step + 1, s);
      std::string& with_space = owned.emplace_back();
      with_space.reserve(s.size() + 1);
      with_space.push_back(' ');
      with_space.append(s);
      run(step + 1, with_space);
      return;
    }
    st.regex->split(s, [this, step](std::string_view piece) { run(step + 1, piece); });
  }
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open tokenizer file", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::vector<uint32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  std::vector<uint32_t> out;
  out.reserve(text.size() / 3 + 4);
  encode_into(text, allow_special, out);
  return out;
}

void Tokenizer::encode_into(std::string_view text, bool allow_special, std::vector<uint32_t>& out) const {
  std::string repaired;
  if (!utf8::is_valid(text)) {
    repaired = utf8::repair(text);
    text = repaired;
  }
  const Impl& t = *impl_;
  EncodeContext ctx(t, out, text.size());
  size_t pos = 0;
  while (pos < text.size()) {
    const auto m = t.added.find(text, pos, allow_special);
    const size_t end = m.pos == std::string_view::npos ? text.size() : m.pos;
    if (end > pos) {
      ctx.owned.clear();
      ctx.run(0, text.substr(pos, end - pos));
    }
    if (m.pos == std::string_view::npos) break;
    out.push_back(m.id);
    pos = m.pos + m.len;
  }
}

bool Tokenizer::contains(uint32_t id) const {
  return id < impl_->id_kind.size() && impl_->id_kind[id] != Impl::kAbsent;
}

const std::string& Tokenizer::token_bytes(uint32_t id) const {
  if (!contains(id)) fail("token id {} is not in the vocabulary of {} (size {})", id, impl_->origin, vocab_size());
  return impl_->id_bytes[id];
}

std::string Tokenizer::decode_bytes(std::span<const uint32_t> ids) const {
  std::string out;
  for (uint32_t id : ids) out += token_bytes(id);
  return out;
}

std::string Tokenizer::decode(std::span<const uint32_t> ids) const { return utf8::repair(decode_bytes(ids)); }

uint32_t Tokenizer::vocab_size() const { return uint32_t(impl_->id_bytes.size()); }

std::optional<uint32_t> Tokenizer::token_id(std::string_view text) const {
  for (const auto& a : impl_->added.tokens())
    if (a.content == text) return a.id;
  return impl_->bpe.find(text);
}

bool Tokenizer::is_special(uint32_t id) const { return contains(id) && impl_->id_kind[id] == Impl::kSpecial; }
const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added.tokens(); }
const std::vector<uint32_t>& Tokenizer::template_prefix() const { return impl_->prefix; }
const std::vector<uint32_t>& Tokenizer::template_suffix() const { return impl_->suffix; }
Tokenizer::Kind Tokenizer::kind() const { return impl_->kind; }

std::string Tokenizer::describe() const {
  const Impl& t = *impl_;
  const char* kind = t.kind == Kind::HuggingFace ? "tokenizer.json" : t.kind == Kind::Tiktoken ? "tiktoken" : "bytes";
  return fmt::format("{} {}: {} ids ({} regular, {} added), {} merges{}{}", kind, t.origin, vocab_size(),
                     t.bpe.token_count(), t.added.tokens().size(), t.bpe.merge_count(),
                     t.pattern_note.empty() ? "" : ", ", t.pattern_note);
}

Tokenizer Tokenizer::bytes(const std::vector<std::string>& specials) {
  auto impl = std::make_shared<Impl>();
  impl->kind = Kind::Bytes;
  impl->origin = "bytes";
  impl->cache_pieces = false;
  for (uint32_t b = 0; b < 256; ++b) {
    const std::string s(1, char(b));
    impl->bpe.add_token(b, s);
    impl->set_id(b, s, Impl::kRegular);
  }
  uint32_t id = 256;
  for (const auto& s : specials) {
    MAMBA3_CHECK(!s.empty(), "byte tokenizer: special token {} is empty", id);
    MAMBA3_CHECK(!impl->bpe.find(s) || s.size() != 1, "byte tokenizer: special token \"{}\" is a single byte", s);
    impl->added.add(AddedToken{s, id, true});
    impl->set_id(id, s, Impl::kSpecial);
    ++id;
  }
  return TokenizerBuilder::make(std::move(impl));
}

Tokenizer Tokenizer::from_hf_json(const std::string& path) { return from_hf_json_text(read_file(path), path); }

Tokenizer Tokenizer::from_tiktoken(const std::string& path, std::string_view pattern) {
  return from_tiktoken_text(read_file(path), path, pattern);
}

Tokenizer Tokenizer::load(const std::string& path, std::string_view pattern) {
  const std::string text = read_file(path);
  size_t i = 0;
  while (i < text.size() && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t')) ++i;
  if (i < text.size() && text[i] == '{') {
    MAMBA3_CHECK(pattern.empty(), "{}: --pattern applies to tiktoken rank files, not tokenizer.json", path);
    return from_hf_json_text(text, path);
  }
  return from_tiktoken_text(text, path, pattern);
}

Tokenizer Tokenizer::from_model_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path json = fs::path(dir) / "tokenizer.json";
  if (fs::exists(json)) return from_hf_json(json.string());
  const fs::path model = fs::path(dir) / "tokenizer.model";
  if (fs::exists(model)) return from_tiktoken(model.string());
  fail("{}: no tokenizer.json or tokenizer.model in the model directory", dir);
}

std::string StreamDecoder::push(uint32_t id) {
  pending_ += tokenizer_->token_bytes(id);
  std::string out;
  const size_t held = utf8::repair_append(pending_, out, /*hold_incomplete=*/true);
  pending_.erase(0, pending_.size() - held);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out = utf8::repair(pending_);
  pending_.clear();
  return out;
}

}  // namespace mamba3
