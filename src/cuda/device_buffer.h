#pragma once
// Owned device memory (RAII), untyped with typed accessors. Moves, never copies.
#include <cstddef>
#include <utility>
#include <vector>

#include "cuda/cuda_check.h"

namespace mamba3::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { resize(bytes); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }

  // Reallocates (contents lost) when the size changes.
  void resize(size_t bytes) {
    if (bytes == bytes_) return;
    release();
    if (bytes) MAMBA3_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
    bytes_ = bytes;
  }
  // Grows only (contents lost on growth): scratch that is reused across calls.
  void reserve(size_t bytes) {
    if (bytes > bytes_) resize(bytes);
  }
  size_t bytes() const { return bytes_; }
  bool empty() const { return bytes_ == 0; }
  void* raw() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

  void upload(const void* host, size_t bytes, size_t offset = 0) {
    MAMBA3_CHECK(offset + bytes <= bytes_, "device buffer: upload of {} bytes at {} past its {} bytes", bytes, offset,
                 bytes_);
    MAMBA3_CUDA_CHECK(cudaMemcpy(static_cast<char*>(ptr_) + offset, host, bytes, cudaMemcpyHostToDevice));
    // From pageable memory cudaMemcpy may return before its DMA lands, and the legacy stream it runs on does not order
    // the contexts' non-blocking streams: wait for it, so that a kernel queued next reads the uploaded bytes.
    MAMBA3_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  }
  void download(void* host, size_t bytes, size_t offset = 0) const {
    MAMBA3_CHECK(offset + bytes <= bytes_, "device buffer: download of {} bytes at {} past its {} bytes", bytes, offset,
                 bytes_);
    MAMBA3_CUDA_CHECK(cudaMemcpy(host, static_cast<const char*>(ptr_) + offset, bytes, cudaMemcpyDeviceToHost));
  }
  template <typename T>
  static DeviceBuffer from(const std::vector<T>& v) {
    DeviceBuffer b(v.size() * sizeof(T));
    if (!v.empty()) b.upload(v.data(), v.size() * sizeof(T));
    return b;
  }
  template <typename T>
  std::vector<T> to_vector() const {
    std::vector<T> v(bytes_ / sizeof(T));
    if (!v.empty()) download(v.data(), v.size() * sizeof(T));
    return v;
  }

 private:
  void release() noexcept {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace mamba3::cuda
