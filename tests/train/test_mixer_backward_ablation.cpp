// Gradients with the ablation switches of spec §15 (no_rotary, euler, both), SISO and MIMO:
//   - the float64 reference backward against central finite differences of the float64 forward (tiny layers, a
//     sample of entries of every parameter, of the input and of the initial state);
//   - the ignored in_proj rows get exactly zero gradient (θ rows with no_rotary, trap rows with euler), and so do
//     their finite differences;
//   - the f32 chunked backward (mamba3_mixer_backward) against the reference backward on awkward shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numbers>

#include "model/mamba3_mixer_backward.h"
#include "model/random_mixer.h"
#include "ops/mamba3_reference_backward.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

constexpr double kStep = 1e-5;
constexpr double kFdTol = 2e-6;   // |fd − analytic| / (|analytic| + 1e-2·max|grad of that tensor|)
constexpr double kGradTol = 5e-5;  // f32 fast backward vs float64 reference, relative L2

struct Switches {
  const char* name;
  bool no_rotary, euler;
};
constexpr Switches kSwitches[] = {{"no_rotary", true, false}, {"euler", false, true}, {"both", true, true}};

Mamba3Config tiny(bool mimo, int64_t rank, const Switches& s) {
  Mamba3Config c;
  c.d_model = 8, c.d_state = 8, c.headdim = 4, c.expand = 3, c.chunk_size = 4;  // 6 heads
  c.is_mimo = mimo, c.mimo_rank = rank;
  c.no_rotary = s.no_rotary, c.euler = s.euler;
  return c;
}

Tensor random64(std::mt19937& rng, Shape shape, float lo, float hi) {
  return random_tensor(rng, std::move(shape), lo, hi).to(DType::F64);
}

double loss(const Mamba3Config& c, const Mamba3Params64& p, const Tensor& u, const Tensor& dout,
            const Mamba3State64* init) {
  const Tensor out = mamba3_reference_forward64(c, p, u, init);
  double s = 0;
  for (int64_t i = 0; i < out.numel(); ++i) s += out.data<double>()[i] * dout.data<double>()[i];
  return s;
}

// Central differences at the given entries of x (F64, restored afterwards); returns the worst relative error.
double fd_check(Tensor& x, const Tensor& grad, const std::function<double()>& f, const std::vector<int64_t>& idx,
                const std::string& what) {
  double gmax = 0;
  for (int64_t i = 0; i < grad.numel(); ++i) gmax = std::max(gmax, std::abs(grad.data<double>()[i]));
  double worst = 0;
  for (int64_t i : idx) {
    double* v = x.data<double>() + i;
    const double keep = *v;
    *v = keep + kStep;
    const double fp = f();
    *v = keep - kStep;
    const double fm = f();
    *v = keep;
    const double fd = (fp - fm) / (2 * kStep), an = grad.data<double>()[i];
    const double err = std::abs(fd - an) / (std::abs(an) + 1e-2 * gmax + 1e-12);
    EXPECT_LE(err, kFdTol) << what << "[" << i << "]: fd " << fd << " analytic " << an;
    if (!(err <= worst)) worst = err;
  }
  return worst;
}

std::vector<int64_t> sample(std::mt19937& rng, int64_t n, int count) {
  std::vector<int64_t> v;
  std::uniform_int_distribution<int64_t> pick(0, n - 1);
  for (int i = 0; i < count; ++i) v.push_back(pick(rng));
  return v;
}

