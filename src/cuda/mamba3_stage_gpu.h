#pragma once
// The staged Mamba-3 recurrent path (internal to mamba3_gpu.cu's dispatcher; the public entry is
// mamba3_recurrent_gpu with Mamba3GpuPath::Staged). A decode step (L = 1) is one launch of the head decode kernel
// (mamba3_decode_gpu.h), which stages its own head; shapes out of its reach, and every prefill, take three launches
// per segment of tokens:
//   1. angle scan: one thread per (sequence, head, angle), sequential over the segment's tokens → wrapped φ;
//   2. staging: one warp per (sequence, token, rank, group, 4 heads), fully parallel → k, q (normed, biased,
//      rotated), α, β, γ; the segment's last token also moves the cached k to slot 0 and stores the new k;
//   3. state: a streaming kernel per (sequence, head) (prefill: state in registers, the next tokens' k, q, x, z,
//      scalars prefetched by cp.async into a ring) or per (sequence, head, 16 channels) (decode: state by cp.async);
//      with chunked_prefill, a prefill (L > 1) runs the chunked tensor-core kernel instead (mamba3_chunk_gpu.h;
//      Mamba3GpuPath::Chunked, bf16 layers), falling back to the stream kernel for shapes out of its reach.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/mamba3_gpu.h"

namespace mamba3::cuda {

#ifdef __CUDACC__
// Whether a call of L tokens skips view row b (Mamba3GpuState::active; decode only). Callers pass the b of their
// block (or warp, or thread) so that all its threads read the same mask word — one load per warp, served as a
// broadcast — and return together before their first barrier.
__device__ __forceinline__ bool mamba3_row_skipped(const Mamba3GpuState& st, int L, int b) {
  return L == 1 && st.active != nullptr && __ldg(st.active + b) == 0;
}
#endif

void mamba3_staged_gpu(cudaStream_t s, const Mamba3Config& c, const Mamba3GpuParams& p, int64_t batch, int64_t L,
                       const float* zx, Mamba3GpuState state, void* o, Precision o_precision,
                       const Mamba3GpuStage& prefill_stage, bool chunked_prefill = false);

}  // namespace mamba3::cuda
