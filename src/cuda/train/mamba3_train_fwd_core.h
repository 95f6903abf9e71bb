#pragma once
// The batched path's forward core as one kernel per (sequence, head, chunk) on bf16 tensor cores (mma.sync): the
// products S = q·kᵀ, Z = q·H_cᵀ, WV = W·v and the mask W = S ⊙ coef between them, with S and W kept in registers
// (the backward core recomputes them): the chunk's q, k, v and H_c are read once and only Z and WV are written.
#include <cuda_runtime.h>

#include "cuda/train/mamba3_train_kernels.h"

namespace mamba3::cuda::train_detail {

// Whether the forward core handles these dimensions (the backward core's: bf16, 64 rows, N 32/64/128, P 32/64).
bool forward_core_supported(const BatchedParams& p);

// Whether the forward core also runs the output stage (o16; then launch_batched_output is not needed): SISO, with
// p.o16 and no f32 p.o to write.
bool forward_core_writes_output(const BatchedParams& p);

// Reads p.Q, p.K, p.V (bf16), the chunk scalars p.Lam, p.scale, p.gam, p.eL and Hc16 (bf16, (B·H·nc, P, N)); writes
// p.Z and p.WV (f32, per chunk row) and, where forward_core_writes_output, p.o16 (y = e^Λ·Z + D·v + WV, the output
// norm, the gate). p.S and p.W are not written.
void launch_batched_forward_core(cudaStream_t s, const BatchedParams& p, const void* Hc16);

}  // namespace mamba3::cuda::train_detail
