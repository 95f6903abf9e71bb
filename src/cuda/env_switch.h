#pragma once
// Process-wide kernel switches read from the environment (docs: README "On an NVIDIA GPU"; each caller reads its
// variable once and keeps the answer in a static). A value outside the allowed set is an Error naming the variable.
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

namespace mamba3::cuda {

// The variable's value, one of `allowed`; "" when unset or empty.
std::string env_choice(const char* name, std::initializer_list<std::string_view> allowed);

// The variable as an integer in [lo, hi]; `fallback` when unset or empty.
int64_t env_integer(const char* name, int64_t fallback, int64_t lo, int64_t hi);

}  // namespace mamba3::cuda
