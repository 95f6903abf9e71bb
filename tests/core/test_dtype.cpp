// dtypes and the float conversions: exhaustive round trips over every 16-bit pattern, and f32 -> f16/bf16 against
// an independent rounding written here in long double arithmetic.
#include "core/dtype.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace mamba3 {
namespace {

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Rounds |x| (finite, ≥ 0) to a multiple of `quantum` (a power of two), ties to even multiples.
long double round_to_quantum(long double x, long double quantum) {
  long double n = x / quantum;  // exact: dividing by a power of two
  long double r = std::floor(n);
  long double frac = n - r;
  if (frac > 0.5L || (frac == 0.5L && std::fmod(r, 2.0L) != 0)) r += 1;
  return r * quantum;
}

// f16 value of a bit pattern, decoded from the IEEE definition (not from the library).
long double ref_f16_value(uint16_t h) {
  int sign = (h >> 15) ? -1 : 1;
  int exp = (h >> 10) & 0x1f;
  int mant = h & 0x3ff;
  if (exp == 31) return mant ? std::numeric_limits<long double>::quiet_NaN() : sign * HUGE_VALL;
  if (exp == 0) return sign * std::ldexp((long double)mant, -24);
  return sign * std::ldexp((long double)(1024 + mant), exp - 25);
}

// f32 -> f16 with round to nearest even, computed from values rather than bit tricks.
uint16_t ref_f32_to_f16(float x) {
  uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  if (std::isnan(x)) return sign | 0x7e00;
  long double a = std::fabs((long double)x);
  if (a >= 65520.0L) return sign | 0x7c00;  // 65520 is halfway between 65504 and 2^16: ties to even go up
  long double quantum;
  if (a < std::ldexp(1.0L, -14)) {
    quantum = std::ldexp(1.0L, -24);
  } else {
    int e;
    std::frexp(a, &e);  // a = m·2^e with m in [0.5, 1): 11 significant bits means a quantum of 2^(e-11)
    quantum = std::ldexp(1.0L, e - 11);
  }
  long double r = round_to_quantum(a, quantum);
  if (r == 0) return sign;
  if (r < std::ldexp(1.0L, -14)) return sign | uint16_t(r / std::ldexp(1.0L, -24));
  int e;
  long double m = std::frexp(r, &e);  // r = m·2^e; the f16 exponent field is (e - 1) + 15
  uint16_t mant = uint16_t((m * 2 - 1) * 1024);
  return sign | uint16_t((e + 14) << 10) | mant;
}

// f32 -> bf16 the same way: 8 significant bits, the exponent range of f32.
uint16_t ref_f32_to_bf16(float x) {
  if (std::isnan(x)) return 0;  // callers check NaN separately
  uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  long double a = std::fabs((long double)x);
  if (std::isinf(x)) return sign | 0x7f80;
  long double quantum;
  if (a < std::ldexp(1.0L, -126)) {
    quantum = std::ldexp(1.0L, -133);
  } else {
    int e;
    std::frexp(a, &e);
    quantum = std::ldexp(1.0L, e - 8);
  }
  long double r = round_to_quantum(a, quantum);
  if (r >= std::ldexp(1.0L, 128)) return sign | 0x7f80;
  return uint16_t(bits_of(float(r)) >> 16) | sign;  // r is a bf16 value, so exact as a float
}

TEST(DType, NamesSizesAndParsing) {
  struct Case {
    DType dtype;
    const char* name;
    size_t size;
    bool is_float;
  };
  const Case cases[] = {{DType::F32, "F32", 4, true},   {DType::F64, "F64", 8, true},  {DType::BF16, "BF16", 2, true},
                        {DType::F16, "F16", 2, true},   {DType::I32, "I32", 4, false}, {DType::I64, "I64", 8, false}};
  for (const Case& c : cases) {
    EXPECT_EQ(dtype_name(c.dtype), c.name);
    EXPECT_EQ(dtype_size(c.dtype), c.size) << c.name;
    EXPECT_EQ(dtype_is_float(c.dtype), c.is_float) << c.name;
    DType parsed = DType::F32;
    ASSERT_TRUE(dtype_from_name(c.name, &parsed)) << c.name;
    EXPECT_EQ(parsed, c.dtype);
  }
  DType untouched = DType::I64;
  for (const char* bad : {"", "f32", "F8_E4M3", "BOOL", "U8", "F32 ", "FLOAT"}) {
    EXPECT_FALSE(dtype_from_name(bad, &untouched)) << bad;
    EXPECT_EQ(untouched, DType::I64);
  }
}

TEST(DType, Bf16RoundTripEveryBitPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = bf16_to_f32(uint16_t(h));
    EXPECT_EQ(bits_of(f), h << 16);  // bf16 is the top half of an f32
    uint16_t back = f32_to_bf16(f);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(back))) << std::hex << h;
      EXPECT_EQ(back & 0x8000, h & 0x8000) << std::hex << h;
    } else {
      EXPECT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(DType, F16RoundTripEveryBitPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32(uint16_t(h));
    long double expected = ref_f16_value(uint16_t(h));
    uint16_t back = f32_to_f16(f);
    if (std::isnan(expected)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(std::isnan(f16_to_f32(back))) << std::hex << h;
      EXPECT_EQ(back & 0x8000, h & 0x8000) << std::hex << h;
    } else {
      ASSERT_EQ((long double)f, expected) << std::hex << h;
      EXPECT_EQ(std::signbit(f), bool(h & 0x8000)) << std::hex << h;
      EXPECT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(DType, NaNStaysNaNAndQuiet) {
  // Signalling NaNs whose payload sits only in the low bits: truncation alone would turn them into infinity.
  for (uint32_t b : {0x7f800001u, 0xff800001u, 0x7fc00000u, 0x7fffffffu, 0x7f80ffffu, 0x7f810000u}) {
    float nan = float_of(b);
    uint16_t h = f32_to_f16(nan);
    EXPECT_EQ(h & 0x7c00, 0x7c00) << std::hex << b;
    EXPECT_NE(h & 0x03ff, 0) << std::hex << b;
    EXPECT_NE(h & 0x0200, 0) << "f16 NaN is quiet, " << std::hex << b;
    uint16_t g = f32_to_bf16(nan);
    EXPECT_TRUE(std::isnan(bf16_to_f32(g))) << std::hex << b;
    EXPECT_NE(g & 0x0040, 0) << "bf16 NaN is quiet, " << std::hex << b;
    EXPECT_EQ(g & 0x8000, (b >> 16) & 0x8000);
    EXPECT_EQ(h & 0x8000, (b >> 16) & 0x8000);
  }
}

TEST(DType, Bf16TiesRoundToEven) {
  // bf16 near 1 has spacing 2^-7: 1 + 2^-8 sits halfway between 1 (even) and 1 + 2^-7 (odd).
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);  // halfway between 0x3f81 and 0x3f82: even wins
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f + 0x1p-23f), 0x3f81);  // just above halfway
  EXPECT_EQ(f32_to_bf16(-(1.0f + 0x1p-8f)), 0xbf80);
  EXPECT_EQ(f32_to_bf16(-(1.0f + 3 * 0x1p-8f)), 0xbf82);
  // A carry through the mantissa into the exponent.
  EXPECT_EQ(f32_to_bf16(float_of(0x3fffffffu)), 0x4000);
}

