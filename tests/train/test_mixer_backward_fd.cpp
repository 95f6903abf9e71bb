// Central finite differences in float64 against the reference backward, on tiny random layers (SISO, MIMO R=3,
// ngroups 2, output norm, rope 1.0, the A_floor clamp binding, initial states): a sample of entries of every
// parameter, of the input and of the initial state. Also: the float64 forward equals the project's float32-output
// reference, and the checker itself flags a slightly wrong gradient.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numbers>
#include <random>

#include "model/random_mixer.h"
#include "ops/mamba3_reference.h"
#include "ops/mamba3_reference_backward.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

constexpr double kStep = 1e-5;   // central difference step (float64)
constexpr double kFdTol = 2e-6;  // |fd − analytic| / (|analytic| + 1e-2·max|grad of that tensor|)

struct FdCase {
  const char* name;
  Mamba3Config c;
  int64_t batch, L;
  bool init_state;
};

Mamba3Config tiny(bool mimo, int64_t rank = 1) {
  Mamba3Config c;
  c.d_model = 8, c.d_state = 8, c.headdim = 4, c.expand = 2, c.chunk_size = 4;
  c.is_mimo = mimo, c.mimo_rank = rank;
  return c;
}

std::vector<FdCase> fd_cases() {
  std::vector<FdCase> v;
  v.push_back({"siso", tiny(false), 2, 7, false});
  v.push_back({"siso init state", tiny(false), 2, 5, true});
  v.push_back({"mimo R=3", tiny(true, 3), 2, 6, false});
  v.push_back({"mimo R=3 init state", tiny(true, 3), 1, 5, true});
  {
    Mamba3Config c = tiny(false);
    c.ngroups = 2;
    v.push_back({"siso ngroups 2", c, 2, 6, true});
    c = tiny(true, 2);
    c.ngroups = 2;
    v.push_back({"mimo R=2 ngroups 2", c, 1, 6, false});
  }
  {
    Mamba3Config c = tiny(false);
    c.is_outproj_norm = true;
    v.push_back({"siso outnorm", c, 2, 6, false});
    c = tiny(true, 3);
    c.is_outproj_norm = true;
    v.push_back({"mimo R=3 outnorm", c, 1, 6, true});
  }
  {
    Mamba3Config c = tiny(false);
    c.rope_fraction = 1.0;
    v.push_back({"siso rope 1.0", c, 1, 7, true});
    c = tiny(true, 3);
    c.rope_fraction = 1.0;
    v.push_back({"mimo R=3 rope 1.0", c, 2, 5, false});
  }
  {
    // Heavy-tail f_A < 1 for negative logits: with A_floor 1 the clamp binds on about half of the (token, head)s.
    Mamba3Config c = tiny(false);
    c.A_floor = 1.0;
    v.push_back({"siso A_floor clamp", c, 2, 6, false});
    // Softplus activation (pre-2026-06 checkpoints): softplus(a) ≈ 0.69 near 0, clamp at 0.7 binds often.
    c = tiny(true, 2);
    c.a_activation = AActivation::Softplus;
    c.A_floor = 0.7;
    v.push_back({"mimo R=2 softplus A_floor clamp", c, 1, 6, false});
  }
  return v;
}

double loss(const Mamba3Config& c, const Mamba3Params64& p, const Tensor& u, const Tensor& dout,
            const Mamba3State64* init) {
  Tensor out = mamba3_reference_forward64(c, p, u, init);
  double s = 0;
  for (int64_t i = 0; i < out.numel(); ++i) s += out.data<double>()[i] * dout.data<double>()[i];
  return s;
}

Tensor random64(std::mt19937& rng, Shape shape, float lo, float hi) {
  return random_tensor(rng, std::move(shape), lo, hi).to(DType::F64);
}

