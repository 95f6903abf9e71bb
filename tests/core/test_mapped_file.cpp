// MappedFile: whole-file read-only maps, errors that name the path.
#include "core/mapped_file.h"

#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"

namespace mamba3 {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class MappedFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mamba3_mapped_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

std::string open_error(const std::string& path) {
  try {
    MappedFile::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a mamba3::Error for " << path;
  return "";
}

TEST_F(MappedFileTest, MapsContents) {
  fs::path p = dir_ / "data.bin";
  std::string text(10000, '\0');
  for (size_t i = 0; i < text.size(); ++i) text[i] = char(i * 31);
  std::ofstream(p, std::ios::binary) << text;
  auto f = MappedFile::open(p.string());
  EXPECT_EQ(f->path(), p.string());
  ASSERT_EQ(f->size(), text.size());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(f->data()), f->size()), text);
  // The map outlives removal of the file.
  fs::remove(p);
  EXPECT_EQ(f->data()[9999], static_cast<unsigned char>(text[9999]));
}

TEST_F(MappedFileTest, EmptyFile) {
  fs::path p = dir_ / "empty.bin";
  std::ofstream(p, std::ios::binary).close();
  auto f = MappedFile::open(p.string());
  EXPECT_EQ(f->size(), 0u);
}

TEST_F(MappedFileTest, ErrorsNameThePath) {
  std::string missing = (dir_ / "missing.bin").string();
  EXPECT_THAT(open_error(missing), HasSubstr(missing));
  EXPECT_THAT(open_error(dir_.string()), HasSubstr(dir_.string()));
  EXPECT_THAT(open_error(dir_.string()), HasSubstr("not a regular file"));
}

}  // namespace
}  // namespace mamba3
