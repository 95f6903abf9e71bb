// Every mixer_*.safetensors golden case: prefill output, cache after prefill, each decode step's output and the
// final cache, for the fast path and the float64 reference, within the golden README's float32 tolerances.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>

#include "mixer_case.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

constexpr double kOutputTol = 1e-5;  // relative L2, outputs (golden README, float32)
constexpr double kCacheTol = 1e-5;   // relative L2, caches (angles modulo 2π)

struct Worst {
  double value = 0;
  std::string where;
  void add(double e, const std::string& what) {
    if (!(e <= value)) value = e, where = what;  // NaN sticks
  }
};

void compare_state(const Mamba3State& s, const SafetensorsFile& f, const std::string& prefix, const std::string& path,
                   Worst& worst) {
  struct Item {
    const char* name;
    const Tensor& t;
  } items[] = {{"ssm_state", s.ssm}, {"k_state", s.k}, {"v_state", s.v}};
  for (const auto& it : items) {
    const Tensor& ref = f.get(prefix + it.name);
    double e = rel_l2(it.t, ref);
    EXPECT_LE(e, kCacheTol) << path << " " << prefix << it.name;
    worst.add(e, prefix + it.name);
  }
  double e = rel_l2_angles(s.angle, f.get(prefix + "angle_state"));
  EXPECT_LE(e, kCacheTol) << path << " " << prefix << "angle_state";
  worst.add(e, prefix + "angle_state");
}

void run_case(const std::string& path, bool reference) {
  auto f = SafetensorsFile::open(path);
  Mamba3Mixer mixer(golden_mixer_config(f), f.tensors(), "", path);
  const Tensor& u = f.get("u");
  const Tensor& u_step = f.get("u_step");
  Mamba3State state = mixer.new_state(u.dim(0));
  Worst worst;

  Tensor out = reference ? mixer.prefill_reference(u, state) : mixer.prefill(u, state);
  double e = rel_l2(out, f.get("prefill_out_f64"));
  EXPECT_LE(e, kOutputTol) << path << " prefill_out";
  worst.add(e, "prefill_out");
  compare_state(state, f, "prefill_cache.", path, worst);

  const Tensor& step_ref = f.get("step_out_f64");
  for (int64_t t = 0; t < u_step.dim(1); ++t) {
    Tensor y = reference ? mixer.step_reference(token(u_step, t), state) : mixer.step(token(u_step, t), state);
    double es = rel_l2(y, token(step_ref, t));
    EXPECT_LE(es, kOutputTol) << path << " step " << t;
    worst.add(es, "step_out[" + std::to_string(t) + "]");
  }
  compare_state(state, f, "final_cache.", path, worst);
  std::printf("  %-40s %-9s worst rel L2 %.2e (%s)\n", std::filesystem::path(path).filename().c_str(),
              reference ? "reference" : "fast", worst.value, worst.where.c_str());
}

TEST(MixerGolden, EveryCaseFastAndReference) {
  const auto cases = golden_mixer_files();
  ASSERT_FALSE(cases.empty()) << "no mixer_*.safetensors in " << golden_dir() << " (set MAMBA3_GOLDEN_DIR)";
  std::printf("%zu mixer cases in %s\n", cases.size(), golden_dir().c_str());
  for (const auto& path : cases) {
    SCOPED_TRACE(path.string());
    run_case(path.string(), false);
    run_case(path.string(), true);
  }
}

}  // namespace
}  // namespace mamba3::test
