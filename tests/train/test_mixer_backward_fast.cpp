// The f32 chunked backward (mamba3_mixer_backward) against the golden gradients and against the float64 reference
// backward on awkward shapes: L = 1, chunk − 1, chunk, chunk + 1, 3·chunk + 5, batch 3, ngroups 2, output norm,
// rope 1.0, MIMO ranks, initial states.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numbers>
#include <thread>

#include "model/mamba3_mixer_backward.h"
#include "model/mixer_case.h"
#include "model/random_mixer.h"
#include "ops/mamba3_reference_backward.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

constexpr double kGradTol = 5e-5;  // relative L2 (golden README, gradients in float32)

struct Worst {
  double value = 0;
  std::string where;
  void add(double e, const std::string& what) {
    if (!(e <= value)) value = e, where = what;  // NaN sticks
  }
};

TEST(MixerBackwardFast, GoldenEveryCase) {
  const auto cases = golden_mixer_files();
  ASSERT_FALSE(cases.empty()) << "no mixer_*.safetensors in " << golden_dir() << " (set MAMBA3_GOLDEN_DIR)";
  for (const auto& path : cases) {
    SCOPED_TRACE(path.string());
    auto f = SafetensorsFile::open(path.string());
    Mamba3Mixer mixer(golden_mixer_config(f), f.tensors(), "", path.string());
    const Mamba3MixerGradients g = mamba3_mixer_backward(mixer, f.get("u").to(DType::F32), f.get("dout").to(DType::F32));
    Worst worst;
    size_t compared = 0;
    for (const auto& [name, t] : f.tensors()) {
      if (!name.starts_with("grad.")) continue;
      const std::string param = name.substr(5);
      const Tensor* got = &g.u;
      if (param != "u") {
        auto it = g.params.find(param);
        ASSERT_NE(it, g.params.end()) << name;
        got = &it->second;
      }
      const double e = rel_l2(*got, t);
      EXPECT_LE(e, kGradTol) << path << " " << name;
      worst.add(e, name);
      ++compared;
    }
    EXPECT_EQ(compared, g.params.size() + 1) << path;
    std::printf("  %-40s fast worst grad rel L2 %.2e (%s)\n", path.filename().c_str(), worst.value, worst.where.c_str());
  }
}

struct Shape3 {
  const char* name;
  Mamba3Config c;
  int64_t batch;
  bool init_state;
};

Mamba3Config small(bool mimo, int64_t rank, int64_t chunk) {
  Mamba3Config c;
  c.d_model = 16, c.d_state = 16, c.headdim = 8, c.expand = 2, c.chunk_size = chunk;
  c.is_mimo = mimo, c.mimo_rank = rank;
  return c;
}

std::vector<Shape3> layers() {
  std::vector<Shape3> v;
  v.push_back({"siso chunk 8", small(false, 1, 8), 3, false});
  v.push_back({"siso chunk 8 init state", small(false, 1, 8), 2, true});
  v.push_back({"mimo R=2 chunk 4", small(true, 2, 4), 3, false});
  v.push_back({"mimo R=3 chunk 4 init state", small(true, 3, 4), 2, true});
  Mamba3Config c = small(false, 1, 8);
  c.ngroups = 2;
  c.is_outproj_norm = true;
  v.push_back({"siso ngroups 2 outnorm", c, 3, true});
  c = small(true, 2, 4);
  c.ngroups = 2;
  c.rope_fraction = 1.0;
  v.push_back({"mimo R=2 ngroups 2 rope 1.0", c, 2, true});
  c = small(true, 4, 4);
  c.is_outproj_norm = true;
  v.push_back({"mimo R=4 outnorm", c, 1, false});
  c = small(false, 1, 8);
  c.rope_fraction = 1.0;
  c.A_floor = 1.0;  // the clamp binds on about half of the (token, head)s
  v.push_back({"siso rope 1.0 A_floor clamp", c, 2, false});
  return v;
}

