// Tensor: construction, shapes, views that share storage (slice, reshape), conversion (to, copy_from), shape checks.
#include "core/tensor.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "support/error_of.h"

namespace mamba3 {
namespace {

using test::error_of;

using ::testing::HasSubstr;


TEST(Tensor, ShapeStrAndNumel) {
  EXPECT_EQ(shape_str({}), "()");
  EXPECT_EQ(shape_str({7}), "(7)");
  EXPECT_EQ(shape_str({2, 3, 4}), "(2, 3, 4)");
  EXPECT_EQ(shape_numel({}), 1);
  EXPECT_EQ(shape_numel({2, 3, 4}), 24);
  EXPECT_EQ(shape_numel({5, 0, 3}), 0);
}

TEST(Tensor, DefaultIsUndefined) {
  Tensor t;
  EXPECT_FALSE(t.defined());
  EXPECT_EQ(t.raw(), nullptr);
}

TEST(Tensor, EmptyAndZerosShapes) {
  for (DType dtype : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64}) {
    Tensor t = Tensor::zeros(dtype, {3, 5, 7});
    EXPECT_TRUE(t.defined());
    EXPECT_EQ(t.dtype(), dtype);
    EXPECT_EQ(t.device(), Device::CPU);
    EXPECT_EQ(t.shape(), (Shape{3, 5, 7}));
    EXPECT_EQ(t.ndim(), 3);
    EXPECT_EQ(t.dim(0), 3);
    EXPECT_EQ(t.dim(2), 7);
    EXPECT_EQ(t.dim(-1), 7);
    EXPECT_EQ(t.dim(-3), 3);
    EXPECT_EQ(t.numel(), 105);
    EXPECT_EQ(t.nbytes(), 105 * dtype_size(dtype));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 64, 0u) << "storage is 64-byte aligned";
    const auto* bytes = static_cast<const unsigned char*>(t.raw());
    for (size_t i = 0; i < t.nbytes(); ++i) ASSERT_EQ(bytes[i], 0) << dtype_name(dtype) << " byte " << i;
  }
}

TEST(Tensor, ScalarAndZeroSized) {
  Tensor scalar = Tensor::from_floats({4.5f}, {});
  EXPECT_EQ(scalar.ndim(), 0);
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.nbytes(), 4u);
  EXPECT_EQ(scalar.data<float>()[0], 4.5f);

  Tensor none = Tensor::zeros(DType::F32, {4, 0});
  EXPECT_TRUE(none.defined());
  EXPECT_EQ(none.numel(), 0);
  EXPECT_EQ(none.nbytes(), 0u);
  EXPECT_NE(none.raw(), nullptr);
  Tensor none_bf16 = none.to(DType::BF16);
  EXPECT_EQ(none_bf16.shape(), (Shape{4, 0}));
  Tensor rows = none.slice(1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 0}));
  Tensor leading_zero = Tensor::zeros(DType::F32, {0, 3});
  EXPECT_EQ(leading_zero.slice(0, 0).shape(), (Shape{0, 3}));
}

TEST(Tensor, NegativeDimensionsRejected) {
  EXPECT_THAT(error_of([] { Tensor::empty(DType::F32, {2, -3}); }), HasSubstr("(2, -3)"));
  EXPECT_THAT(error_of([] { Tensor::zeros(DType::F32, {-1}); }), HasSubstr("negative"));
  // Two negatives multiply to a positive count: still rejected.
  EXPECT_THAT(error_of([] { Tensor::from_floats({1, 2}, {-1, -2}); }), HasSubstr("(-1, -2)"));
  Tensor t = Tensor::zeros(DType::F32, {2, 2});
  EXPECT_THAT(error_of([&] { t.reshape({-2, -2}); }), HasSubstr("(-2, -2)"));
  EXPECT_THAT(error_of([&] { t.reshape({-1, 4}); }), HasSubstr("(-1, 4)"));
  std::vector<float> storage(4);
  std::shared_ptr<const void> holder(storage.data(), [](const void*) {});
  EXPECT_THAT(error_of([&] { Tensor::view_of(holder, storage.data(), DType::F32, {-4, -1}); }),
              HasSubstr("(-4, -1)"));
}

TEST(Tensor, OverflowingShapesRejected) {
  const int64_t big = int64_t(1) << 40;
  EXPECT_THAT(error_of([&] { Tensor::empty(DType::F32, {big, big}); }), HasSubstr("(1099511627776, 1099511627776)"));
  // numel fits but the byte count does not.
  EXPECT_THAT(error_of([] { Tensor::empty(DType::F64, {int64_t(1) << 61}); }), HasSubstr("2305843009213693952"));
  Tensor empty = Tensor::zeros(DType::F32, {0});
  // (2^62)·8 wraps to 0 in 64 bits; a zero-element tensor must not accept it as an equal count.
  EXPECT_THAT(error_of([&] { empty.reshape({int64_t(1) << 62, 8}); }), HasSubstr("(4611686018427387904, 8)"));
}

