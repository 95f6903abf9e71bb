#pragma once
// The chunked Mamba-3 prefill state step on tensor cores (spec §5.3), the third launch of the staged path's
// segment when the layer runs Mamba3GpuPath::Chunked in bf16 (mamba3_staged_gpu with chunked_prefill). It reads what
// the angle scan and the staging kernel wrote for the segment (rotated k with slot 0 = k_{−1}, q, α/β/γ/A·Δ per
// (b, t, h)) plus x and z from the in_proj output, and writes the same results as mamba3_stream_kernel: the gated
// output o (output norm, MIMO contraction) and the final ssm and v states (k and φ were written by the earlier
// launches). The products run as bf16 mma.sync m16n8k16 with f32 accumulation; the carried P×N state stays f32 in
// shared memory (rounded to bf16 only as an mma operand).
//
// Shapes: any N ≤ 256 and P ≤ 128 (padded to multiples of 16 with zeros in shared memory), R ≤ 4, groups, the
// ablation switches (they only change the staged inputs). One block per (sequence, head, channel slice): P is cut
// into 2 slices when P > 64 and the layer has no output norm (the per-head norm needs the whole head in one block).
// Out of reach: a layout larger than the device's shared memory per block (P > 64 with the output norm and
// N > ~176): mamba3_chunk_gpu returns false and the caller runs the stream kernel for the segment.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/mamba3_gpu.h"

namespace mamba3::cuda {

// One segment of the staged prefill: tokens [t0, t0 + Lc) of each sequence, whose stage (sg) holds Lc tokens.
struct Mamba3ChunkArgs : Mamba3KernelShape {
  int t0, Lc;  // this segment
  Mamba3GpuParams p;
  const float* zx;
  Mamba3GpuState st;
  Mamba3GpuStage sg;
  void* o;
};

// Bytes of shared memory the chunked kernel needs for this shape (the whole head per block when `outnorm`).
size_t mamba3_chunk_gpu_shared_bytes(int N, int P, int R, bool outnorm);

// Launches the chunked state kernel for one segment of `batch` sequences; false (nothing launched) when the shape is
// out of reach (shared memory), so that the caller runs the stream kernel instead.
bool mamba3_chunk_gpu(cudaStream_t s, const Mamba3ChunkArgs& a, int64_t batch);

}  // namespace mamba3::cuda