// Checks a sample of entries of one tensor `x` (F64, modified in place and restored) whose analytic gradient is
// `grad`. `extra` adds indices that must be checked. Returns the worst error; `scale` multiplies the analytic gradient
// (1 normally; the self-test uses another value to show the check can fail).
double check_entries(Tensor& x, const Tensor& grad, const std::function<double()>& f, std::mt19937& rng, int samples,
                     const std::vector<int64_t>& extra, const std::string& what, double scale = 1.0,
                     bool expect_pass = true) {
  const int64_t n = x.numel();
  double gmax = 0;
  for (int64_t i = 0; i < n; ++i) gmax = std::max(gmax, std::abs(grad.data<double>()[i]));
  if (expect_pass) {
    EXPECT_GT(gmax, 0.0) << what << ": gradient identically zero";
  }
  std::vector<int64_t> idx = extra;
  std::uniform_int_distribution<int64_t> pick(0, n - 1);
  for (int s = 0; s < samples; ++s) idx.push_back(pick(rng));
  int64_t imax = 0;
  for (int64_t i = 0; i < n; ++i)
    if (std::abs(grad.data<double>()[i]) > std::abs(grad.data<double>()[imax])) imax = i;
  idx.push_back(imax);
  double worst = 0;
  for (int64_t i : idx) {
    double* v = x.data<double>() + i;
    const double keep = *v;
    *v = keep + kStep;
    const double fp = f();
    *v = keep - kStep;
    const double fm = f();
    *v = keep;
    const double fd = (fp - fm) / (2 * kStep), an = scale * grad.data<double>()[i];
    const double err = std::abs(fd - an) / (std::abs(an) + 1e-2 * gmax + 1e-300);
    if (expect_pass) {
      EXPECT_LE(err, kFdTol) << what << "[" << i << "]: fd " << fd << " analytic " << an;
    }
    if (!(err <= worst)) worst = err;
  }
  return worst;
}

TEST(MixerBackwardFd, TinyLayers) {
  for (const FdCase& fc : fd_cases()) {
    SCOPED_TRACE(fc.name);
    const Mamba3Config& c = fc.c;
    c.validate(fc.name);
    std::mt19937 rng(1234);
    Mamba3Params64 p = Mamba3Params64::from(c, random_mixer_weights(c, rng));
    Tensor u = random64(rng, {fc.batch, fc.L, c.d_model}, -1, 1);
    Tensor dout = random64(rng, {fc.batch, fc.L, c.d_model}, -1, 1);
    Mamba3State64 init_store = Mamba3State64::zeros(c, fc.batch);
    if (fc.init_state) {
      init_store.angle = random64(rng, init_store.angle.shape(), 0, float(2 * std::numbers::pi));
      init_store.ssm = random64(rng, init_store.ssm.shape(), -0.5f, 0.5f);
      init_store.k = random64(rng, init_store.k.shape(), -1, 1);
      init_store.v = random64(rng, init_store.v.shape(), -1, 1);
    }
    const Mamba3State64* init = fc.init_state ? &init_store : nullptr;
    const Mamba3Gradients64 g = mamba3_reference_backward(c, p, u, dout, init);
    auto f = [&] { return loss(c, p, u, dout, init); };

    double worst = 0;
    std::string where;
    auto note = [&](double e, const std::string& what) {
      if (!(e <= worst)) worst = e, where = what;
    };
    for (auto& [name, t] : p.tensors) {
      std::vector<int64_t> extra;
      if (name == "in_proj.weight")  // one entry in each scalar row segment: dt, A, trap, angles
        for (int64_t row : {c.off_dt(), c.off_A(), c.off_trap(), c.off_angles(), c.off_A() + c.nheads() - 1})
          extra.push_back(row * c.d_model + int64_t(rng() % uint32_t(c.d_model)));
      note(check_entries(t, g.params.tensors.at(name), f, rng, 6, extra, name), name);
    }
    note(check_entries(u, g.u, f, rng, 10, {}, "u"), "u");
    if (fc.init_state) {
      note(check_entries(init_store.angle, g.init.angle, f, rng, 4, {}, "init angle"), "init angle");
      note(check_entries(init_store.ssm, g.init.ssm, f, rng, 4, {}, "init ssm"), "init ssm");
      note(check_entries(init_store.k, g.init.k, f, rng, 4, {}, "init k"), "init k");
      note(check_entries(init_store.v, g.init.v, f, rng, 4, {}, "init v"), "init v");
    }
    std::printf("  %-34s worst fd error %.2e (%s)\n", fc.name, worst, where.c_str());
  }
}