TEST(MixerBackwardFast, MatchesReferenceOnAwkwardShapes) {
  for (const Shape3& s : layers()) {
    const Mamba3Config& c = s.c;
    const int64_t C = c.chunk_size;
    for (int64_t L : {int64_t(1), C - 1, C, C + 1, 3 * C + 5}) {
      SCOPED_TRACE(std::string(s.name) + " L=" + std::to_string(L));
      std::mt19937 rng(uint32_t(100 + L));
      TensorMap w = random_mixer_weights(c, rng);
      Mamba3Mixer mixer(c, w);
      Tensor u = random_tensor(rng, {s.batch, L, c.d_model});
      Tensor dout = random_tensor(rng, {s.batch, L, c.d_model});
      Mamba3State init = mixer.new_state(s.batch);
      if (s.init_state) mixer.prefill(random_tensor(rng, {s.batch, 5, c.d_model}), init);
      const Mamba3MixerGradients fast = mamba3_mixer_backward(mixer, u, dout, s.init_state ? &init : nullptr);

      Mamba3State64 init64{init.angle.to(DType::F64), init.ssm.to(DType::F64), init.k.to(DType::F64),
                           init.v.to(DType::F64)};
      const Mamba3Gradients64 ref =
          mamba3_reference_backward(c, Mamba3Params64::from(c, w), u, dout, s.init_state ? &init64 : nullptr);
      Worst worst;
      for (const auto& [name, t] : ref.params.tensors) {
        const double e = rel_l2(fast.params.at(name), t);
        EXPECT_LE(e, kGradTol) << name;
        worst.add(e, name);
      }
      const double eu = rel_l2(fast.u, ref.u);
      EXPECT_LE(eu, kGradTol) << "u";
      worst.add(eu, "u");
      if (s.init_state) {
        const std::pair<const Tensor*, const Tensor*> st[] = {{&fast.init.angle, &ref.init.angle},
                                                              {&fast.init.ssm, &ref.init.ssm},
                                                              {&fast.init.k, &ref.init.k},
                                                              {&fast.init.v, &ref.init.v}};
        const char* names[] = {"init angle", "init ssm", "init k", "init v"};
        for (int i = 0; i < 4; ++i) {
          const double e = rel_l2(*st[i].first, *st[i].second);
          EXPECT_LE(e, kGradTol) << names[i];
          worst.add(e, names[i]);
        }
      }
      std::printf("  %-30s L=%-3lld batch %lld  worst rel L2 vs reference %.2e (%s)\n", s.name, (long long)L,
                  (long long)s.batch, worst.value, worst.where.c_str());
    }
  }
}

// The gradient does not depend on the chunk size (beyond rounding).
TEST(MixerBackwardFast, ChunkSizeIndependent) {
  Mamba3Config c = small(true, 2, 4);
  std::mt19937 rng(5);
  TensorMap w = random_mixer_weights(c, rng);
  Tensor u = random_tensor(rng, {2, 23, c.d_model}), dout = random_tensor(rng, {2, 23, c.d_model});
  Mamba3Mixer a(c, w);
  c.chunk_size = 7;
  Mamba3Mixer b(c, w);
  const auto ga = mamba3_mixer_backward(a, u, dout), gb = mamba3_mixer_backward(b, u, dout);
  for (const auto& [name, t] : ga.params) EXPECT_LE(rel_l2(gb.params.at(name), t), 1e-5) << name;
  EXPECT_LE(rel_l2(gb.u, ga.u), 1e-5);
}

