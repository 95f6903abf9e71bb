#include "core/dtype.h"

#include <cmath>

#include "core/error.h"

namespace mamba3 {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

bool dtype_from_name(std::string_view name, DType* out) {
  static constexpr DType all[] = {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64};
  for (DType d : all) {
    if (dtype_name(d) == name) {
      *out = d;
      return true;
    }
  }
  return false;
}

bool dtype_is_float(DType dtype) { return dtype != DType::I32 && dtype != DType::I64; }

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: value = mant * 2^-24
      float f = std::ldexp(float(mant), -24);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;     // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;    // overflow (≥ 65520 rounds to inf)
  if (abs < 0x38800000u) {                          // below the smallest normal: round to a subnormal
    float a;
    std::memcpy(&a, &abs, 4);
    return sign | uint16_t(std::nearbyint(a * 16777216.0f));  // 2^24; default rounding is to nearest even
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u) - (112u << 23);
  return sign | uint16_t(rounded >> 13);
}

namespace {
// f64 -> f32 rounding to odd: when the double is not exactly a float, truncate toward zero and set the last bit.
// Rounding that result to bf16/f16 (≥ 2 bits narrower) then equals rounding the double directly; plain float(v)
// would round twice and can land on a tie that the double was not on.
float f64_to_f32_round_odd(double v) {
  float f = float(v);
  if (std::isnan(v) || double(f) == v) return f;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::fabs(double(f)) > std::fabs(v)) --bits;  // rounded away from zero (possibly to inf): step back
  bits |= 1u;
  std::memcpy(&f, &bits, 4);
  return f;
}

double load(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    case DType::I64: return double(static_cast<const int64_t*>(p)[i]);
  }
  return 0;
}
void store(void* p, DType t, size_t i, double v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = float(v); break;
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(f64_to_f32_round_odd(v)); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(f64_to_f32_round_odd(v)); break;
    case DType::I32: static_cast<int32_t*>(p)[i] = int32_t(v); break;
    case DType::I64: static_cast<int64_t*>(p)[i] = int64_t(v); break;
  }
}
}  // namespace

void convert_floats(const void* src, DType src_type, void* dst, DType dst_type, size_t n) {
  if (src_type == dst_type) {
    std::memcpy(dst, src, n * dtype_size(src_type));
    return;
  }
  // The common case (weights stored bf16/f16, computed f32) gets a direct loop.
  if (dst_type == DType::F32 && src_type == DType::BF16) {
    auto* d = static_cast<float*>(dst);
    auto* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
    return;
  }
  for (size_t i = 0; i < n; ++i) store(dst, dst_type, i, load(src, src_type, i));
}

}  // namespace mamba3
