// Unit tests of the tokenizer pieces that need no reference data: UTF-8 repair, the byte-level alphabet, the two BPE
// merge loops, pre-tokenization, special tokens, the streaming decoder, the byte tokenizer, and malformed files.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <random>

#include "core/error.h"
#include "tokenizer/bpe.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"
#include "support/error_of.h"

namespace mamba3 {
namespace {

using test::error_of;

const std::string kFFFD = "\xEF\xBF\xBD";

TEST(Utf8, RepairFollowsMaximalSubparts) {
  EXPECT_EQ(utf8::repair("abc"), "abc");
  EXPECT_EQ(utf8::repair("\xFF"), kFFFD);
  EXPECT_EQ(utf8::repair("a\xC3"), "a" + kFFFD);                     // truncated 2-byte sequence
  EXPECT_EQ(utf8::repair("\xE2\x82"), kFFFD);                         // one maximal subpart → one U+FFFD
  EXPECT_EQ(utf8::repair("\xE2\x82\x28"), kFFFD + "(");
  EXPECT_EQ(utf8::repair("\xC0\xAF"), kFFFD + kFFFD);                 // overlong lead: each byte on its own
  EXPECT_EQ(utf8::repair("\xED\xA0\x80"), kFFFD + kFFFD + kFFFD);     // surrogate
  EXPECT_EQ(utf8::repair("\xF4\x90\x80\x80"), kFFFD + kFFFD + kFFFD + kFFFD);  // above U+10FFFF
  EXPECT_EQ(utf8::repair("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");
  EXPECT_TRUE(utf8::is_valid("h\xC3\xA9llo \xE2\x82\xAC"));
  EXPECT_FALSE(utf8::is_valid("hello\x80world"));
}

TEST(ByteLevel, AlphabetRoundTrips) {
  EXPECT_EQ(byte_level::to_symbol(' '), U'\u0120');   // 'Ġ'
  EXPECT_EQ(byte_level::to_symbol('\n'), U'\u010A');  // 'Ċ'
  EXPECT_EQ(byte_level::to_symbol('A'), U'A');
  std::string all;
  for (int b = 0; b < 256; ++b) all += char(b);
  const std::string symbols = byte_level::encode(all);
  EXPECT_EQ(byte_level::decode(symbols), all);
  EXPECT_FALSE(byte_level::decode("\xE4\xB8\xAD").has_value());  // '中' is no symbol
}

// A small BPE with random merges: the quadratic scan and the heap loop must agree on every input.
TEST(Bpe, MergeLoopsAgree) {
  BpeModel bpe;
  std::mt19937 rng(5);
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) {
    bpe.add_token(uint32_t(b), std::string(1, char(b)));
    tokens.emplace_back(1, char(b));
  }
  const std::string alphabet = "abcde ";
  std::vector<uint32_t> pool;  // the alphabet's bytes and every merged token so far
  for (char ch : alphabet) pool.push_back(uint8_t(ch));
  for (uint32_t rank = 0; tokens.size() < 1200; ++rank) {
    const std::string& l = tokens[pool[rng() % pool.size()]];
    const std::string& r = tokens[pool[rng() % pool.size()]];
    const std::string merged = l + r;
    if (merged.size() > 12 || bpe.find(merged)) continue;
    const uint32_t id = uint32_t(tokens.size());
    bpe.add_merge(*bpe.find(l), *bpe.find(r), rank, id);
    bpe.add_token(id, merged);
    tokens.push_back(merged);
    pool.push_back(id);
  }
  for (int trial = 0; trial < 500; ++trial) {
    std::string s;
    for (int i = 0, n = 1 + int(rng() % 300); i < n; ++i) s += alphabet[rng() % alphabet.size()];
    std::vector<uint32_t> a, b;
    bpe.merge_scan(s, a);
    bpe.merge_heap(s, b);
    ASSERT_EQ(a, b) << s;
    std::string back;
    for (uint32_t id : a) back += tokens[id];
    ASSERT_EQ(back, s);
  }
}

TEST(Bpe, LowestRankFirstLeftmostOnTies) {
  BpeModel bpe;
  for (int b = 0; b < 256; ++b) bpe.add_token(uint32_t(b), std::string(1, char(b)));
  bpe.add_token(300, "ab");
  bpe.add_token(301, "bc");
  bpe.add_merge('b', 'c', 0, 301);  // "bc" outranks "ab"
  bpe.add_merge('a', 'b', 1, 300);
  std::vector<uint32_t> out;
  bpe.encode_piece("abc", out);
  EXPECT_EQ(out, (std::vector<uint32_t>{'a', 301}));
  out.clear();
  bpe.encode_piece("ababab", out);  // equal ranks merge left to right
  EXPECT_EQ(out, (std::vector<uint32_t>{300, 300, 300}));
}

TEST(PreTokenizer, Cl100kSplits) {
  SplitRegex re(patterns::cl100k, "test");
  std::vector<std::string_view> pieces;
  re.split("Hello world's 12345  \n\n  x", pieces);
  const std::vector<std::string_view> expected = {"Hello", " world", "'s", " ", "123", "45", "  \n\n", " ", " x"};
  EXPECT_EQ(pieces, expected);
}

TEST(PreTokenizer, WhitespaceMeansUnicodeWhiteSpace) {
  // U+0085 (NEL) is white space for the reference engines; PCRE2's \s alone would not include it.
  SplitRegex re(patterns::gpt2, "test");
  std::vector<std::string_view> pieces;
  re.split("a\xC2\x85\xC2\x85" "b", pieces);
  // As white space each NEL is its own piece (\s+(?!\S) then \s+); as punctuation both would form one piece.
  EXPECT_EQ(pieces, (std::vector<std::string_view>{"a", "\xC2\x85", "\xC2\x85", "b"}));
  EXPECT_EQ(rewrite_whitespace_classes(R"([^\s\p{L}]|\S|\\s)"), R"([^\p{White_Space}\p{L}]|\P{White_Space}|\\s)");
}

// The ASCII specialisation (ascii_split.h) must give exactly PCRE2's pieces. Checked exhaustively on short strings
// over an alphabet with one or more members of every class the patterns distinguish — each contraction letter in
// both cases, other letters, digits, every ASCII white-space character, '/', other punctuation and controls — and
// non-ASCII characters that the patterns treat specially (Ll, Lu, Lt, Lm, Lo, marks, Nd, Nl, No, NBSP, NEL, ſ which
// folds to s, a symbol), then on longer random strings over it, and on every ASCII string of up to 2 bytes followed by
// each alphabet member.
struct SplitChecker {
  std::vector<std::unique_ptr<SplitRegex>> regexes;
  size_t checked = 0, mismatches = 0;
  SplitChecker() {
    for (const char* p : {patterns::gpt2, patterns::cl100k, patterns::o200k}) {
      regexes.push_back(std::make_unique<SplitRegex>(p, "test"));
      EXPECT_TRUE(regexes.back()->has_ascii_fast_path());
    }
  }
  void check(const std::string& s) {
    std::vector<std::string_view> fast, slow;
    for (const auto& re : regexes) {
      fast.clear();
      slow.clear();
      re->split(s, fast);
      re->split_pcre2_only(s, slow);
      ++checked;
      // Compare as offsets (equal views of the same buffer), so that equal bytes at other places do not pass.
      bool same = fast.size() == slow.size();
      for (size_t i = 0; same && i < fast.size(); ++i)
        same = fast[i].data() == slow[i].data() && fast[i].size() == slow[i].size();
      if (!same && ++mismatches <= 10) {
        std::string shown;
        for (unsigned char c : s) shown += fmt::format("\\x{:02X}", c);
        ADD_FAILURE() << "pattern " << re->pattern() << ": pieces differ from PCRE2's on \"" << shown << "\"";
      }
    }
  }
};

const std::vector<std::string>& split_alphabet() {
  static const std::vector<std::string> a = {
      "'", "s", "S", "t", "T", "r", "R", "e", "E", "v", "V", "m", "M", "l", "L", "d", "D", "a", "Z", "0", "9",
      " ", "\t", "\n", "\r", "\v", "\f", ".", "/", std::string(1, '\0'), "\x1F", "\x7F",
      "\xC3\xA9" /* é Ll */, "\xC3\x89" /* É Lu */, "\xC7\x85" /* ǅ Lt */, "\xCA\xB0" /* ʰ Lm */,
      "\xE4\xB8\xAD" /* 中 Lo */, "\xCC\x81" /* combining acute, Mn */, "\xD9\xA3" /* ٣ Nd */,
      "\xE2\x85\xAB" /* Ⅻ Nl */, "\xC2\xBD" /* ½ No */, "\xC2\xA0" /* NBSP */, "\xC2\x85" /* NEL */, "\xC5\xBF" /* ſ */, "\xE2\x82\xAC" /* € */};
  return a;
}

TEST(AsciiSplit, ExhaustiveShortStringsAgreeWithPcre2) {
  SplitChecker c;
  const auto& a = split_alphabet();
  std::string s;
  for (size_t len = 1; len <= 4; ++len) {
    std::vector<size_t> digit(len, 0);
    while (true) {
      s.clear();
      for (size_t d : digit) s += a[d];
      c.check(s);
      size_t k = 0;
      while (k < len && ++digit[k] == a.size()) digit[k++] = 0;
      if (k == len) break;
    }
  }
  EXPECT_EQ(c.mismatches, 0u) << "of " << c.checked;
  EXPECT_GT(c.checked, 3u * 4'000'000);
}

TEST(AsciiSplit, EveryAsciiPairAndRandomStringsAgreeWithPcre2) {
  SplitChecker c;
  const auto& a = split_alphabet();
  for (int x = 0; x < 128; ++x)
    for (int y = -1; y < 128; ++y)
      for (size_t z = 0; z <= a.size(); ++z) {
        std::string s(1, char(x));
        if (y >= 0) s += char(y);
        if (z < a.size()) s += a[z];
        c.check(s);
      }
  std::mt19937 rng(20261130);
  std::string s;
  for (int i = 0; i < 200'000; ++i) {
    s.clear();
    const size_t len = 5 + rng() % 28;
    // Mostly ASCII, in runs, the way text is: pick a member, repeat it a few times now and then.
    while (s.size() < len) {
      const std::string& m = a[rng() % a.size()];
      const size_t repeat = rng() % 4 == 0 ? 1 + rng() % 5 : 1;
      for (size_t r = 0; r < repeat; ++r) s += m;
    }
    c.check(s);
  }
  // Long runs of letters (upper, lower, mixed), which the scanner reads 16 bytes at a time, ended by every member.
  for (int i = 0; i < 20'000; ++i) {
    s.clear();
    while (s.size() < 80) {
      const size_t len = 1 + rng() % 40;
      const int kind = int(rng() % 3);
      for (size_t k = 0; k < len; ++k)
        s += char((kind == 0 ? 'a' : kind == 1 ? 'A' : (rng() % 2 ? 'a' : 'A')) + rng() % 26);
      s += a[rng() % a.size()];
    }
    c.check(s);
  }
  EXPECT_EQ(c.mismatches, 0u) << "of " << c.checked;
}

TEST(PreTokenizer, BadPatternNamesOrigin) {
  try {
    SplitRegex re("(unclosed", "my.json: pre_tokenizer.pattern");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("my.json: pre_tokenizer.pattern"), std::string::npos) << e.what();
  }
  EXPECT_THROW(patterns::by_name("gpt5"), Error);
}

TEST(BytesTokenizer, EncodesBytesAndSpecials) {
  const Tokenizer tok = Tokenizer::bytes({"<eos>", "<pad>"});
  EXPECT_EQ(tok.vocab_size(), 258u);
  EXPECT_EQ(tok.encode("hi"), (std::vector<uint32_t>{'h', 'i'}));
  EXPECT_EQ(tok.encode("a<eos>", true), (std::vector<uint32_t>{'a', 256}));
  EXPECT_EQ(tok.encode("a<eos>", false).size(), 6u);
  EXPECT_EQ(tok.decode(std::vector<uint32_t>{'o', 'k', 257}), "ok<pad>");
  EXPECT_TRUE(tok.is_special(256));
  EXPECT_THROW(tok.decode(std::vector<uint32_t>{300}), Error);
}

TEST(StreamDecoder, HoldsBackSplitCharacters) {
  const Tokenizer tok = Tokenizer::bytes();
  StreamDecoder d(tok);
  const std::string euro = "\xE2\x82\xAC";
  EXPECT_EQ(d.push('a'), "a");
  EXPECT_EQ(d.push(0xE2), "");
  EXPECT_EQ(d.push(0x82), "");
  EXPECT_EQ(d.pending_bytes(), 2u);
  EXPECT_EQ(d.push(0xAC), euro);
  EXPECT_EQ(d.push(0xFF), kFFFD);         // can never start a character
  EXPECT_EQ(d.push(0xF0), "");
  EXPECT_EQ(d.push('x'), kFFFD + "x");    // the held lead byte is broken by 'x'
  EXPECT_EQ(d.push(0xC3), "");
  EXPECT_EQ(d.finish(), kFFFD);           // unfinished at the end
  // Random byte streams: the streamed text equals decode() of the whole sequence.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<uint32_t> ids;
    for (int i = 0, n = int(rng() % 20); i < n; ++i) ids.push_back(rng() % 3 ? 0x80 + rng() % 0x80 : rng() % 0x80);
    StreamDecoder s(tok);
    std::string out;
    for (uint32_t id : ids) out += s.push(id);
    out += s.finish();
    ASSERT_EQ(out, tok.decode(ids));
    ASSERT_TRUE(utf8::is_valid(out));
  }
}