// The in_proj output kept by prefill is what the backward computes itself: the gradients are bit-identical; a kept
// tensor of the wrong shape is refused.
TEST(MixerBackwardFast, KeptInProjOutputGivesTheSameGradients) {
  for (const bool mimo : {false, true}) {
    Mamba3Config c = small(mimo, mimo ? 2 : 1, 8);
    std::mt19937 rng(9);
    Mamba3Mixer m(c, random_mixer_weights(c, rng));
    const Tensor u = random_tensor(rng, {3, 21, c.d_model}), dout = random_tensor(rng, {3, 21, c.d_model});
    Mamba3State state = m.new_state(3);
    Tensor zx_raw;
    m.prefill(u, state, &zx_raw);
    ASSERT_EQ(zx_raw.shape(), (Shape{3 * 21, c.d_in_proj()}));
    const auto ref = mamba3_mixer_backward(m, u, dout);
    const auto kept = mamba3_mixer_backward(m, u, dout, nullptr, &zx_raw);
    for (const auto& [name, t] : ref.params)
      EXPECT_EQ(std::memcmp(t.raw(), kept.params.at(name).raw(), t.nbytes()), 0) << name;
    EXPECT_EQ(std::memcmp(ref.u.raw(), kept.u.raw(), ref.u.nbytes()), 0) << "u";
    const Tensor wrong = Tensor::zeros(DType::F32, {3 * 21, c.d_in_proj() + 1});
    EXPECT_THROW(mamba3_mixer_backward(m, u, dout, nullptr, &wrong), Error);
  }
}

// The backward keeps its large buffers per calling thread between calls (their contents never carry over): a small
// layer's gradients are the same bits after a larger layer filled those buffers, on another thread (its own buffers),
// and again on this one; a MIMO layer with the x columns' sums over ranks (dzx must start cleared every call).
TEST(MixerBackwardFast, ReusedBuffersCarryNothingOver) {
  std::mt19937 rng(41);
  Mamba3Config big = small(true, 4, 4), little = small(true, 2, 4);
  big.d_model = 32, big.ngroups = 2;
  Mamba3Mixer mb(big, random_mixer_weights(big, rng)), ml(little, random_mixer_weights(little, rng));
  const Tensor ub = random_tensor(rng, {3, 37, big.d_model}), db = random_tensor(rng, {3, 37, big.d_model});
  const Tensor ul = random_tensor(rng, {2, 13, little.d_model}), dl = random_tensor(rng, {2, 13, little.d_model});
  const auto same = [](const Mamba3MixerGradients& a, const Mamba3MixerGradients& b) {
    if (a.u.nbytes() != b.u.nbytes() || std::memcmp(a.u.raw(), b.u.raw(), a.u.nbytes()) != 0) return false;
    for (const auto& [name, t] : a.params) {
      const Tensor& o = b.params.at(name);
      if (t.nbytes() != o.nbytes() || std::memcmp(t.raw(), o.raw(), t.nbytes()) != 0) return false;
    }
    return true;
  };
  Mamba3MixerGradients fresh;
  std::thread([&] { fresh = mamba3_mixer_backward(ml, ul, dl); }).join();  // a thread whose buffers start empty
  mamba3_mixer_backward(mb, ub, db);                                       // fills this thread's buffers
  const Mamba3MixerGradients after_big = mamba3_mixer_backward(ml, ul, dl);
  const Mamba3MixerGradients again = mamba3_mixer_backward(ml, ul, dl);
  EXPECT_TRUE(same(fresh, after_big)) << "a larger call's buffer contents changed a later call's gradients";
  EXPECT_TRUE(same(after_big, again)) << "two equal calls differ";
}

TEST(MixerBackwardFast, BadInputs) {
  Mamba3Config c = small(false, 1, 8);
  std::mt19937 rng(1);
  Mamba3Mixer m(c, random_mixer_weights(c, rng));
  Tensor u = random_tensor(rng, {2, 5, c.d_model});
  EXPECT_THROW(mamba3_mixer_backward(m, u, random_tensor(rng, {2, 4, c.d_model})), Error);
  EXPECT_THROW(mamba3_mixer_backward(m, u, random_tensor(rng, {2, 5, c.d_model + 1})), Error);
  EXPECT_THROW(mamba3_mixer_backward(m, random_tensor(rng, {2, 0, c.d_model}), random_tensor(rng, {2, 0, c.d_model})),
               Error);
}

}  // namespace
}  // namespace mamba3::test
