#pragma once
// The message of the mamba3::Error a callable throws, or "(no error)" when it returns normally (tests compare with
// that to check that something is accepted). Any other exception propagates and fails the test.
#include <string>
#include <utility>

#include "core/error.h"

namespace mamba3::test {

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    std::forward<Fn>(fn)();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace mamba3::test
