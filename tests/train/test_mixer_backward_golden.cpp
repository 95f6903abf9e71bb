// Every mixer_*.safetensors golden case: the float64 reference backward's gradients (every grad.<param> and grad.u,
// loss sum(prefill_out ⊙ dout) from a zero state) within the golden README's tolerance for gradients.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>

#include "model/mixer_case.h"
#include "ops/mamba3_reference_backward.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

constexpr double kGradTol = 5e-5;    // relative L2 (golden README, gradients)
constexpr double kOutputTol = 1e-5;  // the forward by-product against prefill_out_f64

TEST(MixerBackwardGolden, ReferenceEveryCase) {
  const auto cases = golden_mixer_files();
  ASSERT_FALSE(cases.empty()) << "no mixer_*.safetensors in " << golden_dir() << " (set MAMBA3_GOLDEN_DIR)";
  std::printf("%zu mixer cases in %s\n", cases.size(), golden_dir().c_str());
  for (const auto& path : cases) {
    SCOPED_TRACE(path.string());
    auto f = SafetensorsFile::open(path.string());
    const Mamba3Config c = golden_mixer_config(f);
    const Mamba3Params64 p = Mamba3Params64::from(c, f.tensors());
    const Mamba3Gradients64 g = mamba3_reference_backward(c, p, f.get("u"), f.get("dout"));

    double worst = 0;
    std::string where;
    auto check = [&](const Tensor& got, const std::string& name) {
      const double e = rel_l2(got, f.get(name));
      EXPECT_LE(e, kGradTol) << path << " " << name;
      if (!(e <= worst)) worst = e, where = name;  // NaN sticks
    };
    const double eo = rel_l2(g.out, f.get("prefill_out_f64"));
    EXPECT_LE(eo, kOutputTol) << path << " forward output";
    // Every gradient the file holds must be produced, and every parameter must have one in the file.
    size_t compared = 0;
    for (const auto& [name, t] : f.tensors()) {
      if (!name.starts_with("grad.")) continue;
      const std::string param = name.substr(5);
      if (param == "u") {
        check(g.u, name);
      } else {
        auto it = g.params.tensors.find(param);
        ASSERT_NE(it, g.params.tensors.end()) << path << ": golden has " << name << ", no such parameter";
        check(it->second, name);
      }
      ++compared;
    }
    EXPECT_EQ(compared, g.params.tensors.size() + 1) << path << ": not every parameter has a golden gradient";
    std::printf("  %-40s worst grad rel L2 %.2e (%s), output %.1e\n", path.filename().c_str(), worst, where.c_str(),
                eo);
  }
}

}  // namespace
}  // namespace mamba3::test
