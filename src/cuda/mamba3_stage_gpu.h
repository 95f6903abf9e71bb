#pragma once
// The staged Mamba-3 recurrent path (internal to mamba3_gpu.cu's dispatcher; the public entry is
// mamba3_recurrent_gpu with Mamba3GpuPath::Staged). Three launches per segment of tokens:
//   1. angle scan: one thread per (sequence, head, angle), sequential over the segment's tokens → wrapped φ;
//   2. staging: one warp per (sequence, token, rank, group, 4 heads), fully parallel → k, q (normed, biased,
//      rotated), α, β, γ; the segment's last token also moves the cached k to slot 0 and stores the new k;
//   3. state: a streaming kernel per (sequence, head) (prefill: state in registers, the next tokens' k, q, x, z,
//      scalars prefetched by cp.async into a ring) or per (sequence, head, 16 channels) (decode: state by cp.async).
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/mamba3_gpu.h"

namespace mamba3::cuda {

void mamba3_staged_gpu(cudaStream_t s, const Mamba3Config& c, const Mamba3GpuParams& p, int64_t batch, int64_t L,
                       const float* zx, Mamba3GpuState state, void* o, Precision o_precision,
                       const Mamba3GpuStage& prefill_stage);

}  // namespace mamba3::cuda
