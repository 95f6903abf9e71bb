// Source check (no GPU needed): every kernel under src/cuda/train calls pdl_wait() before anything else — or, launched
// beside its predecessor, starts with the pdl_beside() marker and waits before it exits on every path — and none is
// launched with <<< >>>. launch_train gives every training launch the programmatic-dependent-launch attribute, which
// lets a kernel start before the one before it has finished; a kernel that read or wrote memory before pdl_wait()
// would race with its predecessor (src/cuda/pdl.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

// The text with comments and string literals blanked (newlines kept, so offsets map to the same lines).
std::string without_comments(const std::string& s) {
  std::string out = s;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s.compare(i, 2, "//") == 0) {
      while (i < s.size() && s[i] != '\n') out[i++] = ' ';
    } else if (s.compare(i, 2, "/*") == 0) {
      const size_t end = s.find("*/", i + 2), stop = end == std::string::npos ? s.size() : end + 2;
      for (; i < stop; ++i)
        if (s[i] != '\n') out[i] = ' ';
      --i;
    } else if (s[i] == '"') {
      for (++i; i < s.size() && s[i] != '"'; ++i) {
        if (s[i] == '\\') out[i++] = ' ';
        if (i < s.size() && s[i] != '\n') out[i] = ' ';
      }
    }
  }
  return out;
}

int line_of(const std::string& s, size_t offset) {
  return 1 + int(std::count(s.begin(), s.begin() + std::min(offset, s.size()), '\n'));
}

struct Findings {
  int kernels = 0;                    // __global__ definitions seen
  std::vector<std::string> problems;  // "name:line: what"
};

// Checks one source text; `name` labels its problems.
void check_source(const std::string& name, const std::string& text, Findings& f) {
  const std::string s = without_comments(text);
  for (size_t at = s.find("__global__"); at != std::string::npos; at = s.find("__global__", at + 1)) {
    int depth = 0;
    size_t j = at;
    for (; j < s.size(); ++j) {
      if (s[j] == '(') ++depth;
      if (s[j] == ')') --depth;
      if (depth == 0 && (s[j] == '{' || s[j] == ';')) break;
    }
    if (j >= s.size() || s[j] == ';') continue;  // a declaration
    ++f.kernels;
    const size_t first = s.find_first_not_of(" \t\r\n", j + 1);
    // (the body: up to the brace that closes it)
    size_t end = j;
    for (int braces = 0; end < s.size(); ++end) {
      if (s[end] == '{') ++braces;
      if (s[end] == '}' && --braces == 0) break;
    }
    const std::string body = s.substr(j, end - j);
    if (first != std::string::npos && s.compare(first, 13, "pdl_beside();") == 0) {
      // A kernel launched beside its predecessor waits for it before it exits, on every path.
      if (body.find("pdl_wait();") == std::string::npos || body.find("return") != std::string::npos)
        f.problems.push_back(name + ":" + std::to_string(line_of(s, at)) +
                             ": kernel beside its predecessor does not end with pdl_wait();");
    } else if (first == std::string::npos || s.compare(first, 11, "pdl_wait();") != 0) {
      f.problems.push_back(name + ":" + std::to_string(line_of(s, at)) + ": kernel does not start with pdl_wait();");
    }
  }
  for (size_t at = s.find("<<<"); at != std::string::npos; at = s.find("<<<", at + 3))
    f.problems.push_back(name + ":" + std::to_string(line_of(s, at)) + ": <<< >>> launch (use launch_train)");
}

TEST(PdlWaitFirst, TheCheckFindsWhatItGuardsAgainst) {
  Findings f;
  check_source("ok.cu",
               "// __global__ void in_a_comment() { x(); }\n"
               "template <int N> __global__ void __launch_bounds__(256, 2) fine(int a, float* b) {\n"
               "  pdl_wait();\n  b[a] = 1;\n}\n"
               "__global__ void declared(int);\n"
               "__global__ void beside(float* b) {\n  pdl_beside();\n  b[0] = 1;\n  pdl_wait();\n}\n",
               f);
  EXPECT_EQ(f.kernels, 2);
  EXPECT_TRUE(f.problems.empty()) << f.problems.front();
  Findings bad;
  check_source("bad.cu",
               "__global__ void late(float* b) {\n  b[0] = 1;\n  pdl_wait();\n}\n"
               "void host() { late<<<1, 32, 0, s>>>(p); }\n"
               "__global__ void never(float* b) {\n  pdl_beside();\n  b[0] = 1;\n}\n"
               "__global__ void early(float* b) {\n  pdl_beside();\n  if (b) return;\n  pdl_wait();\n}\n",
               bad);
  EXPECT_EQ(bad.kernels, 3);
  ASSERT_EQ(bad.problems.size(), 4u);
  EXPECT_EQ(bad.problems[0], "bad.cu:1: kernel does not start with pdl_wait();");
  EXPECT_EQ(bad.problems[1], "bad.cu:6: kernel beside its predecessor does not end with pdl_wait();");
  EXPECT_EQ(bad.problems[2], "bad.cu:10: kernel beside its predecessor does not end with pdl_wait();");
  EXPECT_EQ(bad.problems[3], "bad.cu:5: <<< >>> launch (use launch_train)");
}

TEST(PdlWaitFirst, EveryTrainingKernelWaitsFirst) {
  namespace fs = std::filesystem;
  const fs::path dir = MAMBA3_TRAIN_KERNEL_DIR;
  ASSERT_TRUE(fs::is_directory(dir)) << dir;
  Findings f;
  int files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string ext = entry.path().extension().string();
    if (ext != ".cu" && ext != ".cuh") continue;
    std::ifstream in(entry.path());
    ASSERT_TRUE(in) << entry.path();
    std::stringstream text;
    text << in.rdbuf();
    check_source(entry.path().filename().string(), text.str(), f);
    ++files;
  }
  EXPECT_GE(files, 10);
  EXPECT_GE(f.kernels, 50);  // the training kernels were found at all
  for (const std::string& p : f.problems) ADD_FAILURE() << p;
}

}  // namespace
