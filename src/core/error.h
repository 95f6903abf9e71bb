#pragma once
// The one exception type of the library. Messages carry their context (file, tensor, field, expected vs actual).
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace mamba3 {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Throws mamba3::Error with a fmt-formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace mamba3

// Checks a condition that depends on outside input or caller arguments (never compiled out).
#define MAMBA3_CHECK(cond, ...)      \
  do {                               \
    if (!(cond)) ::mamba3::fail(__VA_ARGS__); \
  } while (0)
