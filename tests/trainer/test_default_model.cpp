// The shipped default model (models/default) against its README: the validation perplexity computed here on the
// committed held-out text equals the figure the README states, to the README's rounding — so the weights and the
// documented number cannot drift apart. The README line it reads looks like
//   Validation perplexity (Mamba-3, per byte): **3.4567**
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>

#include "model/language_model.h"
#include "train/perplexity.h"

#ifndef MAMBA3_SOURCE_DIR
#error "MAMBA3_SOURCE_DIR must name the repository root"
#endif

namespace mamba3 {
namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path << ": cannot open";
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Documented {
  double value = 0;
  int decimals = 0;
};

// The number after "Validation perplexity (Mamba-3, per byte):" (bold or not) and how many decimals it has.
Documented documented_perplexity(const std::string& readme) {
  static const std::regex line(R"(Validation perplexity \(Mamba-3, per byte\):\s*\**\s*([0-9]+)\.([0-9]+))");
  std::smatch m;
  Documented d;
  if (!std::regex_search(readme, m, line)) return d;
  d.value = std::stod(m[1].str() + "." + m[2].str());
  d.decimals = int(m[2].length());
  return d;
}

TEST(DefaultModel, ReadmeParserFindsTheFigureAndItsRounding) {
  const Documented d = documented_perplexity("x\nValidation perplexity (Mamba-3, per byte): **3.4567**\n");
  EXPECT_DOUBLE_EQ(d.value, 3.4567);
  EXPECT_EQ(d.decimals, 4);
  EXPECT_EQ(documented_perplexity("Validation perplexity (ablation, per byte): 3.1").decimals, 0);
}

TEST(DefaultModel, ValidationPerplexityEqualsTheReadme) {
  const fs::path dir = fs::path(MAMBA3_SOURCE_DIR) / "models" / "default";
  const Documented doc = documented_perplexity(read_file(dir / "README.md"));
  ASSERT_GT(doc.decimals, 0) << dir / "README.md" << " states no 'Validation perplexity (Mamba-3, per byte): X.Y'";
  const LanguageModel model = LanguageModel::load(dir.string());
  ASSERT_EQ(model.config().vocab_size, 256) << "the default model is byte-level: ids are the text's bytes";
  const std::string text = read_file(dir / "validation.txt");
  ASSERT_GT(text.size(), 100000u) << "validation.txt is the whole held-out split";
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = int64_t(static_cast<unsigned char>(text[i]));
  // Window 257: the trainer's validation window at --seq-len 256, and `mamba3 eval`'s default.
  const PerplexityResult r = evaluate_perplexity(model, ids, 257);
  std::printf("validation: %lld bytes, %lld windows, perplexity %.6f per byte (README: %.*f)\n",
              static_cast<long long>(r.tokens), static_cast<long long>(r.windows), r.perplexity(), doc.decimals,
              doc.value);
  // Equal to the README's rounding; the 1e-5 relative slack absorbs BLAS summation-order differences between
  // machines at a rounding boundary, far below one unit of the last printed digit.
  const double half_unit = 0.5 * std::pow(10.0, -doc.decimals);
  EXPECT_LE(std::abs(r.perplexity() - doc.value), half_unit + 1e-5 * doc.value)
      << "models/default/README.md says " << doc.value << ", the shipped weights give " << r.perplexity();
}

}  // namespace
}  // namespace mamba3
