// Invariants of the Mamba-3 mixer through its public API, on random layers and awkward shapes: prefill equals
// step-by-step decoding, results do not depend on chunk_size, prefill(A ++ B) equals prefill(A) then prefill(B),
// the fast path equals the float64 reference, rows of a batch do not interact.
#include <gtest/gtest.h>

#include "mixer_case.h"
#include "random_mixer.h"

namespace mamba3::test {
namespace {

constexpr double kTol = 1e-5;

using Case = MixerCase;
constexpr auto make = small_mixer_config;

std::vector<Case> cases() {
  return {
      {"SISO 3 heads (odd), rope 0.5", make(48, 16, 32, 1, 0.5, false, 0, 8)},
      {"SISO 6 heads, 2 groups, outnorm", make(48, 16, 16, 2, 0.5, true, 0, 8)},
      {"SISO 5 heads, 5 groups, rope 1.0", make(40, 8, 16, 5, 1.0, false, 0, 4)},
      {"SISO odd d_state 22", make(32, 22, 16, 1, 0.5, false, 0, 8)},
      {"MIMO R=3 (odd), 3 heads", make(48, 16, 32, 1, 0.5, false, 3, 4)},
      {"MIMO R=2, 2 groups, outnorm, rope 1.0", make(32, 16, 16, 2, 1.0, true, 2, 8)},
      {"MIMO R=4, d_state 32", make(32, 32, 16, 1, 0.5, false, 4, 4)},
  };
}

// Lengths around the chunk size: 1, C−1, C+1, 3C+5.
std::vector<int64_t> lengths(int64_t chunk) { return {1, std::max<int64_t>(chunk - 1, 1), chunk + 1, 3 * chunk + 5}; }

void expect_states_near(const Mamba3State& a, const Mamba3State& b, const std::string& what) {
  EXPECT_LE(rel_l2(a.ssm, b.ssm), kTol) << what << ": ssm state";
  EXPECT_LE(rel_l2(a.k, b.k), kTol) << what << ": k state";
  EXPECT_LE(rel_l2(a.v, b.v), kTol) << what << ": v state";
  EXPECT_LE(rel_l2_angles(a.angle, b.angle), kTol) << what << ": angle state";
}

// Concatenates step outputs (B, D) into (B, L, D).
Tensor stack_steps(const std::vector<Tensor>& steps) {
  const int64_t B = steps[0].dim(0), D = steps[0].dim(1), L = int64_t(steps.size());
  Tensor out = Tensor::empty(DType::F32, {B, L, D});
  for (int64_t t = 0; t < L; ++t)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t d = 0; d < D; ++d) out.data<float>()[(b * L + t) * D + d] = steps[size_t(t)].data<float>()[b * D + d];
  return out;
}

class MixerProperties : public ::testing::TestWithParam<size_t> {};

TEST_P(MixerProperties, PrefillEqualsStepByStepAndReference) {
  Case cs = cases()[GetParam()];
  std::mt19937 rng(1234 + unsigned(GetParam()));
  Mamba3Mixer mixer(cs.config, random_mixer_weights(cs.config, rng));
  for (int64_t L : lengths(cs.config.chunk_size)) {
    SCOPED_TRACE(std::string(cs.name) + " L=" + std::to_string(L));
    Tensor u = random_tensor(rng, {3, L, cs.config.d_model});
    Mamba3State s_pre = mixer.new_state(3), s_step = mixer.new_state(3), s_ref = mixer.new_state(3);
    Tensor y_pre = mixer.prefill(u, s_pre);
    Tensor y_ref = mixer.prefill_reference(u, s_ref);
    std::vector<Tensor> steps;
    for (int64_t t = 0; t < L; ++t) steps.push_back(mixer.step(token(u, t), s_step));
    Tensor y_step = stack_steps(steps);
    EXPECT_LE(rel_l2(y_pre, y_ref), kTol) << "prefill vs reference";
    EXPECT_LE(rel_l2(y_step, y_ref), kTol) << "steps vs reference";
    expect_states_near(s_pre, s_ref, "prefill vs reference");
    expect_states_near(s_step, s_ref, "steps vs reference");
  }
}

TEST_P(MixerProperties, ChunkSizeDoesNotChangeResults) {
  Case cs = cases()[GetParam()];
  std::mt19937 rng(99 + unsigned(GetParam()));
  TensorMap weights = random_mixer_weights(cs.config, rng);
  Tensor u = random_tensor(rng, {3, 3 * cs.config.chunk_size + 5, cs.config.d_model});
  Mamba3Mixer base(cs.config, weights);
  Mamba3State s0 = base.new_state(3);
  Tensor y0 = base.prefill(u, s0);
  for (int64_t chunk : {int64_t(1), int64_t(3), int64_t(16), int64_t(64)}) {
    Mamba3Config c = cs.config;
    c.chunk_size = chunk;
    Mamba3Mixer m(c, weights);
    Mamba3State s = m.new_state(3);
    Tensor y = m.prefill(u, s);
    EXPECT_LE(rel_l2(y, y0), kTol) << cs.name << " chunk " << chunk;
    expect_states_near(s, s0, std::string(cs.name) + " chunk " + std::to_string(chunk));
  }
}

TEST_P(MixerProperties, SplitPrefillContinuesExactly) {
  Case cs = cases()[GetParam()];
  std::mt19937 rng(7 + unsigned(GetParam()));
  Mamba3Mixer mixer(cs.config, random_mixer_weights(cs.config, rng));
  const int64_t C = cs.config.chunk_size, L = 3 * C + 5;
  Tensor u = random_tensor(rng, {3, L, cs.config.d_model});
  Mamba3State s_full = mixer.new_state(3);
  Tensor y_full = mixer.prefill(u, s_full);
  for (int64_t cut : {int64_t(1), C - 1, C, C + 1, L - 1}) {
    if (cut <= 0 || cut >= L) continue;
    SCOPED_TRACE(std::string(cs.name) + " cut=" + std::to_string(cut));
    Mamba3State s = mixer.new_state(3);
    Tensor ya = mixer.prefill(tokens(u, 0, cut), s);
    Tensor yb = mixer.prefill(tokens(u, cut, L), s);
    EXPECT_LE(rel_l2(ya, tokens(y_full, 0, cut)), kTol);
    EXPECT_LE(rel_l2(yb, tokens(y_full, cut, L)), kTol);
    expect_states_near(s, s_full, "split prefill");
    // Prefill then decode steps continues the same way.
    Mamba3State s2 = mixer.new_state(3);
    mixer.prefill(tokens(u, 0, cut), s2);
    for (int64_t t = cut; t < L; ++t) {
      Tensor y = mixer.step(token(u, t), s2);
      EXPECT_LE(rel_l2(y, token(y_full, t)), kTol) << "decode after prefill, token " << t;
    }
  }
}

TEST_P(MixerProperties, BatchRowsAreIndependent) {
  Case cs = cases()[GetParam()];
  std::mt19937 rng(55 + unsigned(GetParam()));
  Mamba3Mixer mixer(cs.config, random_mixer_weights(cs.config, rng));
  const int64_t L = 2 * cs.config.chunk_size + 3;
  Tensor u = random_tensor(rng, {3, L, cs.config.d_model});
  Mamba3State s = mixer.new_state(3);
  Tensor y = mixer.prefill(u, s);
  for (int64_t b = 0; b < 3; ++b) {
    Mamba3State s1 = mixer.new_state(1);
    Tensor y1 = mixer.prefill(u.slice(b, b + 1), s1);
    EXPECT_LE(rel_l2(y1, y.slice(b, b + 1)), 1e-6) << cs.name << " row " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, MixerProperties, ::testing::Range<size_t>(0, 7),
                         [](const auto& info) { return "case" + std::to_string(info.param); });

}  // namespace
}  // namespace mamba3::test
