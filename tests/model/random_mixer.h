#pragma once
// Random Mamba-3 layers for property tests: parameters drawn in realistic ranges (dt around 0.01–0.3, decays
// visible within a few chunks, angles turning noticeably) so that every term of the recurrence matters.
#include <cmath>
#include <random>

#include "model/mamba3_mixer.h"
#include "support/test_support.h"

namespace mamba3::test {

// A small layer shape for property tests: mimo_rank 0 = SISO.
inline Mamba3Config small_mixer_config(int64_t d_model, int64_t d_state, int64_t headdim, int64_t ngroups, double rope,
                                       bool outnorm, int64_t mimo_rank, int64_t chunk) {
  Mamba3Config c;
  c.d_model = d_model, c.d_state = d_state, c.headdim = headdim, c.ngroups = ngroups, c.rope_fraction = rope;
  c.is_outproj_norm = outnorm, c.is_mimo = mimo_rank > 0, c.mimo_rank = mimo_rank > 0 ? mimo_rank : 4;
  c.chunk_size = chunk;
  return c;
}

// A named layer shape of a property test's case table.
struct MixerCase {
  const char* name;
  Mamba3Config config;
};

inline TensorMap random_mixer_weights(const Mamba3Config& c, std::mt19937& rng) {
  const int64_t H = c.nheads(), R = c.rank(), N = c.d_state, P = c.headdim;
  const float win = 1.0f / std::sqrt(float(c.d_model)), wout = 1.0f / std::sqrt(float(c.d_inner()));
  TensorMap w;
  w["dt_bias"] = random_tensor(rng, {H}, -4.0f, -1.0f);
  w["B_bias"] = random_tensor(rng, {H, R, N}, 0.5f, 1.5f);
  w["C_bias"] = random_tensor(rng, {H, R, N}, 0.5f, 1.5f);
  if (c.is_mimo) {
    w["mimo_x"] = random_tensor(rng, {H, R, P}, 0.0f, 2.0f / float(R));
    w["mimo_z"] = random_tensor(rng, {H, R, P}, 0.5f, 1.5f);
    w["mimo_o"] = random_tensor(rng, {H, R, P}, 0.0f, 2.0f / float(R));
  }
  w["D"] = random_tensor(rng, {H}, 0.5f, 1.5f);
  w["in_proj.weight"] = random_tensor(rng, {c.d_in_proj(), c.d_model}, -win, win);
  w["B_norm.weight"] = random_tensor(rng, {N}, 0.5f, 1.5f);
  w["C_norm.weight"] = random_tensor(rng, {N}, 0.5f, 1.5f);
  if (c.is_outproj_norm) w["norm.weight"] = random_tensor(rng, {c.d_inner()}, 0.5f, 1.5f);
  w["out_proj.weight"] = random_tensor(rng, {c.d_model, c.d_inner()}, -wout, wout);
  return w;
}

}  // namespace mamba3::test