TEST(DType, Bf16OverflowAndSubnormals) {
  EXPECT_EQ(f32_to_bf16(FLT_MAX), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-FLT_MAX), 0xff80);
  EXPECT_EQ(f32_to_bf16(float_of(0x7f7f7fffu)), 0x7f7f);  // just below halfway to 2^128: largest finite bf16
  EXPECT_EQ(f32_to_bf16(float_of(0x7f7f8000u)), 0x7f80);  // halfway, odd mantissa: rounds up to infinity
  EXPECT_EQ(f32_to_bf16(INFINITY), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-INFINITY), 0xff80);
  EXPECT_EQ(f32_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(float_of(0x00000001u)), 0x0000);  // smallest f32 subnormal rounds to zero
  EXPECT_EQ(f32_to_bf16(float_of(0x00008000u)), 0x0000);  // halfway to the smallest bf16 subnormal: even is 0
  EXPECT_EQ(f32_to_bf16(float_of(0x00008001u)), 0x0001);
  EXPECT_EQ(f32_to_bf16(float_of(0x007fffffu)), 0x0080);  // the largest f32 subnormal rounds to the smallest normal
}

TEST(DType, F16TiesRoundToEven) {
  // f16 near 1 has spacing 2^-10.
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(1.0f + 0x1p-11f), 0x3c00);
  EXPECT_EQ(f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
  EXPECT_EQ(f32_to_f16(1.0f + 0x1p-11f + 0x1p-23f), 0x3c01);
  EXPECT_EQ(f32_to_f16(2049.0f), 0x6800);  // 2048 and 2050 are neighbours; 2049 is a tie: 2048 (even)
  EXPECT_EQ(f32_to_f16(2051.0f), 0x6802);  // 2052
  EXPECT_EQ(f32_to_f16(-2049.0f), 0xe800);
  EXPECT_EQ(f32_to_f16(0.1f), 0x2e66);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
}

