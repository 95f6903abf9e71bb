#pragma once
// Every parameter of a model in one f32 device allocation, with its gradient sum and the two AdamW moments in the
// same layout: tensors in name order, each starting on a 256-byte boundary, the gaps kept at zero (so a norm or an
// update over the whole buffer is one call and the gaps never change). Optionally a bf16 mirror of the parameters in
// the same layout (enable_mirror): the bf16 mode's product operands, rounded once per update instead of once per
// product.
#include <cuda_runtime.h>

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
  // another shape/dtype) ← buffer, or buffer ← host[prefix + name]. An upload into params() marks the mirror stale.
  void download(const float* buffer, TensorMap& host, const std::string& prefix = "") const;
  void upload(float* buffer, const std::map<std::string, Tensor>& host, const std::string& prefix,
              const std::string& source);

  // The bf16 mirror: params() rounded to bf16 (nearest even), total() values at the same offsets (gaps zero), the
  // bits TrainGemm's own rounding of a weight gives. enable_mirror allocates it (once) and fills it on stream s;
  // refresh_mirror rounds the whole flat buffer again (one pass). It stays current through the flat AdamW, which
  // writes it beside the weights (adamw_update_flat_gpu's p16 = params16()); every other writer of params() makes it
  // stale: upload does so itself, anything writing through params() directly calls invalidate_mirror. Readers check
  // mirror_valid() and refresh first (GpuLmTrainer::run at the start of each step).
  void enable_mirror(cudaStream_t s);
  void refresh_mirror(cudaStream_t s);
  void invalidate_mirror() { mirror_valid_ = false; }
  bool has_mirror() const { return !params16_.empty(); }
  bool mirror_valid() const { return has_mirror() && mirror_valid_; }
  uint16_t* params16() const { return has_mirror() ? params16_.as<uint16_t>() : nullptr; }  // null: no mirror
  const uint16_t* param16(const std::string& name) const {  // null: no mirror
    return has_mirror() ? params16_.as<uint16_t>() + entry(name).offset : nullptr;
  }
  // The mirror of a pointer into params() (a tensor's start, as param() gives it); null without a mirror.
  const uint16_t* mirror_of(const float* param) const;

 private:
  std::vector<Entry> entries_;
  std::unordered_map<std::string, size_t> index_;
  int64_t total_ = 0;
  DeviceBuffer params_, grads_, exp_avg_, exp_avg_sq_;
  DeviceBuffer params16_;  // the bf16 mirror (empty until enable_mirror)
  bool mirror_valid_ = false;
};

}  // namespace mamba3::cuda
