#pragma once
// The buffers of the chunk-state chain inside a core (chunk_handoff.cuh), as the host passes them to a launch.
#include <cstdint>

namespace mamba3::cuda::train_detail {

// words: [0] the ticket counter, [1 + bh] the chunks of sequence-head bh handed on so far in the launch; all zero
// between launches. states: (B·H, P·N) f32, the running state of each sequence-head between two of its blocks.
struct ChainHandoff {
  uint32_t* words = nullptr;
  float* states = nullptr;
};

}  // namespace mamba3::cuda::train_detail
