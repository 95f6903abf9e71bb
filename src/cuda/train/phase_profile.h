#pragma once
// MAMBA3_TRAIN_PROFILE: device time per part of one call (events between the parts), printed to stderr — where a
// training step's time goes, without a profiler (ncu's replay of a whole step takes minutes). Level 1 (any value):
// the trainer's parts per step; level 2 ("2"): also the Mamba-3 mixer's chunk-stage parts per call; "gemm" is
// the per-product profile instead (train_gemm_profile.h).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "cuda/cuda_check.h"

namespace mamba3::cuda {

class PhaseProfile {
 public:
  // title: the report's first word; level: the MAMBA3_TRAIN_PROFILE level that turns this profile on.
  PhaseProfile(cudaStream_t s, const char* title = "train profile", int level = 1) : stream_(s), title_(title) {
    const char* v = std::getenv("MAMBA3_TRAIN_PROFILE");
    on_ = v != nullptr && std::strcmp(v, "gemm") != 0 && (level <= 1 || std::strcmp(v, "2") == 0);  // (gemm: its own)
    if (on_) mark(nullptr);
  }
  ~PhaseProfile() {
    for (auto& [e, name] : events_) cudaEventDestroy(e);
  }
  PhaseProfile(const PhaseProfile&) = delete;
  PhaseProfile& operator=(const PhaseProfile&) = delete;
  // The work queued since the previous mark belongs to `part`.
  void mark(const char* part) {
    if (!on_) return;
    cudaEvent_t e;
    MAMBA3_CUDA_CHECK(cudaEventCreate(&e));
    MAMBA3_CUDA_CHECK(cudaEventRecord(e, stream_));
    events_.emplace_back(e, part);
  }
  void report() {
    if (!on_ || events_.size() < 2) return;
    MAMBA3_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::map<std::string, double> ms;
    double total = 0;
    for (size_t i = 1; i < events_.size(); ++i) {
      float t = 0;
      MAMBA3_CUDA_CHECK(cudaEventElapsedTime(&t, events_[i - 1].first, events_[i].first));
      ms[events_[i].second] += t, total += t;
    }
    std::string line = fmt::format("{}: {:.2f} ms", title_, total);
    for (const auto& [name, t] : ms) line += fmt::format("  {} {:.3f}", name, t);
    std::fprintf(stderr, "%s\n", line.c_str());
  }

 private:
  cudaStream_t stream_;
  const char* title_;
  bool on_ = false;
  std::vector<std::pair<cudaEvent_t, const char*>> events_;
};

}  // namespace mamba3::cuda
