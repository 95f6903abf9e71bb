#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <array>
#include <atomic>
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

// Memo of piece → ids for the pieces the hot cache does not take (longer than 16 bytes or more than 3 ids).
struct PieceCache {
  static constexpr size_t kMaxEntries = 1 << 16;
  StringTable<std::pair<uint32_t, uint32_t>> map;  // piece → (offset, count) in ids
  std::vector<uint32_t> ids;
};

// A cache in front of everything for pieces of up to 16 bytes that encode to up to 3 ids: an open-addressing table
// (linear probing) whose 32-byte entries hold the key inline, so a word seen before is found with one or two
// accesses to one array instead of a probe into the multi-megabyte vocabulary table and a merge loop. It grows from
// 64 entries up to 2^17 (5 MiB: about every distinct piece of a few MB of prose, most of it never touched after the
// first sight); when that is 3/4 full it starts over empty.
struct HotCache {
  struct Entry {
    uint64_t lo = 0, hi = 0;
    uint32_t len = 0, count = 0;  // len 0: empty
    uint32_t ids[3] = {};
    uint32_t pad = 0;
  };
  static constexpr size_t kMaxSize = size_t(1) << 17;
  std::vector<Entry> entries;
  size_t mask = 0, used = 0, limit = 0;
  HotCache() { reset(64); }
  void reset(size_t n) {
    entries.assign(n, Entry{});
    mask = n - 1;
    used = 0;
    limit = n / 4 * 3;
  }
  static size_t home(uint64_t lo, uint64_t hi, size_t n) {
    const __uint128_t m = __uint128_t(lo ^ 0xe7037ed1a0b428dbull) * (hi ^ n ^ 0x8ebc6af09c88c6e3ull);
    return size_t(uint64_t(m) ^ uint64_t(m >> 64));
  }
  // Makes room for one more entry: doubles the table (re-inserting everything) or, at the largest size, empties it.
  void make_room() {
    if (used < limit) return;
    if (entries.size() >= kMaxSize) return reset(entries.size());
    std::vector<Entry> old;
    old.swap(entries);
    reset(old.size() * 2);
    for (const Entry& e : old) {
      if (e.len == 0) continue;
      size_t i = home(e.lo, e.hi, e.len);
      while (entries[i & mask].len != 0) ++i;
      entries[i & mask] = e;
      ++used;
    }
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
  // The entry for the key, or the empty entry where it would go (nullptr when the probe runs long: not cached).
  Entry* slot(uint64_t lo, uint64_t hi, size_t n) {
    size_t i = home(lo, hi, n);
    for (int probe = 0; probe < 32; ++probe, ++i) {
      Entry& e = entries[i & mask];
      if (e.len == 0 || (e.len == n && e.lo == lo && e.hi == hi)) return &e;
    }
    return nullptr;
  }
};

// The caches live per thread and per tokenizer, across encode calls (as the JavaScript references keep theirs):
// the ids of a piece depend only on the tokenizer, so a cache hit is exact whatever text it came from. A thread
// keeps the caches of the last 4 tokenizers it used (by serial number, never reused), up to ~6 MiB each.
struct Caches {
  uint64_t serial = 0, last_use = 0;
  HotCache hot;
  PieceCache pieces;
};
Caches& caches_for(uint64_t serial) {
  thread_local std::array<std::unique_ptr<Caches>, 4> slots;
  thread_local uint64_t clock = 0;
  ++clock;
  size_t victim = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i] && slots[i]->serial == serial) {
      slots[i]->last_use = clock;
      return *slots[i];
    }
    if (!slots[i] || (slots[victim] && slots[i]->last_use < slots[victim]->last_use)) victim = i;
  }
  slots[victim] = std::make_unique<Caches>();
  slots[victim]->serial = serial;
  slots[victim]->last_use = clock;
  return *slots[victim];
}

struct EncodeContext {
  const Tokenizer::Impl& t;
  std::vector<uint32_t>& out;
  std::deque<std::string> owned;                      // pieces that gained a prefix space (stable addresses)
  Caches& caches;
  HotCache& hot;
  PieceCache& cache;

  EncodeContext(const Tokenizer::Impl& tok, std::vector<uint32_t>& ids)
      : t(tok), out(ids), caches(caches_for(tok.serial)), hot(caches.hot), cache(caches.pieces) {}

