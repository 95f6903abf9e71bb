#include "model/gated_mlp.h"

#include <algorithm>

#include "ops/linear.h"
#include "ops/mamba3_common.h"

namespace mamba3 {

Tensor load_parameter(const TensorMap& weights, const std::string& name, const Shape& shape, const std::string& source,
                      std::set<std::string>* used) {
  auto it = weights.find(name);
  MAMBA3_CHECK(it != weights.end(), "{}: missing parameter '{}'", source, name);
  MAMBA3_CHECK(dtype_is_float(it->second.dtype()), "{}: tensor '{}' has dtype {}, expected a float type", source, name,
               dtype_name(it->second.dtype()));
  MAMBA3_CHECK(it->second.shape() == shape, "{}: tensor '{}': expected shape {}, got {}", source, name,
               shape_str(shape), shape_str(it->second.shape()));
  if (used) used->insert(name);
  return it->second.to(DType::F32);
}

GatedMlp::GatedMlp(int64_t d_model, int64_t d_ff, const TensorMap& weights, const std::string& prefix,
                   const std::string& source, std::set<std::string>* used)
    : d_model_(d_model), d_ff_(d_ff) {
  fc1_ = load_parameter(weights, prefix + "fc1.weight", {2 * d_ff, d_model}, source, used);
  fc2_ = load_parameter(weights, prefix + "fc2.weight", {d_model, d_ff}, source, used);
}

void GatedMlp::forward(const float* x, int64_t rows, float* hidden, float* out) const {
  linear(x, rows, d_model_, fc1_.data<float>(), 2 * d_ff_, hidden);  // (rows, 2·d_ff)
  for (int64_t r = 0; r < rows; ++r) {
    float* h = hidden + r * 2 * d_ff_;
    // Compact a ⊙ silu(g) into the first half of the row, then gather rows contiguously for fc2.
    for (int64_t j = 0; j < d_ff_; ++j) h[j] = h[j] * detail::silu(h[d_ff_ + j]);
    std::copy_n(h, d_ff_, hidden + r * d_ff_);
  }
  linear(hidden, rows, d_ff_, fc2_.data<float>(), d_model_, out);
}

}  // namespace mamba3
