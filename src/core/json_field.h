#pragma once
// Reads one optional field of a JSON config object into a typed value; a present field of the wrong type is an
// error naming the context (the file) and the field. Shared by every config reader.
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace mamba3 {

template <typename T, typename Json>
void read_json_field(const Json& j, const char* key, T& out, const std::string& context) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  if constexpr (std::is_same_v<T, bool>) {
    MAMBA3_CHECK(it->is_boolean(), "{}: field '{}' must be true or false, got {}", context, key, it->dump());
  } else if constexpr (std::is_integral_v<T>) {
    MAMBA3_CHECK(it->is_number_integer(), "{}: field '{}' must be an integer, got {}", context, key, it->dump());
  } else {
    MAMBA3_CHECK(it->is_number(), "{}: field '{}' must be a number, got {}", context, key, it->dump());
  }
  out = it->template get<T>();
}

}  // namespace mamba3
