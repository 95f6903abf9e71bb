#pragma once
// Element types and conversions between the floating formats (f32, bf16, f16, f64).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace mamba3 {

enum class DType { F32, F64, BF16, F16, I32, I64 };

size_t dtype_size(DType dtype);
// The safetensors spelling ("F32", "BF16", ...).
std::string_view dtype_name(DType dtype);
// Parses a safetensors dtype name; returns false for an unknown one.
bool dtype_from_name(std::string_view name, DType* out);
bool dtype_is_float(DType dtype);

// bf16 keeps the top 16 bits of an f32; rounding to nearest even, NaN kept quiet.
inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}
float f16_to_f32(uint16_t v);
uint16_t f32_to_f16(float f);

// Converts n elements from one float type to another (any of F32, F64, BF16, F16).
void convert_floats(const void* src, DType src_type, void* dst, DType dst_type, size_t n);

}  // namespace mamba3
