// AtomicFile: the target appears (or is replaced) only on commit; an abandoned write leaves nothing behind.
#include "core/atomic_file.h"

#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"

namespace mamba3 {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A fresh directory per test, removed with everything in it.
class AtomicFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("mamba3_atomic_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  static std::string read(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  static void put(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

  fs::path dir_;
};

TEST_F(AtomicFileTest, TargetAppearsOnlyAfterCommit) {
  fs::path target = dir_ / "out.bin";
  {
    AtomicFile f(target.string());
    f.write("hello ");
    EXPECT_FALSE(fs::exists(target));
    const char raw[] = {'w', 'o', 'r', 'l', 'd', '\0', '!'};
    f.write(raw, sizeof raw);
    f.write(nullptr, 0);
    EXPECT_FALSE(fs::exists(target));
    EXPECT_EQ(entries().size(), 1u) << "only the temporary file";
    f.commit();
    EXPECT_TRUE(fs::exists(target));
  }
  EXPECT_EQ(read(target), std::string("hello world\0!", 13));
  EXPECT_THAT(entries(), ElementsAre("out.bin")) << "no temporary file left";
}

TEST_F(AtomicFileTest, AbandonedWriteLeavesNothing) {
  fs::path target = dir_ / "out.bin";
  {
    AtomicFile f(target.string());
    f.write(std::string(100000, 'x'));
  }
  EXPECT_FALSE(fs::exists(target));
  EXPECT_TRUE(entries().empty());
}

TEST_F(AtomicFileTest, ExistingTargetReplacedOnlyOnCommit) {
  fs::path target = dir_ / "model.safetensors";
  put(target, "old contents");
  {
    AtomicFile f(target.string());
    f.write("new");
    EXPECT_EQ(read(target), "old contents");
  }
  EXPECT_EQ(read(target), "old contents") << "abandoned write keeps the old file";
  EXPECT_THAT(entries(), ElementsAre("model.safetensors"));
  {
    AtomicFile f(target.string());
    f.write("new");
    EXPECT_EQ(read(target), "old contents");
    f.commit();
    EXPECT_EQ(read(target), "new");
  }
  EXPECT_EQ(read(target), "new");
  EXPECT_THAT(entries(), ElementsAre("model.safetensors"));
}

TEST_F(AtomicFileTest, EmptyFile) {
  fs::path target = dir_ / "empty";
  AtomicFile f(target.string());
  f.commit();
  EXPECT_TRUE(fs::exists(target));
  EXPECT_EQ(fs::file_size(target), 0u);
}

TEST_F(AtomicFileTest, MissingDirectoryNamesPath) {
  std::string target = (dir_ / "no_such_dir" / "out.bin").string();
  try {
    AtomicFile f(target);
    ADD_FAILURE() << "expected a mamba3::Error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(target));
  }
  EXPECT_TRUE(entries().empty());
}

TEST_F(AtomicFileTest, WriteOrCommitAfterCommitThrows) {
  fs::path target = dir_ / "out.bin";
  AtomicFile f(target.string());
  f.write("a");
  f.commit();
  try {
    f.write("b");
    ADD_FAILURE() << "write after commit";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(target.string()));
  }
  try {
    f.commit();
    ADD_FAILURE() << "commit twice";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(target.string()));
  }
  EXPECT_EQ(read(target), "a");
}

// Commit fails when the target is a non-empty directory: the error names the path, the temporary file goes away.
TEST_F(AtomicFileTest, FailedCommitCleansUp) {
  fs::path target = dir_ / "occupied";
  fs::create_directories(target / "inside");
  {
    AtomicFile f(target.string());
    f.write("data");
    try {
      f.commit();
      ADD_FAILURE() << "expected a mamba3::Error";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(target.string()));
    }
  }
  EXPECT_THAT(entries(), ElementsAre("occupied"));
  EXPECT_TRUE(fs::is_directory(target / "inside"));
}

// Two writers of the same target alive at once (two threads saving the same checkpoint): each has its own
// temporary file, the committed one wins whole, and the abandoned one neither corrupts it nor leaves a file.
TEST_F(AtomicFileTest, ConcurrentWritersOfOneTarget) {
  fs::path target = dir_ / "ckpt.bin";
  {
    auto a = std::make_unique<AtomicFile>(target.string());
    auto b = std::make_unique<AtomicFile>(target.string());
    a->write("AAAAAAAA");
    b->write("BB");
    a->commit();
    b.reset();
    a.reset();
  }
  EXPECT_EQ(read(target), "AAAAAAAA");
  EXPECT_THAT(entries(), ElementsAre("ckpt.bin"));
  {
    AtomicFile a(target.string()), b(target.string());
    a.write("first");
    b.write("second");
    b.commit();
    a.commit();  // the later commit replaces the earlier one
  }
  EXPECT_EQ(read(target), "first");
  EXPECT_THAT(entries(), ElementsAre("ckpt.bin"));
}

}  // namespace
}  // namespace mamba3
