// The two ablation switches of spec §15 (no_rotary, euler), alone and together, SISO and MIMO, on awkward shapes
// (odd head counts, groups, output norm, L not a multiple of the chunk, batch 3):
//   - the fast prefill equals the float64 reference, and step-by-step decoding equals both;
//   - no_rotary equals the unswitched layer whose in_proj θ rows are zeroed (tanh 0 = 0: an independent route to
//     zero angle increments), and its angle state stays 0;
//   - euler equals a per-token float64 recurrence h_t = α_t·h_{t−1} + Δ_t·Σ_r v_{t,r} k_{t,r}ᵀ written here from the
//     spec (no β term, no pending pair), which shares no code with the engine;
//   - each switch really changes the output (so the checks above cannot pass by ignoring it);
//   - the ssm_cfg keys: read as booleans, wrong types rejected naming the field, written to config.json only when
//     true, and read back.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include <nlohmann/json.hpp>

#include "mixer_case.h"
#include "model/model_config.h"
#include "random_mixer.h"

namespace mamba3::test {
namespace {

constexpr double kTol = 1e-5;

using Case = MixerCase;
constexpr auto make = small_mixer_config;

std::vector<Case> base_cases() {
  return {
      {"SISO 3 heads (odd)", make(48, 16, 32, 1, 0.5, false, 0, 8)},
      {"SISO 6 heads, 2 groups, outnorm, rope 1.0", make(48, 16, 16, 2, 1.0, true, 0, 8)},
      {"MIMO R=3, 3 heads (odd)", make(48, 16, 32, 1, 0.5, false, 3, 4)},
      {"MIMO R=2, 2 groups, outnorm", make(32, 16, 16, 2, 0.5, true, 2, 8)},
  };
}

struct Switches {
  const char* name;
  bool no_rotary, euler;
};
constexpr Switches kSwitches[] = {{"no_rotary", true, false}, {"euler", false, true}, {"both", true, true}};

Mamba3Config with(Mamba3Config c, const Switches& s) {
  c.no_rotary = s.no_rotary, c.euler = s.euler;
  return c;
}

Tensor stack_steps(const std::vector<Tensor>& steps) {
  const int64_t B = steps[0].dim(0), D = steps[0].dim(1), L = int64_t(steps.size());
  Tensor out = Tensor::empty(DType::F32, {B, L, D});
  for (int64_t t = 0; t < L; ++t)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t d = 0; d < D; ++d) out.data<float>()[(b * L + t) * D + d] = steps[size_t(t)].data<float>()[b * D + d];
  return out;
}

double max_abs(const Tensor& t) {
  double m = 0;
  const Tensor f = t.to(DType::F64);
  for (int64_t i = 0; i < f.numel(); ++i) m = std::max(m, std::abs(f.data<double>()[i]));
  return m;
}

// The Euler-discretised layer written directly from the spec (§2 preprocessing with λ ≡ 1, §3 rotation, §4.1 with
// β = 0, §6 MIMO, §7 output stage), in float64, one token at a time, from a zero state.
Tensor euler_direct(const Mamba3Config& c, const TensorMap& w, const Tensor& u_in) {
  const Tensor u = u_in.to(DType::F64);
  const int64_t B = u.dim(0), L = u.dim(1), D = c.d_model, H = c.nheads(), P = c.headdim, N = c.d_state;
  const int64_t R = c.rank(), G = c.ngroups, S = c.num_angles(), din = c.d_in_proj(), di = c.d_inner();
  auto W = [&](const char* name) { return w.at(name).to(DType::F64); };
  const Tensor Win = W("in_proj.weight"), Wout = W("out_proj.weight"), dtb = W("dt_bias"), Bb = W("B_bias"),
               Cb = W("C_bias"), Dp = W("D"), Bn = W("B_norm.weight"), Cn = W("C_norm.weight");
  const Tensor mx = c.is_mimo ? W("mimo_x") : Tensor(), mz = c.is_mimo ? W("mimo_z") : Tensor(),
               mo = c.is_mimo ? W("mimo_o") : Tensor(), nw = c.is_outproj_norm ? W("norm.weight") : Tensor();
  auto at = [](const Tensor& t, int64_t i) { return t.data<double>()[i]; };
  Tensor out = Tensor::zeros(DType::F64, {B, L, D});
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> state(size_t(H * P * N), 0.0), phi(size_t(H * S), 0.0);
    for (int64_t t = 0; t < L; ++t) {
      std::vector<double> zx(size_t(din), 0.0), o(size_t(di), 0.0);
      for (int64_t j = 0; j < din; ++j)
        for (int64_t d = 0; d < D; ++d) zx[size_t(j)] += at(Win, j * D + d) * at(u, (b * L + t) * D + d);
      // RMSNorm of each (rank, group) vector of B and C.
      auto norm = [&](int64_t off, const Tensor& wt) {
        double ss = 0;
        for (int64_t n = 0; n < N; ++n) ss += zx[size_t(off + n)] * zx[size_t(off + n)];
        const double r = 1 / std::sqrt(ss / double(N) + 1e-5);
        for (int64_t n = 0; n < N; ++n) zx[size_t(off + n)] *= r * at(wt, n);
      };
      for (int64_t rg = 0; rg < R * G; ++rg) norm(c.off_B() + rg * N, Bn), norm(c.off_C() + rg * N, Cn);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / (H / G);
        const double a = zx[size_t(c.off_dt() + H + h)];
        const double dt = std::log1p(std::exp(zx[size_t(c.off_dt() + h)] + at(dtb, h)));
        const double A = std::min(-(a >= 0 ? 1 + a : 1 / (1 - a)), -c.A_floor);
        const double alpha = std::exp(A * dt);
        for (int64_t i = 0; i < S; ++i)
          if (!c.no_rotary) phi[size_t(h * S + i)] += std::numbers::pi * std::tanh(zx[size_t(c.off_angles() + i)]) * dt;
        std::vector<double> q(size_t(R * N)), k(size_t(R * N)), v(size_t(R * P));
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t n = 0; n < N; ++n) {
            q[size_t(r * N + n)] = zx[size_t(c.off_C() + (r * G + g) * N + n)] + at(Cb, (h * R + r) * N + n);
            k[size_t(r * N + n)] = zx[size_t(c.off_B() + (r * G + g) * N + n)] + at(Bb, (h * R + r) * N + n);
          }
          for (int64_t i = 0; i < S; ++i) {
            const int64_t ia = c.is_mimo ? i : 2 * i, ib = c.is_mimo ? i + N / 2 : 2 * i + 1;
            const double cs = std::cos(phi[size_t(h * S + i)]), sn = std::sin(phi[size_t(h * S + i)]);
            for (double* vec : {&q[size_t(r * N)], &k[size_t(r * N)]}) {
              const double x0 = vec[ia], x1 = vec[ib];
              vec[ia] = x0 * cs - x1 * sn, vec[ib] = x0 * sn + x1 * cs;
            }
          }
          for (int64_t p = 0; p < P; ++p)
            v[size_t(r * P + p)] = (c.is_mimo ? at(mx, (h * R + r) * P + p) : 1.0) * zx[size_t(c.off_x() + h * P + p)];
        }
        double* hs = &state[size_t(h * P * N)];
        for (int64_t p = 0; p < P; ++p)
          for (int64_t n = 0; n < N; ++n) {
            double add = 0;
            for (int64_t r = 0; r < R; ++r) add += v[size_t(r * P + p)] * k[size_t(r * N + n)];
            hs[p * N + n] = alpha * hs[p * N + n] + dt * add;
          }
        for (int64_t r = 0; r < R; ++r) {
          std::vector<double> y(static_cast<size_t>(P));
          for (int64_t p = 0; p < P; ++p) {
            double acc = at(Dp, h) * v[size_t(r * P + p)];
            for (int64_t n = 0; n < N; ++n) acc += hs[p * N + n] * q[size_t(r * N + n)];
            y[size_t(p)] = acc;
          }
          double rstd = 1;
          if (c.is_outproj_norm) {
            double ss = 0;
            for (double e : y) ss += e * e;
            rstd = 1 / std::sqrt(ss / double(P) + 1e-5);
          }
          for (int64_t p = 0; p < P; ++p) {
            const double yn = c.is_outproj_norm ? y[size_t(p)] * rstd * at(nw, h * P + p) : y[size_t(p)];
            const double z = zx[size_t(h * P + p)];
            const double zg = c.is_mimo ? at(mz, (h * R + r) * P + p) * z : z;
            const double gate = zg / (1 + std::exp(-zg));
            o[size_t(h * P + p)] += (c.is_mimo ? at(mo, (h * R + r) * P + p) : 1.0) * yn * gate;
          }
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < di; ++j) acc += at(Wout, d * di + j) * o[size_t(j)];
        out.data<double>()[(b * L + t) * D + d] = acc;
      }
    }
  }
  return out;
}