// A tiny tokenizer.json: bytes 'a' 'b' 'c' ' ' plus merges, one special and one non-special added token.
std::string tiny_json(const std::string& merges = R"(["a b", "ab c", ["Ġ", "abc"]])",
                      const std::string& extra_model = "") {
  return R"({"version": "1.0",
    "added_tokens": [{"id": 9, "content": "<|end|>", "special": true},
                     {"id": 10, "content": "@@", "special": false}],
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|end|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {"<|end|>": {"id": "<|end|>", "ids": [9]}}},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", )" + extra_model + R"("vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5, "Ġabc": 6, "@": 7},
              "merges": )" + merges + "}}";
}

TEST(HfJson, LoadsAndEncodes) {
  const Tokenizer tok = Tokenizer::from_hf_json_text(tiny_json(), "tiny.json");
  EXPECT_EQ(tok.encode("abc abc"), (std::vector<uint32_t>{5, 6}));
  // Not allowed, the special token is text, and this toy vocabulary has no token for '<'.
  EXPECT_NE(error_of([&] { tok.encode("ab<|end|>c", false); }).find("byte 0x3C"), std::string::npos);
  EXPECT_EQ(tok.encode("ab<|end|>c", true), (std::vector<uint32_t>{4, 9, 2}));
  EXPECT_EQ(tok.encode("a@@b", false), (std::vector<uint32_t>{0, 10, 1}));  // non-special: always
  EXPECT_EQ(tok.decode(std::vector<uint32_t>{9, 6}), "<|end|> abc");
  EXPECT_EQ(tok.template_prefix(), (std::vector<uint32_t>{9}));
  EXPECT_EQ(tok.token_id("<|end|>"), 9u);
}