TEST(Tensor, FromFloats) {
  Tensor t = Tensor::from_floats({1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(t.dtype(), DType::F32);
  EXPECT_EQ(t.shape(), (Shape{2, 3}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(t.data<float>()[i], float(i + 1));
  std::string msg = error_of([] { Tensor::from_floats({1, 2, 3}, {2, 2}); });
  EXPECT_THAT(msg, HasSubstr("3 values"));
  EXPECT_THAT(msg, HasSubstr("(2, 2)"));
}

TEST(Tensor, SliceSharesStorage) {
  Tensor t = Tensor::from_floats({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, {4, 3});
  Tensor s = t.slice(1, 3);
  EXPECT_EQ(s.shape(), (Shape{2, 3}));
  EXPECT_EQ(s.data<float>(), t.data<float>() + 3);
  EXPECT_EQ(s.data<float>()[0], 3.0f);
  EXPECT_EQ(s.data<float>()[5], 8.0f);
  s.data<float>()[0] = -1;
  EXPECT_EQ(t.data<float>()[3], -1.0f);
  t.data<float>()[8] = 42;
  EXPECT_EQ(s.data<float>()[5], 42.0f);
  // Slices of slices, and of higher-rank bf16 tensors (row size = product of trailing dims × element size).
  Tensor ss = s.slice(1, 2);
  EXPECT_EQ(ss.data<float>(), t.data<float>() + 6);
  Tensor h = Tensor::zeros(DType::BF16, {5, 2, 3});
  EXPECT_EQ(h.slice(4, 5).data<uint16_t>(), h.data<uint16_t>() + 24);
  EXPECT_EQ(h.slice(2, 2).numel(), 0);
  EXPECT_EQ(t.slice(0, 4).data<float>(), t.data<float>());
  // The slice keeps the storage alive after the original is gone.
  Tensor kept;
  {
    Tensor tmp = Tensor::from_floats({7, 8, 9}, {3});
    kept = tmp.slice(2, 3);
  }
  EXPECT_EQ(kept.data<float>()[0], 9.0f);
}

TEST(Tensor, SliceOutOfRange) {
  Tensor t = Tensor::zeros(DType::F32, {4, 3});
  for (auto [b, e] : {std::pair<int64_t, int64_t>{-1, 2}, {3, 2}, {0, 5}, {5, 5}}) {
    std::string msg = error_of([&] { t.slice(b, e); });
    EXPECT_THAT(msg, HasSubstr("[" + std::to_string(b) + ", " + std::to_string(e) + ")"));
    EXPECT_THAT(msg, HasSubstr("(4, 3)"));
  }
  Tensor scalar = Tensor::from_floats({1}, {});
  EXPECT_THAT(error_of([&] { scalar.slice(0, 1); }), HasSubstr("()"));
}

TEST(Tensor, ReshapeSharesStorage) {
  Tensor t = Tensor::from_floats({0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor r = t.reshape({3, 2});
  EXPECT_EQ(r.shape(), (Shape{3, 2}));
  EXPECT_EQ(r.raw(), t.raw());
  r.data<float>()[5] = 50;
  EXPECT_EQ(t.data<float>()[5], 50.0f);
  EXPECT_EQ(t.reshape({6}).shape(), (Shape{6}));
  EXPECT_EQ(t.reshape({1, 6, 1}).shape(), (Shape{1, 6, 1}));
  EXPECT_EQ(t.shape(), (Shape{2, 3})) << "the original keeps its shape";
  Tensor one = Tensor::from_floats({3}, {1, 1});
  EXPECT_EQ(one.reshape({}).ndim(), 0);
  std::string msg = error_of([&] { t.reshape({4, 2}); });
  EXPECT_THAT(msg, HasSubstr("(2, 3)"));
  EXPECT_THAT(msg, HasSubstr("(4, 2)"));
}

TEST(Tensor, ToConverts) {
  Tensor t = Tensor::from_floats({1.0f, -2.5f, 0.1f, 65504.0f}, {2, 2});
  Tensor b = t.to(DType::BF16);
  EXPECT_EQ(b.dtype(), DType::BF16);
  EXPECT_EQ(b.shape(), t.shape());
  EXPECT_EQ(b.data<uint16_t>()[0], 0x3f80);
  EXPECT_EQ(b.data<uint16_t>()[1], 0xc020);
  EXPECT_EQ(b.data<uint16_t>()[2], f32_to_bf16(0.1f));
  Tensor h = t.to(DType::F16);
  EXPECT_EQ(h.data<uint16_t>()[0], 0x3c00);
  EXPECT_EQ(h.data<uint16_t>()[3], 0x7bff);
  Tensor d = t.to(DType::F64);
  EXPECT_EQ(d.data<double>()[2], double(0.1f));
  Tensor back = h.to(DType::F32);
  EXPECT_EQ(back.data<float>()[1], -2.5f);
  EXPECT_EQ(back.data<float>()[3], 65504.0f);
  EXPECT_EQ(b.to(DType::F32).data<float>()[1], -2.5f);
  // Same dtype: a fresh, independent buffer.
  Tensor c = t.to(DType::F32);
  EXPECT_NE(c.raw(), t.raw());
  c.data<float>()[0] = 9;
  EXPECT_EQ(t.data<float>()[0], 1.0f);
  Tensor cl = t.clone();
  EXPECT_NE(cl.raw(), t.raw());
  EXPECT_EQ(cl.data<float>()[3], 65504.0f);
  // A slice converts only its own rows.
  Tensor row = t.slice(1, 2).to(DType::F64);
  EXPECT_EQ(row.shape(), (Shape{1, 2}));
  EXPECT_EQ(row.data<double>()[0], double(0.1f));
}

TEST(Tensor, CopyFrom) {
  Tensor src = Tensor::from_floats({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor dst = Tensor::zeros(DType::F16, {2, 3});
  dst.copy_from(src);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(f16_to_f32(dst.data<uint16_t>()[i]), float(i + 1));
  Tensor big = Tensor::zeros(DType::F32, {4, 3});
  big.slice(2, 4).copy_from(src);  // writes through the view
  EXPECT_EQ(big.data<float>()[5], 0.0f);
  EXPECT_EQ(big.data<float>()[6], 1.0f);
  EXPECT_EQ(big.data<float>()[11], 6.0f);

  Tensor wrong = Tensor::zeros(DType::F32, {3, 2});
  std::string msg = error_of([&] { wrong.copy_from(src); });
  EXPECT_THAT(msg, HasSubstr("(2, 3)"));
  EXPECT_THAT(msg, HasSubstr("(3, 2)"));
  EXPECT_EQ(wrong.data<float>()[0], 0.0f) << "nothing copied on error";
  Tensor flat = Tensor::zeros(DType::F32, {6});
  msg = error_of([&] { flat.copy_from(src); });
  EXPECT_THAT(msg, HasSubstr("(6)"));
  EXPECT_THAT(msg, HasSubstr("(2, 3)"));
}

TEST(Tensor, FillZero) {
  Tensor t = Tensor::from_floats({1, 2, 3}, {3});
  t.slice(1, 2).fill_zero();
  EXPECT_EQ(t.data<float>()[0], 1.0f);
  EXPECT_EQ(t.data<float>()[1], 0.0f);
  EXPECT_EQ(t.data<float>()[2], 3.0f);
}

TEST(Tensor, CheckShape) {
  Tensor t = Tensor::zeros(DType::F32, {2, 3});
  EXPECT_NO_THROW(check_shape(t, {2, 3}, "x"));
  std::string msg = error_of([&] { check_shape(t, {2, 4}, "layers.0.mixer.in_proj.weight"); });
  EXPECT_THAT(msg, HasSubstr("layers.0.mixer.in_proj.weight"));
  EXPECT_THAT(msg, HasSubstr("(2, 4)"));
  EXPECT_THAT(msg, HasSubstr("(2, 3)"));
  EXPECT_THAT(error_of([&] { check_shape(t, {6}, "flat"); }), HasSubstr("(6)"));
}

TEST(Tensor, ViewOfKeepsHolderAlive) {
  auto storage = std::make_shared<std::vector<float>>(std::vector<float>{1, 2, 3, 4});
  std::weak_ptr<std::vector<float>> watch = storage;
  Tensor v = Tensor::view_of(storage, storage->data(), DType::F32, {2, 2});
  EXPECT_EQ(v.raw(), storage->data());
  Tensor row = v.slice(1, 2);
  storage.reset();
  v = Tensor();
  EXPECT_FALSE(watch.expired()) << "the slice still holds the storage";
  EXPECT_EQ(row.data<float>()[1], 4.0f);
  row = Tensor();
  EXPECT_TRUE(watch.expired());
}

}  // namespace
}  // namespace mamba3