class Ablation : public ::testing::TestWithParam<size_t> {};

TEST_P(Ablation, PrefillEqualsReferenceAndStepByStep) {
  const Case cs = base_cases()[GetParam()];
  for (const Switches& sw : kSwitches) {
    const Mamba3Config c = with(cs.config, sw);
    std::mt19937 rng(4321 + unsigned(GetParam()));
    Mamba3Mixer mixer(c, random_mixer_weights(c, rng));
    const int64_t C = c.chunk_size;
    for (int64_t L : {int64_t(1), C - 1, C + 1, 3 * C + 5}) {
      SCOPED_TRACE(std::string(cs.name) + " " + sw.name + " L=" + std::to_string(L));
      Tensor u = random_tensor(rng, {3, L, c.d_model});
      Mamba3State s_pre = mixer.new_state(3), s_ref = mixer.new_state(3), s_step = mixer.new_state(3);
      Tensor y_pre = mixer.prefill(u, s_pre), y_ref = mixer.prefill_reference(u, s_ref);
      std::vector<Tensor> steps;
      for (int64_t t = 0; t < L; ++t) steps.push_back(mixer.step(token(u, t), s_step));
      EXPECT_LE(rel_l2(y_pre, y_ref), kTol) << "prefill vs reference";
      EXPECT_LE(rel_l2(stack_steps(steps), y_ref), kTol) << "steps vs reference";
      for (const Mamba3State* s : {&s_pre, &s_step}) {
        EXPECT_LE(rel_l2(s->ssm, s_ref.ssm), kTol) << "ssm state";
        EXPECT_LE(rel_l2(s->k, s_ref.k), kTol) << "k state";
        EXPECT_LE(rel_l2(s->v, s_ref.v), kTol) << "v state";
        if (c.no_rotary) {
          EXPECT_EQ(max_abs(s->angle), 0.0) << "no_rotary leaves the angle state at 0";
        } else {
          EXPECT_LE(rel_l2_angles(s->angle, s_ref.angle), kTol) << "angle state";
        }
      }
      // A split prefill followed by decode steps continues the switched recurrence.
      if (L > 2) {
        Mamba3State s = mixer.new_state(3);
        mixer.prefill(tokens(u, 0, L / 2), s);
        mixer.prefill(tokens(u, L / 2, L - 1), s);
        Tensor y_last = mixer.step(token(u, L - 1), s);
        EXPECT_LE(rel_l2(y_last, token(y_ref, L - 1)), kTol) << "prefill, prefill, step";
      }
    }
  }
}

