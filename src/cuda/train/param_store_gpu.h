#pragma once
// Every parameter of a model in one f32 device allocation, with its gradient sum and the two AdamW moments in the
// same layout: tensors in name order, each starting on a 256-byte boundary, the gaps kept at zero (so a norm or an
// update over the whole buffer is one call and the gaps never change).
#include <cstdint>
#include <string>
#include <map>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "cuda/device_buffer.h"

namespace mamba3::cuda {

class GpuParamStore {
 public:
  struct Entry {
    std::string name;
    Shape shape;
    int64_t offset = 0, numel = 0;  // floats
  };

  // Uploads every tensor of `params` (any float dtype, converted to f32); gradients and moments start at zero.
  explicit GpuParamStore(const TensorMap& params);

  const std::vector<Entry>& entries() const { return entries_; }
  int64_t total() const { return total_; }  // floats per buffer, gaps included
  const Entry& entry(const std::string& name) const;  // throws naming the parameter
  bool has(const std::string& name) const { return index_.count(name) != 0; }

  float* param(const std::string& name) const { return params_.as<float>() + entry(name).offset; }
  float* grad(const std::string& name) const { return grads_.as<float>() + entry(name).offset; }
  float* params() const { return params_.as<float>(); }
  float* grads() const { return grads_.as<float>(); }
  float* exp_avg() const { return exp_avg_.as<float>(); }
  float* exp_avg_sq() const { return exp_avg_sq_.as<float>(); }

  // Host ↔ device of one buffer for every tensor: host[name] (f32, entry's shape; allocated when missing or of
  // another shape/dtype) ← buffer, or buffer ← host[prefix + name].
  void download(const float* buffer, TensorMap& host, const std::string& prefix = "") const;
  void upload(float* buffer, const std::map<std::string, Tensor>& host, const std::string& prefix,
              const std::string& source) const;

 private:
  std::vector<Entry> entries_;
  std::unordered_map<std::string, size_t> index_;
  int64_t total_ = 0;
  DeviceBuffer params_, grads_, exp_avg_, exp_avg_sq_;
};

}  // namespace mamba3::cuda