TEST(DType, F16OverflowToInfinity) {
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // tie between 65504 (odd) and 65536: goes to infinity
  EXPECT_EQ(f32_to_f16(-65520.0f), 0xfc00);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(f32_to_f16(FLT_MAX), 0x7c00);
  EXPECT_EQ(f32_to_f16(INFINITY), 0x7c00);
  EXPECT_EQ(f32_to_f16(-INFINITY), 0xfc00);
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7c00)));
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
}

TEST(DType, F16Subnormals) {
  EXPECT_EQ(f16_to_f32(0x0001), 0x1p-24f);
  EXPECT_EQ(f16_to_f32(0x8001), -0x1p-24f);
  EXPECT_EQ(f16_to_f32(0x03ff), 1023 * 0x1p-24f);
  EXPECT_EQ(f16_to_f32(0x0400), 0x1p-14f);
  EXPECT_EQ(f32_to_f16(0x1p-24f), 0x0001);
  EXPECT_EQ(f32_to_f16(0x1p-25f), 0x0000);          // halfway to the smallest subnormal: even (zero)
  EXPECT_EQ(f32_to_f16(0x1p-25f * 1.0001f), 0x0001);  // just above halfway
  EXPECT_EQ(f32_to_f16(3 * 0x1p-25f), 0x0002);      // 1.5 quanta: tie, even is 2
  EXPECT_EQ(f32_to_f16(5 * 0x1p-25f), 0x0002);      // 2.5 quanta: tie, even is 2
  EXPECT_EQ(f32_to_f16(1023 * 0x1p-24f), 0x03ff);
  EXPECT_EQ(f32_to_f16(1023.5f * 0x1p-24f), 0x0400);  // rounds up into the smallest normal
  EXPECT_EQ(f32_to_f16(std::nextafter(0x1p-14f, 0.0f)), 0x0400);
  EXPECT_EQ(f32_to_f16(-0x1p-24f), 0x8001);
  EXPECT_EQ(f32_to_f16(0x1p-30f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0x1p-30f), 0x8000);  // underflow keeps the sign
  EXPECT_EQ(f32_to_f16(float_of(1)), 0x0000);  // f32 subnormal
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
}

// Random bit patterns (every exponent) plus a strided sweep of all 2^32 floats, against the long double reference.
TEST(DType, F32ToF16MatchesReference) {
  std::mt19937 rng(1234);
  std::vector<float> inputs;
  for (int i = 0; i < 400000; ++i) inputs.push_back(float_of(rng()));
  std::uniform_real_distribution<float> near_range(-70000.0f, 70000.0f), small(-0x1p-13f, 0x1p-13f);
  for (int i = 0; i < 200000; ++i) inputs.push_back(near_range(rng));
  for (int i = 0; i < 200000; ++i) inputs.push_back(small(rng));
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += 4099) inputs.push_back(float_of(uint32_t(b)));
  size_t failures = 0;
  for (float x : inputs) {
    uint16_t got = f32_to_f16(x), want = ref_f32_to_f16(x);
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(got))) << std::hex << bits_of(x);
    } else if (got != want && ++failures <= 10) {
      ADD_FAILURE() << "f32_to_f16(" << x << " = 0x" << std::hex << bits_of(x) << ") = 0x" << got << ", want 0x"
                    << want;
    }
  }
  EXPECT_EQ(failures, 0u);
}

