// Server pieces without HTTP: stop strings over streamed text, the prefix state cache (LRU, budget, exact lengths),
// request parsing (fields, types, ranges, chat template).
#include <gtest/gtest.h>

#include "model/language_model.h"
#include "server/api.h"
#include "server/cpu_backend.h"
#include "server/prefix_cache.h"
#include "server/stop_matcher.h"
#include "support/test_support.h"

namespace mamba3::server {
namespace {

std::string feed(StopMatcher& m, const std::vector<std::string>& pieces) {
  std::string out;
  for (const auto& p : pieces) out += m.push(p);
  return out + m.flush();
}

TEST(StopMatcher, HoldsBackPossibleStartsAndCutsAtTheFirstStop) {
  StopMatcher a({"END", "\n\n"});
  EXPECT_EQ(a.push("hello E"), "hello ");  // "E" may start "END"
  EXPECT_EQ(a.push("N"), "");
  EXPECT_EQ(a.push("D and more"), "");
  EXPECT_TRUE(a.stopped());
  StopMatcher b({"END"});
  EXPECT_EQ(feed(b, {"EN", "X", "E"}), "ENXE");  // a false start is released; the end flushes the rest
  EXPECT_FALSE(b.stopped());
  StopMatcher c({"ab", "b"});
  EXPECT_EQ(feed(c, {"xxab"}), "xx");  // the earliest stop wins
  StopMatcher none;
  EXPECT_EQ(none.push("anything"), "anything");
}

TEST(PrefixCache, LongestAllowedLengthLruAndBudget) {
  LanguageModel m = LanguageModel::load((test::golden_dir() / "lm_siso_mlp").string());
  CpuBackend backend(m, 16);
  auto s_ptr = backend.new_prompt_state();
  const PromptState& s = *s_ptr;
  const PrefixCache::Copier copy = [&](const PromptState& x) { return backend.copy(x); };
  std::vector<int64_t> ids = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> logits(size_t(m.config().vocab_padded()), 0.5f);
  const size_t entry = s.bytes() + logits.size() * 4 + 4 * 8;
  PrefixCache cache(2 * entry + 16);
  cache.insert(std::span(ids).first(2), s, logits, copy);
  cache.insert(std::span(ids).first(4), s, logits, copy);
  std::vector<int64_t> lengths = {2, 4, 8};
  auto hit = cache.lookup(ids, lengths);
  ASSERT_TRUE(hit);
  EXPECT_EQ(hit->tokens, 4);
  EXPECT_EQ(hit->logits, logits);
  EXPECT_NE(hit->state.get(), &s);  // a stored copy, not the caller's state
  std::vector<int64_t> only2 = {2, 3};
  EXPECT_EQ(cache.lookup(ids, only2)->tokens, 2);  // 4 is not an allowed length here; 2 is now most recent
  std::vector<int64_t> other = {1, 9, 9, 9};
  EXPECT_FALSE(cache.lookup(other, lengths));
  cache.insert(std::span(ids).first(6), s, logits, copy);  // evicts the least recently used (length 4)
  EXPECT_EQ(cache.entries(), 2u);
  EXPECT_LE(cache.bytes(), cache.budget());
  std::vector<int64_t> all = {2, 4, 6};
  EXPECT_EQ(cache.lookup(ids, all)->tokens, 6);
  std::vector<int64_t> l4 = {4};
  EXPECT_FALSE(cache.lookup(ids, l4));
  PrefixCache off(0);
  off.insert(std::span(ids).first(2), s, logits, copy);
  EXPECT_EQ(off.entries(), 0u);
}

TEST(Api, ParsesFieldsAndRejectsBadOnes) {
  const Tokenizer tok = Tokenizer::bytes();
  ServerLimits lim;
  auto p = parse_completion_request(
      R"({"model":"x","prompt":"hi","max_tokens":5,"temperature":0,"top_k":3,"stop":["a"],"seed":9,"n":2})", tok, lim,
      {});
  EXPECT_EQ(p.gen.prompt, (std::vector<int64_t>{'h', 'i'}));
  EXPECT_EQ(p.gen.max_tokens, 5);
  EXPECT_EQ(p.gen.n, 2);
  EXPECT_EQ(p.gen.sampling.seed, 9u);
  EXPECT_EQ(p.gen.stop, std::vector<std::string>{"a"});
  EXPECT_EQ(parse_completion_request(R"({"prompt":[1,2,3]})", tok, lim, {}).gen.prompt.size(), 3u);
  EXPECT_EQ(parse_completion_request(R"({"prompt":"x"})", tok, lim, {}).gen.max_tokens, 16);
  auto status_of = [&](const std::string& body) {
    try {
      parse_completion_request(body, tok, lim, {});
    } catch (const ApiError& e) {
      return e.status;
    }
    return 200;
  };
  for (const char* body : {"", "{", "[]", "{}", R"({"prompt":""})", R"({"prompt":3})", R"({"prompt":["a","b"]})",
                           R"({"prompt":"x","max_tokens":"5"})", R"({"prompt":"x","max_tokens":0})",
                           R"({"prompt":"x","max_tokens":99999999})", R"({"prompt":"x","temperature":-1})",
                           R"({"prompt":"x","top_p":0})", R"({"prompt":"x","n":1000})", R"({"prompt":"x","stop":[1]})",
                           R"({"prompt":"x","stop":["a","b","c","d","e"]})", R"({"prompt":"x","stream":"yes"})",
                           R"({"prompt":"x","logprobs":3})", R"({"prompt":"x","seed":1.5})",
                           R"({"prompt":"x","max_tokens":18446744073709551615})"})
    EXPECT_EQ(status_of(body), 400) << body;
  ServerLimits small;
  small.max_prompt_tokens = 3;
  EXPECT_THROW(parse_completion_request(R"({"prompt":"four"})", tok, small, {}), ApiError);
}

TEST(Api, ChatTemplateAndMessageBoundaries) {
  const Tokenizer tok = Tokenizer::bytes();
  ChatTemplate t;
  auto p = parse_chat_request(R"({"messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"U"}]}]})",
                              tok, ServerLimits{}, {}, t);
  std::string text;
  for (int64_t id : p.gen.prompt) text += char(id);
  EXPECT_EQ(text, "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n");
  EXPECT_EQ(p.gen.boundaries, (std::vector<int64_t>{int64_t(std::string("<|system|>\nS<|end|>\n").size()),
                                                   int64_t(std::string("<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n").size())}));
  EXPECT_EQ(p.gen.stop, std::vector<std::string>{"<|end|>"});
  EXPECT_EQ(p.gen.max_tokens, ServerLimits{}.default_chat_max_tokens);
  for (const char* body : {R"({"messages":[]})", R"({"messages":"hi"})", R"({"messages":[{"role":"king","content":"x"}]})",
                           R"({"messages":[{"role":"user"}]})", R"({"messages":[{"role":"user","content":5}]})"})
    EXPECT_THROW(parse_chat_request(body, tok, ServerLimits{}, {}, t), ApiError) << body;
}

}  // namespace
}  // namespace mamba3::server
