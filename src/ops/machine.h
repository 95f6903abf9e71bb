#pragma once
// Timing helpers shared by the benchmarks and `mamba3 bench`: medians of repeated runs and the machine's measured
// ceilings (memory bandwidth, sgemm rate) that every result is compared against.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

namespace mamba3 {

// Median wall time in seconds of `reps` runs of fn (after one warm-up run).
inline double median_seconds(int reps, const std::function<void()>& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Read bandwidth in bytes/s: parallel sum over a buffer far larger than the caches.
double measure_read_bandwidth();
// sgemm rate in FLOP/s for y (M, N) = x (M, K)·Wᵀ, through the same linear() the engine uses.
double measure_linear_flops(int64_t M, int64_t K, int64_t N);

}  // namespace mamba3