TEST(HfJson, MalformedFilesNameFileAndEntry) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "mamba3_tokenizer_unit";
  fs::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return (dir / name).string();
  };
  const std::string bad_json = write("bad.json", "{\"model\": {\"vocab\": ");
  auto e = error_of([&] { Tokenizer::from_hf_json(bad_json); });
  EXPECT_NE(e.find(bad_json), std::string::npos) << e;
  EXPECT_NE(e.find("not valid JSON"), std::string::npos) << e;

  std::string no_merges = tiny_json();
  no_merges.replace(no_merges.find("\"merges\""), 8, "\"merged\"");
  const std::string path = write("no_merges.json", no_merges);
  e = error_of([&] { Tokenizer::from_hf_json(path); });
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("\"merges\" is missing"), std::string::npos) << e;

  e = error_of([&] { Tokenizer::from_hf_json_text(tiny_json(R"(["a b", "ab q"])"), "t.json"); });
  EXPECT_NE(e.find("t.json: model.merges[1] \"ab q\": unknown token \"q\""), std::string::npos) << e;
  e = error_of([&] { Tokenizer::from_hf_json_text(tiny_json(R"(["a c"])"), "t.json"); });
  EXPECT_NE(e.find("merged token \"ac\" is not in model.vocab"), std::string::npos) << e;
  e = error_of([&] { Tokenizer::from_hf_json_text(tiny_json(R"(["abc"])"), "t.json"); });
  EXPECT_NE(e.find("model.merges[0]"), std::string::npos) << e;
  e = error_of([&] { Tokenizer::from_hf_json_text(tiny_json(R"([])", R"("dropout": 0.1, )"), "t.json"); });
  EXPECT_NE(e.find("model.dropout"), std::string::npos) << e;
  std::string bad_vocab = tiny_json();
  bad_vocab.replace(bad_vocab.find("\"@\": 7"), 6, "\"\xE4\xB8\xAD\": 7");
  e = error_of([&] { Tokenizer::from_hf_json_text(bad_vocab, "t.json"); });
  EXPECT_NE(e.find("is not a byte-level string"), std::string::npos) << e;
  std::string dup = tiny_json();
  dup.replace(dup.find("\"@\": 7"), 6, "\"@\": 5");
  e = error_of([&] { Tokenizer::from_hf_json_text(dup, "t.json"); });
  EXPECT_NE(e.find("id 5 is used by both"), std::string::npos) << e;
  std::string normalizer = tiny_json();
  normalizer.replace(normalizer.find("\"normalizer\": null"), 18, "\"normalizer\": {\"type\": \"NFKC\"}");
  e = error_of([&] { Tokenizer::from_hf_json_text(normalizer, "t.json"); });
  EXPECT_NE(e.find("normalizer"), std::string::npos) << e;
  e = error_of([&] { Tokenizer::from_hf_json((dir / "absent.json").string()); });
  EXPECT_NE(e.find("absent.json"), std::string::npos) << e;
  fs::remove_all(dir);
}

