// Encode throughput of the tokenizers on the Brown corpus (6 MB of prose), side by side with the JavaScript
// references measured in the same run (bench_tokenizer_ref.mjs under node, single-threaded). Ours: the first call
// on a fresh tokenizer ("cold": empty piece caches), then the median of REPS calls on one thread and on 2 threads.
// The whole comparison is repeated ROUNDS times (node, then ours, each round) and the median ratio over the rounds is
// printed at the end, since the machine's load moves both sides.
// Usage: bench_tokenizer [ROOT] [REPS] [ROUNDS]   ROOT: where tests/tokenizer/setup_refs.sh installed the npm
// packages and exported the vocabularies (default: the build folder's tokenizer_refs; created on first use).
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
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 1;
  const std::string text = read(root / "refs" / "brown.txt");
  const double mb = double(text.size()) / 1e6;
  std::printf("Brown corpus: %.2f MB; ours: median of %d calls after a cold one; node: median of 3; %d round(s)\n", mb,
              reps, rounds);

  struct Case {
    const char *vocab, *file, *pattern;
  };
  const Case cases[] = {{"cl100k", "cl100k.tiktoken", "cl100k"}, {"o200k", "o200k.tiktoken", "o200k"},
                        {"r50k", "r50k.tiktoken", "gpt2"},       {"r50k", "gpt2.tokenizer.json", ""},
                        {"llama3", "llama3.tiktoken", "llama3"},  {"llama3", "llama31.tokenizer.json", ""}};
  // ratios[case index + engine][threads 1/2]: one value per round
  std::map<std::string, std::vector<double>> ratios;
  int mismatches = 0;
  bool any_js = false;
  for (int round = 0; round < rounds; ++round) {
    // The JavaScript references, same text, same run.
    std::map<std::string, std::vector<nlohmann::json>> js;
    for (std::istringstream lines(run("node " MAMBA3_TOKENIZER_BENCH_JS " '" + root.string() + "' 3"));
         !lines.eof();) {
      std::string line;
      std::getline(lines, line);
      if (!line.empty()) {
        const auto j = nlohmann::json::parse(line);
        js[j["vocab"].get<std::string>()].push_back(j);
      }
    }
    any_js = any_js || !js.empty();
    std::printf("\nround %d\n%-8s %-24s %8s %8s %8s %9s | %-20s %8s %9s %7s %7s\n", round + 1, "vocab", "mamba3 (file)",
                "cold", "MB/s", "2 thr", "tokens", "reference", "MB/s", "tokens", "ratio", "2 thr");
    for (const Case& c : cases) {
      const Tokenizer tok = Tokenizer::load((root / "refs" / c.file).string(), c.pattern);
      auto timed = [&](unsigned threads, size_t& tokens) {
        const auto t0 = std::chrono::steady_clock::now();
        tokens = tok.encode(text, false, threads).size();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      };
      size_t tokens = 0, tokens2 = 0;
      const double cold = mb / timed(1, tokens);
      timed(2, tokens2);  // warms the second thread's caches
      auto median = [&](unsigned threads) {
        std::vector<double> seconds;
        for (int r = 0; r < reps; ++r) seconds.push_back(timed(threads, threads == 1 ? tokens : tokens2));
        std::sort(seconds.begin(), seconds.end());
        return mb / seconds[seconds.size() / 2];
      };
      const double ours = median(1), ours2 = median(2);
      mismatches += tokens != tokens2;
      for (const auto& ref : js[c.vocab]) {
        const double theirs = ref["mb_per_s"].get<double>();
        const size_t ref_tokens = ref["tokens"].get<size_t>();
        const std::string engine = ref["engine"].get<std::string>();
        mismatches += ref_tokens != tokens;
        ratios[std::string(c.file) + " vs " + engine + " (1 thread)"].push_back(ours / theirs);
        ratios[std::string(c.file) + " vs " + engine + " (2 threads)"].push_back(ours2 / theirs);
        std::printf("%-8s %-24s %8.1f %8.1f %8.1f %9zu | %-20s %8.2f %9zu %6.1fx %6.1fx%s\n", c.vocab, c.file, cold,
                    ours, ours2, tokens, engine.c_str(), theirs, ref_tokens, ours / theirs, ours2 / theirs,
                    ref_tokens == tokens ? "" : "  TOKEN COUNTS DIFFER");
      }
      if (js[c.vocab].empty())
        std::printf("%-8s %-24s %8.1f %8.1f %8.1f %9zu | (no JavaScript result)\n", c.vocab, c.file, cold, ours, ours2,
                    tokens);
    }
  }
  std::printf("\nmedian ratio over %d round(s)\n", rounds);
  for (auto& [name, r] : ratios) {
    std::sort(r.begin(), r.end());
    std::printf("  %-62s %6.1fx  (min %.1fx, max %.1fx)\n", name.c_str(), r[r.size() / 2], r.front(), r.back());
  }
  return mismatches == 0 && any_js ? 0 : 1;
}
