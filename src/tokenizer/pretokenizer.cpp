#include "tokenizer/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.h"
#include "tokenizer/ascii_split.h"

namespace mamba3 {

namespace patterns {
const char* const gpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const cl100k =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const o200k =
    R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
    R"(|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const llama3 =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

const char* by_name(std::string_view name) {
  if (name == "gpt2" || name == "r50k") return gpt2;
  if (name == "cl100k") return cl100k;
  if (name == "o200k") return o200k;
  if (name == "llama3") return llama3;
  fail("unknown split pattern '{}' (known: gpt2, r50k, cl100k, o200k, llama3)", name);
}
}  // namespace patterns

std::string rewrite_whitespace_classes(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 32);
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == '\\' && i + 1 < p.size()) {
      const char c = p[i + 1];
      if (c == 's') {
        out += R"(\p{White_Space})";
      } else if (c == 'S') {
        out += R"(\P{White_Space})";
      } else {
        out += p[i];
        out += c;
      }
      ++i;  // an escaped character is never the start of another escape
    } else {
      out += p[i];
    }
  }
  return out;
}

struct SplitRegex::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* context = nullptr;
  AsciiPattern ascii = AsciiPattern::None;
  ~Impl() {
    if (context) pcre2_match_context_free(context);
    if (stack) pcre2_jit_stack_free(stack);
    if (code) pcre2_code_free(code);
  }
};

namespace {
std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof buffer);
  return reinterpret_cast<const char*>(buffer);
}
}  // namespace

SplitRegex::SplitRegex(std::string_view pattern, std::string_view origin)
    : impl_(std::make_unique<Impl>()), pattern_(pattern) {
  const std::string rewritten = rewrite_whitespace_classes(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                              PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (!impl_->code)
    fail("{}: cannot compile split pattern \"{}\": {} (at offset {})", origin, pattern, pcre2_message(error),
         offset);
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
  impl_->context = pcre2_match_context_create(nullptr);
  if (impl_->jit) {
    impl_->stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    pcre2_jit_stack_assign(impl_->context, nullptr, impl_->stack);
  }
  impl_->ascii = ascii_pattern_for(pattern);
}

SplitRegex::~SplitRegex() = default;

void SplitRegex::split_impl(std::string_view text, void (*emit)(void*, std::string_view), void* ctx,
                            bool fast) const {
  struct MatchData {
    pcre2_match_data* md = nullptr;
    ~MatchData() {
      if (md) pcre2_match_data_free(md);
    }
  } data;
  const PCRE2_SIZE* ov = nullptr;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  const size_t n = text.size();
  const AsciiPattern ascii = fast ? impl_->ascii : AsciiPattern::None;
  size_t pos = 0, last = 0;
  while (pos <= n) {
    size_t s = pos, e = 0;
    // The ASCII specialisation answers for most positions of most texts (see ascii_split.h); it reports exactly the
    // match PCRE2 would, or 0 to leave the position to PCRE2.
    if (ascii != AsciiPattern::None && pos < n && static_cast<unsigned char>(text[pos]) < 0x80)
      e = ascii_match(ascii, text.data(), n, pos);
    if (e == 0) {
      if (!data.md) {
        data.md = pcre2_match_data_create_from_pattern(impl_->code, nullptr);
        MAMBA3_CHECK(data.md, "out of memory creating PCRE2 match data");
        ov = pcre2_get_ovector_pointer(data.md);
      }
      const int rc = impl_->jit
                         ? pcre2_jit_match(impl_->code, subject, n, pos, PCRE2_NO_UTF_CHECK, data.md, impl_->context)
                         : pcre2_match(impl_->code, subject, n, pos, PCRE2_NO_UTF_CHECK, data.md, impl_->context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) fail("split pattern \"{}\": matching failed: {}", pattern_, pcre2_message(rc));
      s = ov[0];
      e = ov[1];
    }
    if (s > last) emit(ctx, std::string_view(text.data() + last, s - last));
    if (e > s) {
      emit(ctx, std::string_view(text.data() + s, e - s));
      pos = e;
    } else {
      // An empty match: step over one character so the scan moves on.
      if (s >= n) break;
      size_t step = 1;
      while (s + step < n && (static_cast<unsigned char>(text[s + step]) & 0xC0) == 0x80) ++step;
      pos = s + step;
      if (e > last) last = e;
      continue;
    }
    last = e;
  }
  if (last < n) emit(ctx, std::string_view(text.data() + last, n - last));
}

bool SplitRegex::has_ascii_fast_path() const { return impl_->ascii != AsciiPattern::None; }

}  // namespace mamba3