TEST(MixerBackwardAblation, FiniteDifferences) {
  for (const Switches& sw : kSwitches)
    for (bool mimo : {false, true})
      for (bool init_state : {false, true}) {
        const Mamba3Config c = tiny(mimo, 2, sw);
        const std::string name = std::string(sw.name) + (mimo ? " mimo R=2" : " siso") + (init_state ? " init" : "");
        SCOPED_TRACE(name);
        std::mt19937 rng(2024);
        Mamba3Params64 p = Mamba3Params64::from(c, random_mixer_weights(c, rng));
        const int64_t B = 2, L = 7;
        Tensor u = random64(rng, {B, L, c.d_model}, -1, 1), dout = random64(rng, {B, L, c.d_model}, -1, 1);
        Mamba3State64 init = Mamba3State64::zeros(c, B);
        if (init_state) {
          init.angle = random64(rng, init.angle.shape(), 0, float(2 * std::numbers::pi));
          init.ssm = random64(rng, init.ssm.shape(), -0.5f, 0.5f);
          init.k = random64(rng, init.k.shape(), -1, 1);
          init.v = random64(rng, init.v.shape(), -1, 1);
        }
        const Mamba3State64* ip = init_state ? &init : nullptr;
        const Mamba3Gradients64 g = mamba3_reference_backward(c, p, u, dout, ip);
        auto f = [&] { return loss(c, p, u, dout, ip); };

        double worst = 0;
        for (auto& [pname, t] : p.tensors) {
          std::vector<int64_t> idx = sample(rng, t.numel(), 5);
          if (pname == "in_proj.weight")  // an entry of every scalar row segment, including the ignored ones
            for (int64_t row : {c.off_dt(), c.off_A(), c.off_trap(), c.off_angles(), c.off_trap() + c.nheads() - 1})
              idx.push_back(row * c.d_model + int64_t(rng() % uint32_t(c.d_model)));
          worst = std::max(worst, fd_check(t, g.params.tensors.at(pname), f, idx, pname));
        }
        worst = std::max(worst, fd_check(u, g.u, f, sample(rng, u.numel(), 8), "u"));
        if (init_state) {
          worst = std::max(worst, fd_check(init.angle, g.init.angle, f, sample(rng, init.angle.numel(), 4), "angle"));
          worst = std::max(worst, fd_check(init.ssm, g.init.ssm, f, sample(rng, init.ssm.numel(), 4), "ssm"));
          worst = std::max(worst, fd_check(init.k, g.init.k, f, sample(rng, init.k.numel(), 4), "k"));
          worst = std::max(worst, fd_check(init.v, g.init.v, f, sample(rng, init.v.numel(), 4), "v"));
        }

        // Ignored rows: analytic gradient exactly zero; the others are not.
        const Tensor& gw = g.params.tensors.at("in_proj.weight");
        auto row_max = [&](int64_t r0, int64_t n) {
          double m = 0;
          for (int64_t i = r0 * c.d_model; i < (r0 + n) * c.d_model; ++i) m = std::max(m, std::abs(gw.data<double>()[i]));
          return m;
        };
        const double g_theta = row_max(c.off_angles(), c.num_angles()), g_trap = row_max(c.off_trap(), c.nheads());
        if (c.no_rotary) {
          EXPECT_EQ(g_theta, 0.0);
        } else {
          EXPECT_GT(g_theta, 0.0);
        }
        if (c.euler) {
          EXPECT_EQ(g_trap, 0.0);
        } else {
          EXPECT_GT(g_trap, 0.0);
        }
        EXPECT_GT(row_max(c.off_dt(), c.nheads()), 0.0);
        std::printf("  %-28s worst fd error %.2e  |dθ rows| %.1e  |dtrap rows| %.1e\n", name.c_str(), worst, g_theta,
                    g_trap);
      }
}

TEST(MixerBackwardAblation, FastMatchesReference) {
  for (const Switches& sw : kSwitches)
    for (bool mimo : {false, true}) {
      Mamba3Config c;
      c.d_model = 24, c.d_state = 16, c.headdim = 8, c.expand = 1;  // 3 heads (odd)
      c.is_mimo = mimo, c.mimo_rank = 3, c.chunk_size = mimo ? 4 : 8;
      c.no_rotary = sw.no_rotary, c.euler = sw.euler;
      const int64_t C = c.chunk_size;
      for (int64_t L : {int64_t(1), C + 1, 3 * C + 5}) {
        const std::string name = std::string(sw.name) + (mimo ? " mimo R=3" : " siso") + " L=" + std::to_string(L);
        SCOPED_TRACE(name);
        std::mt19937 rng(uint32_t(31 + L));
        TensorMap w = random_mixer_weights(c, rng);
        Mamba3Mixer mixer(c, w);
        Tensor u = random_tensor(rng, {3, L, c.d_model}), dout = random_tensor(rng, {3, L, c.d_model});
        Mamba3State init = mixer.new_state(3);
        mixer.prefill(random_tensor(rng, {3, 4, c.d_model}), init);
        const Mamba3MixerGradients fast = mamba3_mixer_backward(mixer, u, dout, &init);
        Mamba3State64 init64{init.angle.to(DType::F64), init.ssm.to(DType::F64), init.k.to(DType::F64),
                             init.v.to(DType::F64)};
        const Mamba3Gradients64 ref = mamba3_reference_backward(c, Mamba3Params64::from(c, w), u, dout, &init64);
        double worst = 0;
        for (const auto& [pname, t] : ref.params.tensors) {
          const double e = rel_l2(fast.params.at(pname), t);
          EXPECT_LE(e, kGradTol) << pname;
          worst = std::max(worst, e);
        }
        EXPECT_LE(rel_l2(fast.u, ref.u), kGradTol) << "u";
        EXPECT_LE(rel_l2(fast.init.ssm, ref.init.ssm), kGradTol) << "init ssm";
        EXPECT_LE(rel_l2(fast.init.k, ref.init.k), kGradTol) << "init k";
        EXPECT_LE(rel_l2(fast.init.v, ref.init.v), kGradTol) << "init v";
        EXPECT_LE(rel_l2(fast.init.angle, ref.init.angle), kGradTol) << "init angle";
        // The ignored rows are exactly zero in the fast path too.
        const float* gw = fast.params.at("in_proj.weight").data<float>();
        double g_theta = 0, g_trap = 0;
        for (int64_t i = 0; i < c.num_angles() * c.d_model; ++i)
          g_theta = std::max(g_theta, double(std::abs(gw[c.off_angles() * c.d_model + i])));
        for (int64_t i = 0; i < c.nheads() * c.d_model; ++i)
          g_trap = std::max(g_trap, double(std::abs(gw[c.off_trap() * c.d_model + i])));
        if (c.no_rotary) {
          EXPECT_EQ(g_theta, 0.0);
        }
        if (c.euler) {
          EXPECT_EQ(g_trap, 0.0);
        }
        std::printf("  %-26s worst param grad rel L2 vs reference %.2e\n", name.c_str(), worst);
      }
    }
}

}  // namespace
}  // namespace mamba3::test
