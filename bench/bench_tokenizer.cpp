// Encode throughput of the tokenizers on the Brown corpus (6 MB of prose), side by side with the JavaScript
// references measured in the same run (bench_tokenizer_ref.mjs under node). Single-threaded on both sides.
// Usage: bench_tokenizer [ROOT] [REPS]   ROOT: where tests/tokenizer/setup_refs.sh installed the npm packages and
// exported the vocabularies (default: the build folder's tokenizer_refs; created on first use).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using mamba3::Tokenizer;

namespace {

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string run(const std::string& command) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return out;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) out.append(buffer, n);
  if (pclose(pipe) != 0) std::fprintf(stderr, "bench_tokenizer: `%s` failed\n", command.c_str());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const fs::path root = argc > 1 ? fs::path(argv[1]) : fs::path(MAMBA3_TOKENIZER_REFS_ROOT);
  const int reps = argc > 2 ? std::atoi(argv[2]) : 5;
  if (!fs::exists(root / "refs" / "brown.txt")) {
    const std::string setup = "bash " MAMBA3_TOKENIZER_SETUP " '" + root.string() + "'";
    if (std::system(setup.c_str()) != 0) {
      std::fprintf(stderr, "error: %s failed\n", setup.c_str());
      return 1;
    }
  }
  const std::string text = read(root / "refs" / "brown.txt");
  const double mb = double(text.size()) / 1e6;
  std::printf("Brown corpus: %.2f MB, %d timed runs each (median), 1 thread\n", mb, reps);

  // The JavaScript references, same text, same run.
  std::map<std::string, std::vector<nlohmann::json>> js;
  for (std::istringstream lines(run("node " MAMBA3_TOKENIZER_BENCH_JS " '" + root.string() + "' 3")); !lines.eof();) {
    std::string line;
    std::getline(lines, line);
    if (!line.empty()) {
      const auto j = nlohmann::json::parse(line);
      js[j["vocab"].get<std::string>()].push_back(j);
    }
  }

  struct Case {
    const char *vocab, *file, *pattern;
  };
  const Case cases[] = {{"cl100k", "cl100k.tiktoken", "cl100k"}, {"o200k", "o200k.tiktoken", "o200k"},
                        {"r50k", "r50k.tiktoken", "gpt2"},       {"r50k", "gpt2.tokenizer.json", ""},
                        {"llama3", "llama3.tiktoken", "llama3"},  {"llama3", "llama31.tokenizer.json", ""}};
  std::printf("\n%-8s %-24s %9s %9s | %-20s %9s %9s %7s\n", "vocab", "mamba3 (file)", "MB/s", "tokens", "reference",
              "MB/s", "tokens", "ratio");
  int mismatches = 0;
  for (const Case& c : cases) {
    const Tokenizer tok = Tokenizer::load((root / "refs" / c.file).string(), c.pattern);
    size_t tokens = tok.encode(text).size();  // warm-up
    std::vector<double> seconds;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      tokens = tok.encode(text).size();
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(seconds.begin(), seconds.end());
    const double ours = mb / seconds[seconds.size() / 2];
    for (const auto& ref : js[c.vocab]) {
      const double theirs = ref["mb_per_s"].get<double>();
      const size_t ref_tokens = ref["tokens"].get<size_t>();
      mismatches += ref_tokens != tokens;
      std::printf("%-8s %-24s %9.1f %9zu | %-20s %9.2f %9zu %6.1fx%s\n", c.vocab, c.file, ours, tokens,
                  ref["engine"].get<std::string>().c_str(), theirs, ref_tokens, ours / theirs,
                  ref_tokens == tokens ? "" : "  TOKEN COUNTS DIFFER");
    }
    if (js[c.vocab].empty()) std::printf("%-8s %-24s %9.1f %9zu | (no JavaScript result)\n", c.vocab, c.file, ours, tokens);
  }
  return mismatches == 0 && !js.empty() ? 0 : 1;
}
