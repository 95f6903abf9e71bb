#pragma once
// The host side of the per-chunk readiness counters (chunk_ready.cuh): one buffer per producer, zeroed whenever the
// shape it counts for changes, and the producer's launches since, from which the reader's target follows (the
// counters only grow, so nothing is reset between launches).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_check.h"
#include "cuda/device_buffer.h"

namespace mamba3::cuda::train_detail {

class ChunkReadyCounters {
 public:
  // Before a producer's launch that raises each of `chunks` counters `per_launch` times: the counters (zeroed on `s`
  // first where the shape changed, or before the count could wrap).
  unsigned* next_launch(cudaStream_t s, int64_t chunks, int per_launch) {
    if (chunks_ != chunks || per_launch_ != per_launch || launches_ > (1u << 30)) {
      buf_.reserve(size_t(chunks > 0 ? chunks : 1) * sizeof(unsigned));
      MAMBA3_CUDA_CHECK(cudaMemsetAsync(buf_.raw(), 0, size_t(chunks) * sizeof(unsigned), s));
      chunks_ = chunks, per_launch_ = per_launch, launches_ = 0;
    }
    ++launches_;
    return buf_.as<unsigned>();
  }
  // The count at which every chunk of the last launch is there.
  unsigned target() const { return launches_ * unsigned(per_launch_); }
  const unsigned* counters() const { return buf_.as<unsigned>(); }

 private:
  DeviceBuffer buf_;
  int64_t chunks_ = 0;
  int per_launch_ = 0;
  unsigned launches_ = 0;
};

}  // namespace mamba3::cuda::train_detail