TEST_P(Ablation, SwitchesChangeTheOutput) {
  const Case cs = base_cases()[GetParam()];
  std::mt19937 rng(17 + unsigned(GetParam()));
  TensorMap w = random_mixer_weights(cs.config, rng);
  Tensor u = random_tensor(rng, {2, 2 * cs.config.chunk_size + 3, cs.config.d_model});
  Mamba3Mixer plain(cs.config, w);
  Mamba3State s0 = plain.new_state(2);
  Tensor y0 = plain.prefill(u, s0);
  for (const Switches& sw : kSwitches) {
    Mamba3Mixer m(with(cs.config, sw), w);
    Mamba3State s = m.new_state(2);
    EXPECT_GT(rel_l2(m.prefill(u, s), y0), 1e-3) << cs.name << " " << sw.name;
  }
}

// no_rotary = the unswitched layer with the θ rows of in_proj zeroed (tanh 0 = 0, so every increment is 0).
TEST_P(Ablation, NoRotaryEqualsZeroedAngleRows) {
  const Case cs = base_cases()[GetParam()];
  for (bool euler : {false, true}) {
    std::mt19937 rng(77 + unsigned(GetParam()));
    Mamba3Config c = cs.config;
    c.euler = euler;
    TensorMap w = random_mixer_weights(c, rng);
    TensorMap w0 = w;
    w0["in_proj.weight"] = w.at("in_proj.weight").clone();
    float* Win = w0["in_proj.weight"].data<float>();
    for (int64_t i = 0; i < c.num_angles(); ++i)
      for (int64_t d = 0; d < c.d_model; ++d) Win[(c.off_angles() + i) * c.d_model + d] = 0.0f;
    Mamba3Config cn = c;
    cn.no_rotary = true;
    Mamba3Mixer zeroed(c, w0), switched(cn, w);
    Tensor u = random_tensor(rng, {3, 3 * c.chunk_size + 5, c.d_model});
    Mamba3State sz = zeroed.new_state(3), ss = switched.new_state(3);
    Tensor yz = zeroed.prefill_reference(u, sz), ys = switched.prefill(u, ss);
    EXPECT_LE(rel_l2(ys, yz), kTol) << cs.name << (euler ? " with euler" : "");
    EXPECT_LE(rel_l2(ss.ssm, sz.ssm), kTol) << cs.name;
    EXPECT_EQ(max_abs(ss.angle), 0.0);
  }
}