TEST(DType, F32ToBf16MatchesReference) {
  std::mt19937 rng(99);
  std::vector<float> inputs;
  for (int i = 0; i < 400000; ++i) inputs.push_back(float_of(rng()));
  for (uint64_t b = 0; b < (uint64_t(1) << 32); b += 4099) inputs.push_back(float_of(uint32_t(b)));
  size_t failures = 0;
  for (float x : inputs) {
    if (std::isnan(x)) continue;  // NaN handled in NaNStaysNaNAndQuiet
    uint16_t got = f32_to_bf16(x), want = ref_f32_to_bf16(x);
    if (got != want && ++failures <= 10)
      ADD_FAILURE() << "f32_to_bf16(0x" << std::hex << bits_of(x) << ") = 0x" << got << ", want 0x" << want;
  }
  EXPECT_EQ(failures, 0u);
}

// convert_floats between every pair of float dtypes, on values every format holds exactly.
TEST(DType, ConvertFloatsEveryPair) {
  const std::vector<double> values = {0.0, -0.0, 1.0, -2.5, 0.15625, 256.0, -1024.0, 3.0, 0x1p-14, 65504.0};
  const DType floats[] = {DType::F32, DType::F64, DType::BF16, DType::F16};
  auto encode = [&](DType t) {
    std::vector<unsigned char> out(values.size() * dtype_size(t));
    for (size_t i = 0; i < values.size(); ++i) {
      double v = values[i];
      unsigned char* p = out.data() + i * dtype_size(t);
      if (t == DType::F64) std::memcpy(p, &v, 8);
      if (t == DType::F32) {
        float f = float(v);
        std::memcpy(p, &f, 4);
      }
      if (t == DType::BF16) {
        uint16_t h = uint16_t(bits_of(float(v)) >> 16);  // exact for these values
        std::memcpy(p, &h, 2);
      }
      if (t == DType::F16) {
        uint16_t h = ref_f32_to_f16(float(v));
        std::memcpy(p, &h, 2);
      }
    }
    return out;
  };
  for (DType src : floats) {
    for (DType dst : floats) {
      std::vector<unsigned char> in = encode(src), want = encode(dst);
      std::vector<unsigned char> got(want.size(), 0xcd);
      // 65504 (the last value) needs 11 significant bits, so it is not a bf16 value: left out of bf16 pairs.
      size_t n = values.size() - ((src == DType::BF16 || dst == DType::BF16) ? 1 : 0);
      convert_floats(in.data(), src, got.data(), dst, n);
      for (size_t i = 0; i < n * dtype_size(dst); ++i)
        ASSERT_EQ(got[i], want[i]) << dtype_name(src) << " -> " << dtype_name(dst) << " byte " << i;
      for (size_t i = n * dtype_size(dst); i < got.size(); ++i) ASSERT_EQ(got[i], 0xcd) << "wrote past n";
    }
  }
}

TEST(DType, ConvertFloatsBf16FastPathMatchesScalar) {
  std::vector<uint16_t> src(65536);
  for (uint32_t i = 0; i < 65536; ++i) src[i] = uint16_t(i);
  std::vector<float> dst(65536);
  convert_floats(src.data(), DType::BF16, dst.data(), DType::F32, src.size());
  for (uint32_t i = 0; i < 65536; ++i) ASSERT_EQ(bits_of(dst[i]), bits_of(bf16_to_f32(uint16_t(i)))) << i;
}

TEST(DType, ConvertFloatsF32ToHalfRoundsLikeScalar) {
  std::mt19937 rng(7);
  std::vector<float> src(10000);
  for (float& x : src) x = float_of(rng());
  std::vector<uint16_t> h(src.size()), b(src.size());
  convert_floats(src.data(), DType::F32, h.data(), DType::F16, src.size());
  convert_floats(src.data(), DType::F32, b.data(), DType::BF16, src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (std::isnan(src[i])) continue;
    ASSERT_EQ(h[i], f32_to_f16(src[i])) << i;
    ASSERT_EQ(b[i], f32_to_bf16(src[i])) << i;
  }
}

