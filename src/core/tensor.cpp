#include "core/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace mamba3 {

std::string shape_str(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

int64_t shape_numel(const Shape& shape) {
  // A zero anywhere makes the product 0, however large the other dimensions (which alone could overflow).
  for (int64_t d : shape)
    if (d == 0) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {
// Rejects negative dimensions and shapes whose size in bytes does not fit in int64 (where numel() would wrap).
void check_valid_shape(const Shape& shape, DType dtype) {
  int64_t bytes = int64_t(dtype_size(dtype));
  bool has_zero = false, overflow = false;
  for (int64_t d : shape) {
    MAMBA3_CHECK(d >= 0, "tensor: negative dimension in shape {}", shape_str(shape));
    has_zero |= d == 0;
    overflow |= __builtin_mul_overflow(bytes, d, &bytes);
  }
  MAMBA3_CHECK(has_zero || !overflow, "tensor: shape {} of {} is too large", shape_str(shape), dtype_name(dtype));
}
}  // namespace

Tensor Tensor::empty(DType dtype, Shape shape) {
  check_valid_shape(shape, dtype);
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  // 64-byte alignment so vector loads never straddle cache lines at row starts.
  size_t bytes = std::max<size_t>(64, (t.nbytes() + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) fail("tensor: out of memory allocating {} bytes", bytes);
  t.holder_ = std::shared_ptr<void>(p, std::free);
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros(DType dtype, Shape shape) {
  Tensor t = empty(dtype, std::move(shape));
  t.fill_zero();
  return t;
}

Tensor Tensor::view_of(std::shared_ptr<const void> holder, const void* data, DType dtype, Shape shape) {
  check_valid_shape(shape, dtype);
  Tensor t;
  t.holder_ = std::move(holder);
  t.data_ = const_cast<void*>(data);
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::from_floats(const std::vector<float>& values, Shape shape) {
  check_valid_shape(shape, DType::F32);
  MAMBA3_CHECK(int64_t(values.size()) == shape_numel(shape), "tensor: {} values for shape {}", values.size(),
               shape_str(shape));
  Tensor t = empty(DType::F32, std::move(shape));
  if (!values.empty()) std::memcpy(t.data_, values.data(), values.size() * sizeof(float));
  return t;
}

Tensor Tensor::to(DType dtype) const {
  Tensor t = empty(dtype, shape_);
  convert_floats(data_, dtype_, t.data_, dtype, size_t(numel()));
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  check_valid_shape(shape, dtype_);
  MAMBA3_CHECK(shape_numel(shape) == numel(), "tensor: cannot reshape {} to {}", shape_str(shape_), shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice(int64_t begin, int64_t end) const {
  MAMBA3_CHECK(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0], "tensor: slice [{}, {}) of shape {}",
               begin, end, shape_str(shape_));
  Tensor t = *this;
  size_t row = size_t(numel() / std::max<int64_t>(shape_[0], 1)) * dtype_size(dtype_);
  t.data_ = static_cast<char*>(data_) + size_t(begin) * row;
  t.shape_[0] = end - begin;
  return t;
}

void Tensor::fill_zero() {
  if (numel() > 0) std::memset(data_, 0, nbytes());
}

void Tensor::copy_from(const Tensor& other) {
  MAMBA3_CHECK(other.shape_ == shape_, "tensor: copy from shape {} into shape {}", shape_str(other.shape_),
               shape_str(shape_));
  convert_floats(other.data_, other.dtype_, data_, dtype_, size_t(numel()));
}

bool has_shape(const Tensor& t, std::initializer_list<int64_t> expected) {
  return t.shape().size() == expected.size() && std::equal(expected.begin(), expected.end(), t.shape().begin());
}

void check_shape(const Tensor& t, const Shape& expected, const std::string& what) {
  MAMBA3_CHECK(t.shape() == expected, "{}: expected shape {}, got {}", what, shape_str(expected), shape_str(t.shape()));
}

}  // namespace mamba3
