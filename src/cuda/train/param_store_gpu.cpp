#include "cuda/train/param_store_gpu.h"

#include "core/error.h"

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
                           const std::string& source) const {
  for (const Entry& e : entries_) {
    auto it = host.find(prefix + e.name);
    MAMBA3_CHECK(it != host.end(), "{}: missing tensor '{}'", source, prefix + e.name);
    check_shape(it->second, e.shape, source + ": " + prefix + e.name);
    const Tensor t = it->second.to(DType::F32);
    if (e.numel)
      MAMBA3_CUDA_CHECK(cudaMemcpy(buffer + e.offset, t.raw(), size_t(e.numel) * 4, cudaMemcpyHostToDevice));
  }
}

}  // namespace mamba3::cuda
