#pragma once
// Loads a golden mixer case (mixer_*.safetensors): config from its metadata, the layer from its parameters.
#include <string>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/mamba3_mixer.h"

namespace mamba3::test {

inline Mamba3Config golden_mixer_config(const SafetensorsFile& f) {
  auto it = f.metadata().find("config");
  MAMBA3_CHECK(it != f.metadata().end(), "{}: no __metadata__ config", f.path());
  return Mamba3Config::from_json(nlohmann::json::parse(it->second), f.path());
}

// Token t of a (B, T, D) tensor as a fresh (B, D) tensor.
inline Tensor token(const Tensor& seq, int64_t t) {
  const int64_t B = seq.dim(0), T = seq.dim(1), D = seq.dim(2);
  Tensor out = Tensor::empty(DType::F32, {B, D});
  Tensor src = seq.to(DType::F32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) out.data<float>()[b * D + d] = src.data<float>()[(b * T + t) * D + d];
  return out;
}

// Tokens [t0, t1) of a (B, T, D) tensor as a fresh (B, t1 − t0, D) tensor.
inline Tensor tokens(const Tensor& seq, int64_t t0, int64_t t1) {
  const int64_t B = seq.dim(0), T = seq.dim(1), D = seq.dim(2);
  Tensor out = Tensor::empty(DType::F32, {B, t1 - t0, D});
  Tensor src = seq.to(DType::F32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t d = 0; d < D; ++d)
        out.data<float>()[(b * (t1 - t0) + t - t0) * D + d] = src.data<float>()[(b * T + t) * D + d];
  return out;
}

}  // namespace mamba3::test
