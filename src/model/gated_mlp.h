#pragma once
// GatedMLP (spec §9.5): [a, g] = fc1(x) split in halves; out = fc2(a ⊙ silu(g)). d_ff = ⌈d_intermediate/128⌉·128.
#include <set>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mamba3 {

class GatedMlp {
 public:
  GatedMlp(int64_t d_model, int64_t d_ff, const TensorMap& weights, const std::string& prefix,
           const std::string& source, std::set<std::string>* used);
  // x, out: (rows, d_model); hidden: scratch of at least rows·2·d_ff floats.
  void forward(const float* x, int64_t rows, float* hidden, float* out) const;
  int64_t d_ff() const { return d_ff_; }
  size_t parameter_count() const { return size_t(fc1_.numel() + fc2_.numel()); }

 private:
  int64_t d_model_, d_ff_;
  Tensor fc1_, fc2_;
};

// Loads `name` from `weights` as f32 after checking its shape; errors name `source` and the tensor.
Tensor load_parameter(const TensorMap& weights, const std::string& name, const Shape& shape, const std::string& source,
                      std::set<std::string>* used);

}  // namespace mamba3
