#pragma once
// Tensor: dtype, shape, device and contiguous row-major storage owned through a shared holder.
// Views share the holder (a slice along the leading dimension, a reshape); there is no autograd and no laziness.
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace mamba3 {

enum class Device { CPU };

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);
int64_t shape_numel(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(DType dtype, Shape shape);
  static Tensor zeros(DType dtype, Shape shape);
  // Wraps memory kept alive by `holder` (an mmap, another tensor's storage); no copy.
  static Tensor view_of(std::shared_ptr<const void> holder, const void* data, DType dtype, Shape shape);
  static Tensor from_floats(const std::vector<float>& values, Shape shape);

  bool defined() const { return holder_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return Device::CPU; }
  const Shape& shape() const { return shape_; }
  int64_t ndim() const { return int64_t(shape_.size()); }
  int64_t dim(int64_t i) const { return shape_.at(size_t(i < 0 ? i + ndim() : i)); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  template <typename T>
  T* data() {
    return static_cast<T*>(data_);
  }
  template <typename T>
  const T* data() const {
    return static_cast<const T*>(data_);
  }
  void* raw() { return data_; }
  const void* raw() const { return data_; }

  // A copy converted to `dtype` (a fresh buffer even when the dtype is unchanged).
  Tensor to(DType dtype) const;
  Tensor clone() const { return to(dtype_); }
  // Same storage, new shape with the same number of elements.
  Tensor reshape(Shape shape) const;
  // Rows [begin, end) of the leading dimension, sharing storage.
  Tensor slice(int64_t begin, int64_t end) const;
  void fill_zero();
  void copy_from(const Tensor& other);  // same shape; converts between float dtypes

 private:
  std::shared_ptr<const void> holder_;
  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Shape shape_;
};

// Tensors by name (a checkpoint's state_dict).
using TensorMap = std::map<std::string, Tensor>;

// Whether t has exactly this shape (no allocation: usable on hot paths).
bool has_shape(const Tensor& t, std::initializer_list<int64_t> expected);

// Throws with `what` naming the tensor when its shape differs from `expected`.
void check_shape(const Tensor& t, const Shape& expected, const std::string& what);

}  // namespace mamba3
