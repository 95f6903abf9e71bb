// Token files, text preparation, the validation split, window sampling and the data checks.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <unistd.h>

#include "core/error.h"
#include "train/data.h"

namespace mamba3 {
namespace {

namespace fs = std::filesystem;

// Bytes as ids, like Tokenizer::bytes() (the tokenizer library sits above this module).
const TextEncoder kBytes = [](std::string_view text, std::vector<uint32_t>& out) {
  for (unsigned char c : text) out.push_back(c);
};

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mamba3_trainer_data_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& bytes) {
    const std::string p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  fs::path dir_;
};

TEST_F(DataTest, TokenFileRoundTrip) {
  TokenData d;
  d.vocab_size = 70000;
  d.train = {1, 2, 3, 69999, 0};
  d.val = {7, 8};
  const std::string p = (dir_ / "t.bin").string();
  write_token_file(p, d);
  EXPECT_EQ(fs::file_size(p), 32u + 7 * 4);
  const TokenData r = read_token_file(p);
  EXPECT_EQ(r.train, d.train);
  EXPECT_EQ(r.val, d.val);
  EXPECT_EQ(r.vocab_size, 70000u);
  // load_training_data recognises the token file by its magic.
  EXPECT_EQ(load_training_data(p, kBytes, 256, 0.5).train, d.train);
}

TEST_F(DataTest, PrepareSplitsTheTailAndTextLoadsTheSameWay) {
  const std::string a = write("a.txt", "hello "), b = write("b.txt", "world!");
  const TokenData d = tokenize_text_files({a, b}, kBytes, 256, 0.25);  // 12 ids: ⌈3⌉ for validation
  EXPECT_EQ(d.train, (std::vector<uint32_t>{'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r'}));
  EXPECT_EQ(d.val, (std::vector<uint32_t>{'l', 'd', '!'}));
  const std::string ab = write("ab.txt", "hello world!");
  const TokenData t = load_training_data(ab, kBytes, 256, 0.25);
  EXPECT_EQ(t.train, d.train);
  EXPECT_EQ(t.val, d.val);
  EXPECT_TRUE(tokenize_text_files({a}, kBytes, 256, 0.0).val.empty());
}

TEST_F(DataTest, BadFilesGiveClearErrors) {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { load_training_data((dir_ / "missing.bin").string(), kBytes, 256, 0.1); })
                .find("cannot open"),
            std::string::npos);
  const std::string empty = write("empty.txt", "");
  EXPECT_NE(message([&] { load_training_data(empty, kBytes, 256, 0.1); }).find("empty"), std::string::npos);
  EXPECT_NE(message([&] { read_token_file(empty); }).find("empty"), std::string::npos);
  EXPECT_NE(message([&] { read_token_file(write("x.bin", "not tokens at all, just text here")); })
                .find("not a token file"),
            std::string::npos);
  TokenData d;
  d.vocab_size = 10;
  d.train = {1, 2, 3, 4};
  const std::string p = (dir_ / "trunc.bin").string();
  write_token_file(p, d);
  fs::resize_file(p, fs::file_size(p) - 2);
  EXPECT_NE(message([&] { read_token_file(p); }).find("truncated"), std::string::npos);
  EXPECT_NE(message([&] { tokenize_text_files({write("one.txt", "a")}, kBytes, 256, 0.5); }).find("nothing"),
            std::string::npos);
  EXPECT_NE(message([&] { tokenize_text_files({write("hi.txt", "\xff")}, kBytes, 100, 0.0); }).find("vocabulary"),
            std::string::npos);
}

TEST(DataCheck, VocabularyAndLength) {
  TokenData d;
  d.source = "data.bin";
  d.train = {1, 2, 3, 4, 5, 6, 7, 8};
  d.val = {1, 2, 3};
  EXPECT_NO_THROW(check_token_data(d, 9, 8, false));
  EXPECT_NO_THROW(check_token_data(d, 9, 3, true));
  try {
    check_token_data(d, 8, 4, false);
    FAIL() << "id 8 ≥ vocab 8 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token 8 at position 7 is ≥ the model's vocab_size 8"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(check_token_data(d, 9, 9, false), Error);  // too short for one window
  EXPECT_THROW(check_token_data(d, 9, 4, true), Error);   // validation too short
  EXPECT_NO_THROW(check_token_data(d, 9, 4, false));      // unless there is no evaluation
}

TEST(WindowSampler, DeterministicInRangeAndSeeded) {
  std::vector<uint32_t> tokens(1000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = uint32_t(i);
  const WindowSampler a(tokens, 17, 42), b(tokens, 17, 42), c(tokens, 17, 43);
  std::set<int64_t> starts;
  int64_t differ = 0;
  for (int64_t step = 0; step < 50; ++step)
    for (int64_t i = 0; i < 8; ++i) {
      const int64_t s = a.start(step, i);
      EXPECT_EQ(s, b.start(step, i));
      differ += s != c.start(step, i);
      ASSERT_GE(s, 0);
      ASSERT_LE(s, 1000 - 17);
      starts.insert(s);
      std::vector<int64_t> w(17);
      a.sample(step, i, w.data());
      for (int64_t k = 0; k < 17; ++k) ASSERT_EQ(w[size_t(k)], s + k);
    }
  EXPECT_GT(differ, 390);           // another seed, other windows
  EXPECT_GT(starts.size(), 300u);   // spread over the data
  const std::vector<uint32_t> exact(17, 5);
  EXPECT_EQ(WindowSampler(exact, 17, 1).start(3, 3), 0);  // one possible window
  EXPECT_THROW(WindowSampler(exact, 18, 1), Error);
}

TEST(ValidationWindows, FixedAndNonOverlapping) {
  std::vector<uint32_t> tokens(25);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = uint32_t(i);
  std::vector<int64_t> out;
  EXPECT_EQ(validation_windows(tokens, 6, 10, out), 4);
  EXPECT_EQ(out.size(), 24u);
  EXPECT_EQ(out[6], 6);
  EXPECT_EQ(validation_windows(tokens, 6, 2, out), 2);
}

}  // namespace
}  // namespace mamba3
