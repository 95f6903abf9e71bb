#pragma once
// The batched path's forward core as one kernel per (sequence, head, chunk) on bf16 tensor cores (mma.sync): the
// products S = q·kᵀ, Z = q·H_cᵀ, WV = W·v and the mask W = S ⊙ coef between them, with S and W kept in registers
// (the backward core recomputes them): the chunk's q, k, v and H_c are read once and only Z and WV are written.
#include <cuda_runtime.h>

#include "cuda/train/chunk_handoff_types.h"
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

// The same with the forward state chain inside (replacing launch_state_chain(s, p, p.Vw, p.K, false, Hc16) before
// it): each block forms ΔH = (w ⊙ v)ᵀ·k from p.Vw and p.K, takes the state entering its chunk from the block of the
// previous chunk (through h: chunk_handoff.cuh), writes it to Hc16 and hands on decay·H_c + ΔH (p.decay). The chain
// kernel's bits. h.words (1 + B·H words) must be zero before the first launch; every launch leaves them so.
// h.states: (B·H, P·N) f32.
void launch_batched_forward_core_chain(cudaStream_t s, const BatchedParams& p, void* Hc16, const ChainHandoff& h);

}  // namespace mamba3::cuda::train_detail