// euler = the direct per-token recurrence above (which never forms β or a pending pair).
TEST_P(Ablation, EulerEqualsDirectRecurrence) {
  const Case cs = base_cases()[GetParam()];
  for (bool no_rotary : {false, true}) {
    Mamba3Config c = cs.config;
    c.euler = true, c.no_rotary = no_rotary;
    std::mt19937 rng(901 + unsigned(GetParam()));
    TensorMap w = random_mixer_weights(c, rng);
    Mamba3Mixer m(c, w);
    Tensor u = random_tensor(rng, {3, 3 * c.chunk_size + 5, c.d_model});
    Mamba3State s = m.new_state(3);
    Tensor y = m.prefill(u, s);
    Tensor ref = euler_direct(c, w, u);
    EXPECT_LE(rel_l2(y, ref), kTol) << cs.name << (no_rotary ? " with no_rotary" : "");
    // The direct recurrence is sensitive to λ: with the plain trapezoid it does not match.
    Mamba3Config plain = c;
    plain.euler = false;
    Mamba3Mixer mp(plain, w);
    Mamba3State sp = mp.new_state(3);
    EXPECT_GT(rel_l2(mp.prefill(u, sp), ref), 1e-3) << cs.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, Ablation, ::testing::Range<size_t>(0, 4),
                         [](const auto& info) { return "case" + std::to_string(info.param); });

TEST(AblationConfig, JsonKeys) {
  nlohmann::json j = {{"d_model", 32}, {"d_state", 16}, {"headdim", 16}};
  Mamba3Config c = Mamba3Config::from_json(j, "cfg");
  EXPECT_FALSE(c.no_rotary);
  EXPECT_FALSE(c.euler);
  j["no_rotary"] = true;
  j["euler"] = true;
  c = Mamba3Config::from_json(j, "cfg");
  EXPECT_TRUE(c.no_rotary);
  EXPECT_TRUE(c.euler);
  EXPECT_NE(c.describe().find("no_rotary"), std::string::npos);
  EXPECT_NE(c.describe().find("euler"), std::string::npos);
  for (const char* key : {"no_rotary", "euler"}) {
    for (const nlohmann::json& bad : {nlohmann::json(1), nlohmann::json("true"), nlohmann::json::array()}) {
      nlohmann::json jb = {{"d_model", 32}, {key, bad}};
      try {
        Mamba3Config::from_json(jb, "cfg");
        ADD_FAILURE() << key << " = " << bad.dump() << " accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
      }
    }
  }
}

TEST(AblationConfig, ModelConfigRoundTrip) {
  nlohmann::json j = {{"d_model", 32},
                      {"n_layer", 2},
                      {"vocab_size", 10},
                      {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 16}}}};
  ModelConfig plain = ModelConfig::from_json(j, "config.json");
  const nlohmann::json out = plain.to_json();
  EXPECT_FALSE(out["ssm_cfg"].contains("no_rotary")) << "default configs must stay as mamba_ssm writes them";
  EXPECT_FALSE(out["ssm_cfg"].contains("euler"));
  for (const Switches& sw : kSwitches) {
    nlohmann::json js = j;
    if (sw.no_rotary) js["ssm_cfg"]["no_rotary"] = true;
    if (sw.euler) js["ssm_cfg"]["euler"] = true;
    ModelConfig mc = ModelConfig::from_json(js, "config.json");
    EXPECT_EQ(mc.ssm.no_rotary, sw.no_rotary);
    EXPECT_EQ(mc.ssm.euler, sw.euler);
    const nlohmann::json w = mc.to_json();
    EXPECT_EQ(w["ssm_cfg"].contains("no_rotary"), sw.no_rotary) << sw.name;
    EXPECT_EQ(w["ssm_cfg"].contains("euler"), sw.euler) << sw.name;
    ModelConfig back = ModelConfig::from_json(w, "written");
    EXPECT_EQ(back.ssm.no_rotary, sw.no_rotary);
    EXPECT_EQ(back.ssm.euler, sw.euler);
    EXPECT_EQ(back.to_json(), w);
  }
  nlohmann::json bad = j;
  bad["ssm_cfg"]["euler"] = "yes";
  try {
    ModelConfig::from_json(bad, "config.json");
    ADD_FAILURE() << "euler = \"yes\" accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("euler"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mamba3::test
