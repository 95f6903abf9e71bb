#pragma once
// The batched path's backward core as one kernel per (sequence, head, chunk) on bf16 tensor cores (mma.sync):
// what the strided-batched products dW = dy·vᵀ, dV = Wᵀ·dy, dQ = dS·k + (e^Λ ⊙ dy)·H_c, dK = dSᵀ·q, G = (e^Λ ⊙ dy)ᵀ·q
// and the coef kernel between them compute, with S = q·kᵀ, W = S ⊙ coef and dS = dW ⊙ coef recomputed in registers
// instead of read back: the chunk's q, k, v, dy, e^Λ ⊙ dy and H_c are read once into shared memory and only dQ, dK,
// dV, G and the chunk scalars' gradients leave the SM (docs/kernels/mamba3_train_cuda.md "Backward core").
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/train/mamba3_train_kernels.h"

namespace mamba3::cuda::train_detail {

// Whether the fused core handles these dimensions: the bf16 mode, 64 rows per chunk, N ∈ {32, 64, 128} and
// P ∈ {32, 64} (other shapes keep the products).
bool backward_core_supported(const BatchedParams& p);

// Reads p.Q, p.K, p.V, p.dY, p.dYe (bf16), the chunk scalars p.Lam, p.scale, p.gam and Hc16 (bf16, (B·H·nc, P, N):
// the state entering each chunk); writes p.dQ, p.dK, p.dV (f32, per chunk row), G of chunk k at g_slots + k·P·N
// (f32 P × N; g_slots null: G not formed, the reverse state chain's case), dgam and dscale (=) and adds coef's part
// to p.dLam. Deterministic (fixed orders, no atomics). With p.dQ16 (SISO, before the post-scan core), dQ goes there in
// bf16 instead of to p.dQ.
void launch_batched_backward_core(cudaStream_t s, const BatchedParams& p, const void* Hc16, float* g_slots);

// After the reverse scan (SISO; the backward core's shapes): tp = k·dHᵀ and dK += (w ⊙ v)·dH on tensor cores from dHc16
// (bf16, the dH entering each chunk), then the epilogue's state part (launch_batched_epilogue's first kernel) from tp
// in registers: dzx's x columns (and p.dzx16's), dadt, dscale (+=), with ⟨dH, H_c⟩ from Hc16. The rotation backward
// (launch_batched_rotation_backward) follows. With p.dK16, the finished dK goes there in bf16 instead of to p.dK.
bool post_scan_core_supported(const BatchedParams& p);
void launch_batched_post_scan_core(cudaStream_t s, const BatchedParams& p, const void* dHc16, const void* Hc16);

// Both in one kernel (the post-scan core's shapes), after the reverse state chain has written dHc16: what the
// backward core and the post-scan core write, except G, p.dV and dK's intermediate (dV stays in registers, dK's two
// terms in the same accumulators), with q, k, v, dy and H_c read once. The same bits as the two kernels (with p.dQ16
// and p.dK16 too: dQ and dK in bf16 there).
void launch_batched_backward_fused_core(cudaStream_t s, const BatchedParams& p, const void* Hc16, const void* dHc16);
// MIMO (the cores' shapes), after the reverse state chain has written dHc16: the backward core plus dK's second term
// (w ⊙ v)·dH in the same accumulators and tp = k·dHᵀ, which the batched products "tp" and "dK" formed before. With
// p.epilogue_in_core it also runs the epilogue's state part (dzx's x columns, dadt, dscale, the mimo_x partials) and
// only the rotation backward follows; else it writes tp to p.Z and dV (f32 per chunk row) for launch_batched_epilogue.
// To rounding against the products (their sums run in cuBLAS's order) and the epilogue kernel (its sums' orders).
bool backward_state_core_supported(const BatchedParams& p);
void launch_batched_backward_state_core(cudaStream_t s, const BatchedParams& p, const void* Hc16, const void* dHc16);
// With p.dqk_unrotated (where fused_core_unrotate_supported holds), the fused core writes dQ16/dK16 taken back
// through the rotation (Rot(−φ)·dQ and Rot(−φ)·dK: the gradients of each head's biased normalised C and B, un-rotated
// in f32 before their bf16 rounding) and dφ (p.dphi, from p.phi and the q and k tiles), which the rotation backward
// formed before; the rotation backward then only sums over heads (its un-rotated instance). To bf16 rounding against
// the default path (dQ and dK rounded before their un-rotation there).
bool fused_core_unrotate_supported(const BatchedParams& p);
// With p.dqk_head_sum too (where fused_core_head_sum_supported holds: 8 heads per cluster inside a B/C group, the
// 8-warp block), the fused core also sums the un-rotated dQ/dK over each 8 heads of a group — clusters of 8 head
// blocks, the rows split among them — into slot h / 8 of p.dCn/p.dBn ((token, H/8, N)) and writes each head's bias
// partials, then drops its dQ16/dK16 tiles from L2 without write-back: no rotation backward follows, and
// launch_bc_norm_backward must run with H/8 slots. To rounding against the rotation backward's sums (another order).
bool fused_core_head_sum_supported(const BatchedParams& p);
// The fused core's block: 8 warps with its two phases on separate warps (true) or 4 running both (false); the same
// bits. Process-wide; default from MAMBA3_TRAIN_FUSED_CORE_WARPS ("8" or "4", unset: 8).
void set_fused_core_wide(bool on);
// Whether the fused core can run the output stage's backward itself (p.core_output; after launch_output_dye): SISO,
// whole chunks, no output norm, Z and y in bf16, z, dO and dzx in bf16, the 8-warp block.
bool fused_core_output_supported(const BatchedParams& p);
// Its conditions that a forward can check (the backward's buffers aside): where the forward leaves w ⊙ v to its
// readers (p.vw_formed), as the core with the output part forms it.
bool fused_core_output_may_apply(const BatchedParams& p);
// Whether the fused core with the output part can run beside the reverse chain (p.chain_ready), or with its state
// tiles in its phases' own copies (p.core_staged): the 8-warp block, q and k stored whole; p.core_output must hold as
// well.
bool fused_core_beside_supported(const BatchedParams& p);

}  // namespace mamba3::cuda::train_detail