// The clamp cases really exercise the clamp: some (token, head) A logits bind it and some do not.
TEST(MixerBackwardFd, ClampCasesBindSometimes) {
  for (const FdCase& fc : fd_cases()) {
    if (fc.c.A_floor < 0.5) continue;
    const Mamba3Config& c = fc.c;
    std::mt19937 rng(1234);
    Mamba3Params64 p = Mamba3Params64::from(c, random_mixer_weights(c, rng));
    Tensor u = random64(rng, {fc.batch, fc.L, c.d_model}, -1, 1);
    int bound = 0, total = 0;
    const double* W = p.data("in_proj.weight");
    for (int64_t row = 0; row < fc.batch * fc.L; ++row)
      for (int64_t h = 0; h < c.nheads(); ++h) {
        double a = 0;
        for (int64_t d = 0; d < c.d_model; ++d) a += W[(c.off_A() + h) * c.d_model + d] * u.data<double>()[row * c.d_model + d];
        const double fa = c.a_activation == AActivation::HeavyTail ? (a >= 0 ? 1 + a : 1 / (1 - a)) : std::log1p(std::exp(a));
        bound += fa < c.A_floor;
        ++total;
      }
    EXPECT_GT(bound, total / 5) << fc.name;
    EXPECT_LT(bound, total - total / 5) << fc.name;
  }
}

// The checker can fail: a gradient 1% off is flagged.
TEST(MixerBackwardFd, CheckerFlagsWrongGradient) {
  const Mamba3Config c = tiny(true, 3);
  std::mt19937 rng(99);
  Mamba3Params64 p = Mamba3Params64::from(c, random_mixer_weights(c, rng));
  Tensor u = random64(rng, {1, 5, c.d_model}, -1, 1), dout = random64(rng, {1, 5, c.d_model}, -1, 1);
  const Mamba3Gradients64 g = mamba3_reference_backward(c, p, u, dout);
  auto f = [&] { return loss(c, p, u, dout, nullptr); };
  for (const char* name : {"dt_bias", "mimo_x", "in_proj.weight", "C_norm.weight"}) {
    const double e = check_entries(p.tensors.at(name), g.params.tensors.at(name), f, rng, 4, {}, name, 1.01, false);
    EXPECT_GT(e, kFdTol) << name;
  }
}

// The float64 forward used by the backward equals the project's reference forward (float32 output), with a
// carried-over state.
TEST(MixerBackwardFd, Forward64MatchesReference) {
  for (const FdCase& fc : fd_cases()) {
    SCOPED_TRACE(fc.name);
    const Mamba3Config& c = fc.c;
    std::mt19937 rng(7);
    TensorMap w = random_mixer_weights(c, rng);
    Mamba3Mixer mixer(c, w);
    Mamba3State s32 = mixer.new_state(fc.batch);
    Tensor warm = random_tensor(rng, {fc.batch, 3, c.d_model});
    mixer.prefill_reference(warm, s32);  // a non-zero starting state
    Mamba3State64 s64{s32.angle.to(DType::F64), s32.ssm.to(DType::F64), s32.k.to(DType::F64), s32.v.to(DType::F64)};
    Tensor u = random_tensor(rng, {fc.batch, fc.L, c.d_model});
    Tensor ref = mixer.prefill_reference(u, s32);
    Mamba3State64 fin;
    Tensor out = mamba3_reference_forward64(c, Mamba3Params64::from(c, w), u, &s64, &fin);
    EXPECT_LE(rel_l2(out, ref), 1e-6);
    EXPECT_LE(rel_l2(fin.ssm, s32.ssm), 1e-6);
    EXPECT_LE(rel_l2(fin.k, s32.k), 1e-6);
    EXPECT_LE(rel_l2(fin.v, s32.v), 1e-6);
    EXPECT_LE(rel_l2_angles(fin.angle, s32.angle), 1e-6);
  }
}

}  // namespace
}  // namespace mamba3::test
