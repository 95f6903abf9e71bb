#pragma once
// The decode step (L = 1) of a Mamba-3 layer as one kernel: one block per (sequence, head) stages its own head (angle
// update and sincos, B/C norm, bias and rotation for every rank, α/β/γ: spec §2–§3), then streams the head's P×N
// state once — each lane holding its float4 slices of k_{−1}, k and q in registers, RG rows in flight as float4
// loads — with the y reduction (warp shuffles), the D skip and the output stage (spec §7). It writes the new ssm,
// angle, k and v states and the gated output o; nothing passes through global scratch.
// History: it replaced the cp.async decode kernel of mamba3_stage_gpu.cu, which ncu showed bound by instruction issue
// (1.5B SISO b128 206 µs per layer at 54 % of DRAM throughput, MIMO R = 4 510 µs at 23 %, H200, 2026-12-01), and
// then the separate angle and staging launches (MIMO R = 4: 6.4 + 68 µs per layer at b128).
// MIMO at P = 64, N = 128 can instead run its rows as tensor-core products on a state bulk-copied into shared memory
// (mamba3_head_decode_tc.cuh): 64 registers, 4 blocks per SM instead of 2.
// Reach: N a multiple of 4 and ≤ 256, P ≤ 128, R ≤ 4, 16-byte aligned ssm and k states; otherwise
// mamba3_head_decode_gpu returns false and the caller stages the token and runs the older kernel.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mamba3_gpu.h"
#include "ops/mamba3_config.h"

namespace mamba3::cuda {

struct Mamba3DecodeArgs : Mamba3KernelShape {  // L = 1
  Mamba3GpuParams p;
  const float* zx;  // (batch, d_in) in_proj output of the token
  Mamba3GpuState st;
  void* o;          // (batch, d_inner) f32 or bf16
};

// Launches the decode state step for `batch` rows; false (nothing launched) when the shape is out of reach. A state
// with ssm16 (the bf16-state mode) is read and written as bf16.
// tensor_cores: MIMO heads at P = 64, N = 128 update their state on tensor cores, the state held in the products'
// accumulators (3×TF32, f32 accuracy; mamba3_head_decode_tc.cuh).
// early_state: the state rows and cached k are requested before the kernel waits for the one before it (under PDL:
// beside in_proj's last blocks; MAMBA3_DECODE_EARLY_STATE, DecodeChoice::early_state) — only for a state the caller
// marks settled (Mamba3GpuState::settled).
bool mamba3_head_decode_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch, bool tensor_cores = false,
                            bool early_state = false);
// Whether the head kernel serves this layer shape (with 16-byte aligned ssm/ssm16 and k states, which
// GpuMamba3State's are): the bf16-state mode decodes only there.
bool mamba3_head_decode_reaches(const Mamba3KernelShape& shape);
// Whether the head kernel's tensor-core rows serve this shape (MIMO, P = 64, N = 128).
bool head_decode_tc_fits(const Mamba3DecodeArgs& a);

// Deferred state writes (Mamba3GpuState::write_every W = 2 or 4). A decode step must read every head's P×N state
// (y = h·q needs all of it) but need not write it back every step: with base state H_b written at token b, the state
// after token t is h_t = A·H_b + Σ_{i=b..t} w_i·x_i·k_iᵀ (A the product of α over b+1..t, w_i = β_{i+1}·Π α_{i+2..t}
// + γ_i·Π α_{i+1..t}), which the head kernel forms in registers from the pending tokens' k and x (the state's ring) and
// the new token, as it forms α·h + β·x_{−1}·k_{−1}ᵀ + γ·x·kᵀ otherwise (the same expressions at one pending token,
// so W = 1 and a head's first step after a write give the same bits). y is h_t·q as before. Head h writes h_t, k and
// x when (phase + h) mod W = W − 1 (phase: the row's step count mod W), else appends the token to its ring: per step
// W−1 of W heads only read their state, so the state traffic falls from 2 to 1 + 1/W reads' worth (the 1.5B SISO b128
// step moves 13.2 GB of state at W = 1, 9.9 GB at W = 2, 8.2 GB at W = 4). Exact up to f32 rounding: the sums
// are the recurrence's, in another order. SISO (R = 1, N ≤ 128) on the FMA rows, MIMO on the tensor-core rows (P = 64,
// N = 128: the update's k-dimension grows from 2R to (W + 1)·R terms; DecodeChoice::mimo_deferred_writes);
// other routes settle first.
constexpr int kMaxStateWriteEvery = 4;
// Floats of one ring entry (k of every rank, x, α, β, γ; 16-byte multiple), and of a (row, head)'s ring.
int64_t mamba3_ring_entry_floats(const Mamba3Config& c);
int64_t mamba3_ring_floats_per_head(const Mamba3Config& c, int write_every);
// Whether a decode step of this layer shape on this state runs the deferring kernel under the current decode choice.
bool mamba3_decode_defers_writes(const Mamba3KernelShape& shape, const Mamba3GpuState& st);
// Folds every row's pending tokens into its ssm, k and v states (rows [0, batch) of the view; rows with nothing
// pending are untouched) and clears their counts (phases kept). The state then holds h_t as spec §4.2 has it.
// mimo_x: the layer's (H, R, P) vectors, null for SISO.
void mamba3_settle_gpu(cudaStream_t s, const Mamba3Config& c, const float* mimo_x, const Mamba3GpuState& st,
                       int64_t batch);

