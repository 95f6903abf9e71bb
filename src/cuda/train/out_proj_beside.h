#pragma once
// The Mamba-3 mixer's out_proj launched beside the SISO forward walk (train/out_proj_beside.cu;
// Mamba3TrainGpu::set_out_proj_beside). The walk, one wave of B·H blocks, leaves most of the SMs that hold one of its
// blocks idle while the SMs with two set its length; this product runs in that room instead of after the walk. Its
// 64-row tiles are one chunk of one sequence each, taken chunk by chunk in the walk's order, and each waits for the
// walk's counter of its (sequence, chunk) — raised by every head's walk once that chunk's o16 rows are stored — before
// it copies them (train/chunk_ready.cuh). The walk triggers it right after its own wait (BatchedParams::walk_ready).
#include <cuda_runtime.h>

#include <cstdint>

namespace mamba3::cuda::train_detail {

struct OutProjBesideParams {
  const uint16_t* o16;  // (B·L, K) bf16: the walk's o16 rows
  const uint16_t* w16;  // (D, K) bf16: out_proj's weight (its bf16 mirror)
  uint16_t* out16;      // (B·L, D) bf16, rounded once from the f32 sums — or, null,
  float* out;           // (B·L, D) f32
  int64_t B, L;
  int K, D;
  int nc;                 // chunks of 64 tokens per sequence (L / 64)
  const unsigned* ready;  // (B, nc) counters: every head's walk raises (b, c) once chunk c's o16 rows are stored
  unsigned target;        // the count at which a chunk's rows are all there (launches × heads)
};

// Whole chunks (L % 64 == 0), K % 64 == 0, D % 128 == 0, the matrices 16-byte aligned.
bool out_proj_beside_supported(int64_t L, int64_t K, int64_t D, const void* o16, const void* w16, const void* out);
// D = o16·w16ᵀ with f32 accumulation on bf16 tensor cores (each tile's k-steps in order), stored in bf16 (rounded
// once) or f32. Launched under PDL beside the kernel before it, which must have triggered its dependents; waits for
// that kernel before it exits. ready may hold the target already (then nothing waits: tests, or after a plain launch).
void launch_out_proj_beside(cudaStream_t s, const OutProjBesideParams& p);

}  // namespace mamba3::cuda::train_detail