TEST(Tiktoken, LoadsAndRejectsMalformedLines) {
  // Base64: "a"=YQ==, "b"=Yg==, "ab"=YWI=; pattern gpt2 brings <|endoftext|> at 50256.
  const Tokenizer tok = Tokenizer::from_tiktoken_text("YQ== 0\nYg== 1\nYWI= 2\n", "t.tiktoken", "gpt2");
  EXPECT_EQ(tok.encode("abab"), (std::vector<uint32_t>{2, 2}));
  EXPECT_EQ(tok.encode("a<|endoftext|>", true), (std::vector<uint32_t>{0, 50256}));
  EXPECT_EQ(tok.decode(std::vector<uint32_t>{2, 50256}), "ab<|endoftext|>");
  EXPECT_THROW(tok.encode("c"), Error);  // no token for byte 'c'

  auto e = error_of([] { Tokenizer::from_tiktoken_text("YQ== 0\n!!!! 1\n", "t.tiktoken", "gpt2"); });
  EXPECT_NE(e.find("t.tiktoken: line 2"), std::string::npos) << e;
  e = error_of([] { Tokenizer::from_tiktoken_text("YQ== 0\nYg== 0\n", "t.tiktoken", "gpt2"); });
  EXPECT_NE(e.find("rank 0 appears twice"), std::string::npos) << e;
  e = error_of([] { Tokenizer::from_tiktoken_text("YQ== x\n", "t.tiktoken", "gpt2"); });
  EXPECT_NE(e.find("line 1"), std::string::npos) << e;
  e = error_of([] { Tokenizer::from_tiktoken_text("YQ== 0\n", "t.tiktoken", ""); });
  EXPECT_NE(e.find("name the split pattern"), std::string::npos) << e;
  e = error_of([] { Tokenizer::from_tiktoken_text("YQ== 0\n", "t.tiktoken", "gpt5"); });
  EXPECT_NE(e.find("unknown split pattern 'gpt5'"), std::string::npos) << e;
  e = error_of([] { Tokenizer::from_tiktoken_text("YQ== 50256\n", "t.tiktoken", "gpt2"); });
  EXPECT_NE(e.find("already uses"), std::string::npos) << e;
}

TEST(Encode, InvalidUtf8IsRepairedFirst) {
  const Tokenizer tok = Tokenizer::bytes();
  const auto ids = tok.encode("a\xFF" "b");
  EXPECT_EQ(tok.decode(ids), "a" + kFFFD + "b");
}

}  // namespace
}  // namespace mamba3