// f64 -> bf16/f16 must round once, from the double: going through f32 first rounds twice and can land on the
// wrong side of a tie.
TEST(DType, ConvertFloatsF64ToHalfRoundsOnce) {
  struct Case {
    double value;
    DType dst;
    uint16_t want;
  };
  const Case cases[] = {
      {1.0 + 0x1p-8 + 0x1p-30, DType::BF16, 0x3f81},    // just above the tie between 1 and 1 + 2^-7
      {-(1.0 + 0x1p-8 + 0x1p-30), DType::BF16, 0xbf81},
      {1.0 + 0x1p-8 - 0x1p-30, DType::BF16, 0x3f80},    // just below the tie
      {1.0 + 3 * 0x1p-8 - 0x1p-30, DType::BF16, 0x3f81},
      {1.0 + 0x1p-8, DType::BF16, 0x3f80},              // an exact tie still goes to even
      {1.0 + 0x1p-11 + 0x1p-40, DType::F16, 0x3c01},     // f16 spacing near 1 is 2^-10
      {1.0 + 0x1p-11 - 0x1p-40, DType::F16, 0x3c00},
      {1.0 + 0x1p-11, DType::F16, 0x3c00},
      {0x1p-25 + 0x1p-60, DType::F16, 0x0001},           // above half the smallest subnormal
      {65520.0 - 0x1p-20, DType::F16, 0x7bff},           // below the overflow threshold
      {1e300, DType::F16, 0x7c00},
      {1e300, DType::BF16, 0x7f80},
      {-1e300, DType::BF16, 0xff80},
      {1e-300, DType::BF16, 0x0000},
      {-1e-300, DType::F16, 0x8000},
      {double(FLT_MAX) * 1.0000001, DType::BF16, 0x7f80},
  };
  for (const Case& c : cases) {
    uint16_t got = 0;
    convert_floats(&c.value, DType::F64, &got, c.dst, 1);
    EXPECT_EQ(got, c.want) << std::hexfloat << c.value << " -> " << dtype_name(c.dst);
  }
  double nan = std::numeric_limits<double>::quiet_NaN(), inf = HUGE_VAL;
  uint16_t h = 0;
  convert_floats(&nan, DType::F64, &h, DType::F16, 1);
  EXPECT_TRUE(std::isnan(f16_to_f32(h)));
  convert_floats(&nan, DType::F64, &h, DType::BF16, 1);
  EXPECT_TRUE(std::isnan(bf16_to_f32(h)));
  convert_floats(&inf, DType::F64, &h, DType::BF16, 1);
  EXPECT_EQ(h, 0x7f80);
  convert_floats(&inf, DType::F64, &h, DType::F16, 1);
  EXPECT_EQ(h, 0x7c00);
}

// Every f64 that is exactly an f16 or bf16 value converts to that value, and random doubles agree with the
// reference applied to the double (rounding once).
TEST(DType, ConvertFloatsF64ToHalfMatchesReference) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> mant(1.0, 2.0);
  std::uniform_int_distribution<int> exp(-30, 20);
  size_t failures = 0;
  for (int i = 0; i < 200000; ++i) {
    double v = std::ldexp(mant(rng), exp(rng)) * ((i & 1) ? -1 : 1);
    // Reference: round the double directly (long double holds it exactly), using float only for the encoding.
    long double a = std::fabs((long double)v);
    uint16_t sign = v < 0 ? 0x8000 : 0;
    uint16_t want;
    if (a >= 65520.0L) {
      want = sign | 0x7c00;
    } else {
      long double quantum;
      if (a < std::ldexp(1.0L, -14)) {
        quantum = std::ldexp(1.0L, -24);
      } else {
        int e;
        std::frexp(a, &e);
        quantum = std::ldexp(1.0L, e - 11);
      }
      long double r = round_to_quantum(a, quantum);
      want = ref_f32_to_f16(float(sign ? -r : r));  // r is an f16 value: exact in f32
    }
    uint16_t got = 0;
    convert_floats(&v, DType::F64, &got, DType::F16, 1);
    if (got != want && ++failures <= 10)
      ADD_FAILURE() << std::hexfloat << v << " -> f16 0x" << std::hex << got << ", want 0x" << want;
  }
  EXPECT_EQ(failures, 0u);
}

}  // namespace
}  // namespace mamba3
