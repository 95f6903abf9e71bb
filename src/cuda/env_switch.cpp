#include "cuda/env_switch.h"

#include <cstdlib>

#include <fmt/format.h>

#include "core/error.h"

namespace mamba3::cuda {

std::string env_choice(const char* name, std::initializer_list<std::string_view> allowed) {
  const char* v = std::getenv(name);
  const std::string s = v ? v : "";
  if (s.empty()) return s;
  std::string expected;
  for (std::string_view a : allowed) {
    if (s == a) return s;
    expected += (expected.empty() ? "" : ", ") + std::string(a);
  }
  throw Error(fmt::format("{}='{}': expected one of {}", name, s, expected));
}

int64_t env_integer(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (*end != '\0' || n < lo || n > hi)
    throw Error(fmt::format("{}='{}': expected an integer in [{}, {}]", name, v, lo, hi));
  return int64_t(n);
}

}  // namespace mamba3::cuda