  void piece(std::string_view p) {
    if (p.empty()) return;
    if (p.size() == 1 || !t.cache_pieces) return t.bpe.encode_piece(p, out);
    if (p.size() > 16) return piece_slow(p);
    uint64_t lo, hi;
    HotCache::key(p.data(), p.size(), lo, hi);
    HotCache::Entry* e = hot.slot(lo, hi, p.size());
    if (e && e->len != 0) {
      for (uint32_t k = 0; k < e->count; ++k) out.push_back(e->ids[k]);
      return;
    }
    const size_t before = out.size();
    piece_slow(p);
    const size_t count = out.size() - before;
    if (e && count <= 3) {
      if (hot.used >= hot.limit) {
        hot.make_room();
        e = hot.slot(lo, hi, p.size());
        if (!e) return;
      }
      e->lo = lo;
      e->hi = hi;
      e->len = uint32_t(p.size());
      e->count = uint32_t(count);
      std::copy(out.begin() + before, out.end(), e->ids);
      ++hot.used;
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

std::vector<uint32_t> Tokenizer::encode(std::string_view text, bool allow_special, unsigned threads) const {
  std::vector<uint32_t> out;
  out.reserve(text.size() / 3 + 4);
  encode_into(text, allow_special, out, threads);
  return out;
}

namespace {

// Encodes valid UTF-8 text on the calling thread.
void encode_valid(const Tokenizer::Impl& t, std::string_view text, bool allow_special, std::vector<uint32_t>& out) {
  EncodeContext ctx(t, out);
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

// Whether encoding text[0, b) and text[b, n) separately gives the ids of text: b is a cut point when
// text[b-2] is a printable ASCII character other than space, text[b-1] is '\n' and text[b] is an ASCII letter, and
// the tokenizer has a single split step with one of the known patterns (ascii_split.h), no prefix-space step, and no
// added token containing '\n'. Why, for those patterns (no lookbehind, so the matches from b on are the same in
// both texts; what remains is that the pieces before b are too):
//  - no piece runs across b: a piece holding the '\n' is white space, or punctuation with a [\r\n]* / [\r\n/]* tail;
//    neither can go on into a letter, and the letter-word alternatives exclude \r\n from their optional prefix;
//  - no decision before b changes when the text ends at b instead of at the letter: the runs that reach b-1 stop at
//    b either way (a letter is not white space, punctuation, \r, \n or '/'; nor is the end); the white-space piece
//    that ends at b is the lone '\n' (text[b-2] is not white space), which every pattern yields both ways (gpt2:
//    `\s+(?!\S)` fails before the letter and `\s+` gives "\n"; at the end `\s+(?!\S)` gives "\n"; the others:
//    `\s*[\r\n]+` gives "\n" in both); and no lookahead or contraction reaches past b-1 from an earlier start (a
//    lookahead follows only a white-space run, and a contraction needing text[b] would need text[b-1] to be a letter);
//  - an added-token match cannot span b, since it would contain the '\n'.
bool can_cut(const Tokenizer::Impl& t) {
  if (t.steps.size() != 1 || !t.steps[0].regex || !t.steps[0].regex->has_ascii_fast_path()) return false;
  for (const AddedToken& a : t.added.tokens())
    if (a.content.find('\n') != std::string::npos) return false;
  return true;
}
bool is_cut(std::string_view text, size_t b) {
  const auto c = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  return b >= 2 && b < text.size() && c(b - 1) == '\n' && c(b - 2) > 0x20 && c(b - 2) < 0x7F &&
         ((c(b) | 0x20) >= 'a' && (c(b) | 0x20) <= 'z');
}

// A few threads that live as long as the process, so that their caches (per thread) stay warm across calls.
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }
  std::future<void> submit(std::function<void()> f, size_t want_threads) {
    std::packaged_task<void()> task(std::move(f));
    std::future<void> done = task.get_future();
    {
      std::lock_guard lock(mu_);
      while (threads_.size() < want_threads) threads_.emplace_back([this] { loop(); });
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
    return done;
  }
  ~Pool() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& th : threads_) th.join();
  }

 private:
  void loop() {
    while (true) {
      std::packaged_task<void()> task;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> queue_;
  std::vector<std::thread> threads_;
  bool stop_ = false;
};

}  // namespace

void Tokenizer::encode_into(std::string_view text, bool allow_special, std::vector<uint32_t>& out,
                            unsigned threads) const {
  std::string repaired;
  if (!utf8::is_valid(text)) {
    repaired = utf8::repair(text);
    text = repaired;
  }
  const Impl& t = *impl_;
  constexpr size_t kMinParallel = size_t(1) << 20;
  if (threads <= 1 || text.size() < kMinParallel || !can_cut(t)) return encode_valid(t, text, allow_special, out);
  // Cut points near k·n/threads (the first one at or after it, within the part).
  std::vector<size_t> cuts{0};
  for (unsigned k = 1; k < threads; ++k) {
    size_t b = std::max(cuts.back() + 1, text.size() / threads * k);
    while (b < text.size() && !is_cut(text, b)) ++b;
    if (b < text.size()) cuts.push_back(b);
  }
  cuts.push_back(text.size());
  const size_t parts = cuts.size() - 1;
  std::vector<std::vector<uint32_t>> ids(parts);
  std::vector<std::future<void>> done;
  for (size_t k = 1; k < parts; ++k) {
    ids[k].reserve((cuts[k + 1] - cuts[k]) / 3 + 4);
    done.push_back(Pool::get().submit(
        [&, k] { encode_valid(t, text.substr(cuts[k], cuts[k + 1] - cuts[k]), allow_special, ids[k]); }, parts - 1));
  }
  std::exception_ptr error;
  try {
    encode_valid(t, text.substr(0, cuts[1]), allow_special, out);
  } catch (...) {
    error = std::current_exception();
  }
  for (auto& d : done) {
    try {
      d.get();
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  for (size_t k = 1; k < parts; ++k) out.insert(out.end(), ids[k].begin(), ids[k].end());
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