// The streaming decode kernel (mamba3_stream_decode_gpu.cu), for large batches: `blocks_per_head` blocks per head
// (0: as many as fill the device once, at most one per sequence), each walking its head's sequences with its head's
// parameters read once, each item's inputs — the P×N state, the cached k, the raw B/C rows, x, z, x_{−1}, angles,
// scalars — copied by cp.async into a ring of `stages` (2 or 3) shared-memory stages while the block computes an
// earlier item.
// The head kernel holds a whole head's state rows in registers, which caps it at 2 (MIMO) or 3 blocks per SM with
// no loads in flight while they compute; here the state of the next items is always in flight. Same expressions, same
// results as the head kernel. Reach: N a multiple of 4 and ≤ 128 (≤ 256 for SISO), P ≤ 128, R ≤ 4, 16-byte aligned
// ssm and k states, the stages within the device's shared memory; false (nothing launched) otherwise.
bool mamba3_stream_decode_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch, int blocks_per_head,
                              int stages);

// Which kernel runs a decode step (mamba3_decode_choice.cpp). Auto: the head kernel with tensor-core rows for MIMO
// layers at P = 64, N = 128 from `head_tc_min_items` (sequence, head) pairs on, the streaming kernel for other MIMO
// layers from `stream_min_items` pairs on, the head kernel with FMA rows otherwise. Head: the head kernel, its MIMO
// rows on tensor cores where the shape allows iff head_tensor_cores. Stream: the streaming kernel. (Head and Stream
// fall back when a shape is out of their reach.)
enum class DecodeKernel { Auto, Head, Stream };
struct DecodeChoice {
  DecodeKernel kernel = DecodeKernel::Auto;
  int64_t stream_min_items = 4096;
  int blocks_per_head = 0;  // of the streaming kernel (0: as many as fill the device)
  int stages = 2;
  // The head kernel's MIMO rows on tensor cores where the shape allows (P = 64, N = 128).
  bool head_tensor_cores = true;
  int64_t head_tc_min_items = 512;
  // The head kernel requests its state rows and cached k before waiting for in_proj (mamba3_head_decode_gpu).
  bool early_state = true;
  // Deferred state writes for MIMO layers on the tensor-core rows (mamba3_decode_defers_writes): with read-only
  // steps, 1.5B MIMO R = 4 b128 on an H100 6.99 → 6.93–6.96 ms at W = 2 (without them, an H200: 5.74 → 5.79).
  bool mimo_deferred_writes = true;
};
// Process-wide. Defaults from MAMBA3_DECODE_KERNEL (auto | head | stream), MAMBA3_STREAM_DECODE_MIN (pairs),
// MAMBA3_STREAM_DECODE_STAGES (2 | 3), MAMBA3_STREAM_DECODE_BLOCKS (per head; 0 = fill the device),
// MAMBA3_HEAD_DECODE_TC (1 | 0), MAMBA3_HEAD_DECODE_TC_MIN (pairs), MAMBA3_DECODE_EARLY_STATE (1 | 0, default 1) and
// MAMBA3_DECODE_DEFER_MIMO (1 | 0, default 1),
// read on first use; tests set it.
DecodeChoice decode_choice();
void set_decode_choice(const DecodeChoice& c);

// The decode step by the chosen kernel; false when neither applies.
bool mamba3_decode_step_gpu(cudaStream_t s, const Mamba3DecodeArgs& a, int64_t batch);

}  // namespace mamba3::cuda
