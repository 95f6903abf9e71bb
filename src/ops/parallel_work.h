#pragma once
// parallel_for for loops whose total work may be tiny: below a threshold the loop runs on the calling thread.
// On a loaded 2-core machine every parallel region costs up to a scheduler slice when a team member is descheduled,
// so small training shapes (many short loops per step) run much faster without the fork/join.
#include <cstdint>

#include "core/parallel.h"

namespace mamba3 {

// Calls fn(i) for i in [0, n); `work` is a rough cost of one call (e.g. elements touched).
template <typename Fn>
void parallel_for_work(int64_t n, int64_t work, Fn&& fn) {
  constexpr int64_t kSerialBelow = int64_t(1) << 16;
  if (n <= 1 || n * work < kSerialBelow || max_threads() == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  } else {
    parallel_for(n, fn);
  }
}

}  // namespace mamba3
