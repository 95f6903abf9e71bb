#pragma once
// parallel_for: the one way CPU kernels spread work over threads (OpenMP underneath).
#include <cstdint>

#include <omp.h>

namespace mamba3 {

// Calls fn(i) for i in [0, n), spread over the OpenMP threads. Exceptions must not escape fn.
template <typename Fn>
void parallel_for(int64_t n, Fn&& fn) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

inline int max_threads() { return omp_get_max_threads(); }
inline int thread_index() { return omp_get_thread_num(); }
inline void set_threads(int n) { omp_set_num_threads(n); }

}  // namespace mamba3
