#include "cuda/train/param_store_gpu.h"

#include <cstdint>

#include "core/error.h"
#include "cuda/train/train_gemm.h"

namespace mamba3::cuda {

namespace {
constexpr int64_t kAlignFloats = 64;  // 256 bytes
}

GpuParamStore::GpuParamStore(const TensorMap& params) {
  for (const auto& [name, t] : params) {
    MAMBA3_CHECK(dtype_is_float(t.dtype()), "GPU training: parameter '{}' has dtype {}, expected a float type", name,
                 dtype_name(t.dtype()));
    index_[name] = entries_.size();
    entries_.push_back({name, t.shape(), total_, t.numel()});
    total_ += (t.numel() + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
  }
  MAMBA3_CHECK(total_ > 0, "GPU training: no parameters");
  const size_t bytes = size_t(total_) * 4;
  for (DeviceBuffer* b : {&params_, &grads_, &exp_avg_, &exp_avg_sq_}) {
    b->resize(bytes);
    MAMBA3_CUDA_CHECK(cudaMemset(b->raw(), 0, bytes));
  }
  for (const Entry& e : entries_) {
    const Tensor host = params.at(e.name).to(DType::F32);
    if (e.numel) params_.upload(host.raw(), size_t(e.numel) * 4, size_t(e.offset) * 4);
  }
}

const GpuParamStore::Entry& GpuParamStore::entry(const std::string& name) const {
  auto it = index_.find(name);
  MAMBA3_CHECK(it != index_.end(), "GPU training: no parameter '{}'", name);
  return entries_[it->second];
}

void GpuParamStore::download(const float* buffer, TensorMap& host, const std::string& prefix) const {
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  for (const Entry& e : entries_) {
    Tensor& t = host[prefix + e.name];
    if (!t.defined() || t.dtype() != DType::F32 || t.shape() != e.shape) t = Tensor::empty(DType::F32, e.shape);
    if (e.numel)
      MAMBA3_CUDA_CHECK(cudaMemcpy(t.raw(), buffer + e.offset, size_t(e.numel) * 4, cudaMemcpyDeviceToHost));
  }
}

void GpuParamStore::upload(float* buffer, const std::map<std::string, Tensor>& host, const std::string& prefix,
                           const std::string& source) {
  if (buffer == params()) invalidate_mirror();  // before the first write: a throw below leaves it stale too
  for (const Entry& e : entries_) {
    auto it = host.find(prefix + e.name);
    MAMBA3_CHECK(it != host.end(), "{}: missing tensor '{}'", source, prefix + e.name);
    check_shape(it->second, e.shape, source + ": " + prefix + e.name);
    const Tensor t = it->second.to(DType::F32);
    if (e.numel)
      MAMBA3_CUDA_CHECK(cudaMemcpy(buffer + e.offset, t.raw(), size_t(e.numel) * 4, cudaMemcpyHostToDevice));
  }
}

void GpuParamStore::enable_mirror(cudaStream_t s) {
  if (!has_mirror()) params16_.resize(size_t(total_) * 2);
  refresh_mirror(s);
}

void GpuParamStore::refresh_mirror(cudaStream_t s) {
  MAMBA3_CHECK(has_mirror(), "GpuParamStore::refresh_mirror: no mirror (enable_mirror first)");
  // The flat buffer as one row (total_ is a multiple of 64: the packed kernel), gaps included (zero → zero).
  f32_to_bf16_2d(s, params(), 1, total_, total_, params16_.as<uint16_t>());
  mirror_valid_ = true;
}

const uint16_t* GpuParamStore::mirror_of(const float* param) const {
  if (!has_mirror() || !param) return nullptr;
  const uintptr_t at = reinterpret_cast<uintptr_t>(param), base = reinterpret_cast<uintptr_t>(params());
  MAMBA3_CHECK(at >= base && at < base + size_t(total_) * 4 && (at - base) % 4 == 0,
               "GpuParamStore::mirror_of: the pointer is not into the parameters");
  return params16_.as<uint16_t>() + (at - base) / 4;
}

}  // namespace mamba3::cuda
