#pragma once
// The chunk-state chain of the batched path's cores (bf16 mode): for every (sequence, head) the chunks' state products
// and the scan over the chunks in one kernel, the running state in f32 registers, instead of a batched product that
// writes every chunk's contribution in f32 and a scan pass that reads it back (docs/kernels/mamba3_train_cuda.md,
// "Fifteenth session"). Walking chunk c (ascending forward, descending reverse):
//   out16[c] = bf16(S),  S ← decay[c]·S + A_cᵀ·B_c,  S = 0 before the first chunk walked,
// the scan's own fused multiply-add (launch_state_scan), so with the same products the same bits.
//   forward: A = w ⊙ v (p.Vw), B = k (p.K)       → out16 = Hc16, the state entering each chunk;
//   reverse: A = e^Λ ⊙ dy (p.dYe), B = q (p.Q)   → out16 = dHc16, the dH entering each chunk from the later ones.
// The reverse products run in the backward core's order (the same mma tiles and k-steps as its G), so the reverse
// chain gives the core-plus-scan path's bits; the forward ones sum in the mma's order, not cuBLAS's (to rounding).
#include <cuda_runtime.h>

#include "cuda/train/mamba3_train_kernels.h"

namespace mamba3::cuda::train_detail {

// The cores' shapes (bf16, 64 rows per chunk, N ∈ {32, 64, 128}, P ∈ {32, 64}).
bool state_chain_supported(const BatchedParams& p);

// A: (B·H·nc, 64, P) bf16, Bop: (B·H·nc, 64, N) bf16, p.decay (B·H·nc) → out16 (B·H·nc, P, N) bf16.
// w_rows (B·H·nc, 64) f32, optional: A's rows scaled by them and rounded to bf16 in the fragments before the products
// (the forward chain's A = w ⊙ v formed from v, p.vw_formed: the build's values, bf16(w·v), without its Vw tensor).
// form_dye (reverse; A unused): A = e^Λ ⊙ dy formed in the fragments from p.dO16, p.zx16 and p.eL with the output-stage
// backward's expressions (launch_output_dye's bits, without its kernel).
// With p.chain_ready (reverse): each block raises the counter of every chunk once its dH is stored, and the grid
// triggers its dependents right after its own wait (the fused core beside it); state_chain_blocks_per_head blocks
// raise each counter.
void launch_state_chain(cudaStream_t s, const BatchedParams& p, const void* A, const void* Bop, bool reverse,
                        void* out16, const float* w_rows = nullptr, bool form_dye = false);
// The chain's blocks per sequence-head (P over the rows of P per block) for p's shape.
int state_chain_blocks_per_head(const BatchedParams& p);
// The forward chain with the SISO build's k and v (p.build_q_only: the build wrote only Q): one block per sequence-head
// forms each chunk's k and v from zx's B rows, the angle codes, x in bf16 and the biases as the build does, stores
// them to p.K and p.V, and runs the forward chain's step on them (A = w ⊙ v formed from v and p.wv) → out16 = Hc16.
// The same bits as the build and launch_state_chain. Shapes: kv_chain_supported (SISO, the cores' N and P, whole
// 64-token chunks, p.vw_formed, bf16 x, angle codes with S a multiple of 8, q and k stored whole).
bool kv_chain_supported(const BatchedParams& p);
void launch_kv_chain(cudaStream_t s, const BatchedParams& p, void* out16);
// The kv chain and the forward core in one walk per sequence-head (p.kv_forms_q: no build kernel; the chunk scalars
// before it): per chunk k, v and the entering state stored (p.K, p.V, out16 = Hc16) and the chain's step as the kv
// chain runs them, then q formed in the core's fragments and stored (p.Q), and the forward core's products and output
// stage (y16 to p.WV and o16; Z is not written: p.z_unread). The same bits as the build, the chain and the forward
// core.
// Shapes: fwd_walk_supported (the kv chain's, with the SISO output stage in bf16, Z unread, no output norm).
bool fwd_walk_supported(const BatchedParams& p);
void launch_fwd_walk(cudaStream_t s, const BatchedParams& p, void* out16);
// Rows of P per chain block, 32 or 64 (the latter where P allows; the same bits): process-wide, default from
// MAMBA3_TRAIN_CHAIN_SLICE ("32" or "64", unset: 64).
void set_state_chain_slice(int rows);

}  // namespace mamba3::cuda::train_detail
