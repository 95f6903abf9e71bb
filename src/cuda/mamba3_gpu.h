#pragma once
// The Mamba-3 mixer's recurrent core on the GPU (spec §2–§4, §6, §7): from the in_proj output to the gated output
// that enters out_proj, for a prefill of L tokens or a decode step (L = 1), continuing from and updating the
// decode state. One fused kernel: B/C RMSNorm, Δ/A/λ, angle update, bias + rotary, the exponential-trapezoidal
// state update, y = h·q + D·v, the output norm, gate and MIMO contraction.
//
// Form: recurrent (the definition of spec §4.1) with each head's P×N state held in registers across the tokens;
// one thread block per (sequence, head). Decode reads and writes every state once; prefill is sequential in time
// per head (the chunked tensor-core form of spec §5.3 is the planned replacement for long prompts).
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/cuda_context.h"
#include "ops/mamba3_config.h"

namespace mamba3::cuda {

// Device pointers to one layer's f32 parameters (null where the configuration has none).
struct Mamba3GpuParams {
  const float* dt_bias;  // (H)
  const float* B_bias;   // (H, R, N)
  const float* C_bias;   // (H, R, N)
  const float* B_norm;   // (N)
  const float* C_norm;   // (N)
  const float* D;        // (H)
  const float* mimo_x;   // (H, R, P) or null (SISO)
  const float* mimo_z;   // (H, R, P) or null
  const float* mimo_o;   // (H, R, P) or null
  const float* norm;     // (d_inner) or null (is_outproj_norm false)
};

// Scratch of the staged path for `tokens` tokens of each of `batch` sequences (f32, batch-major):
// phi (b, tokens, H, S) wrapped angles; k (b, tokens + 1, R, H, N) keys, slot 0 the cached k_{-1}, slot t + 1 token t;
// q (b, tokens, R, H, N) queries; scal (b, tokens, H, 4) α, β, γ, A·Δ.
struct Mamba3GpuStage {
  float* phi = nullptr;
  float* k = nullptr;
  float* q = nullptr;
  float* scal = nullptr;
  int64_t tokens = 0;  // capacity per sequence (0: none)
};

// Decode state of `batch` consecutive rows, f32, layouts of spec §4.2: angle (b, H, S), ssm (b, H, P, N),
// k (b, R, H, N), v (b, H, P).
// `arrivals` (b, H) int32, zero between calls: the fused decode kernel's per-head counter of finished channel chunks
// (the last chunk of a head writes its angle, k and v, after every chunk has read the old ones).
// `stage`: the staged path's scratch for one token of these rows (decode), owned with the state so that a captured
// decode graph keeps valid addresses.
// `active` (b) int32 on the device, entry b for this view's row b (a view rows_from(row0) of a slot mask takes
// mask + row0), or null: every row active. A decode call (L = 1) skips each row whose entry is 0 on both paths: its
// blocks, warps and threads return before touching its angle, ssm, k, v, arrivals or stage scratch, so the row's
// state is bitwise unchanged and its output rows of `o` are left as they were (unspecified). The kernels read the
// mask when they run, so a captured decode graph follows later changes of its contents. Prefill (L > 1) ignores
// the mask: it always runs every row of the call (a slot still being prefilled is typically inactive in decode).
// `ssm16`: the bf16-state mode (GpuMamba3State with a bf16 state): the ssm state is stored here as bf16 bits, same
// layout, and `ssm` is null. Only the head decode kernel reads and writes it directly; GpuMamba3Layer::forward runs
// every other kernel on an f32 copy (converted before, rounded back after).
struct Mamba3GpuState {
  float* angle;
  float* ssm;
  float* k;
  float* v;
  int* arrivals;
  Mamba3GpuStage stage;
  const int32_t* active = nullptr;
  uint16_t* ssm16 = nullptr;
  // The caller's promise that ssm and k were last written before the current step began — a plain launch or a graph
  // launch since, so every kernel that wrote them has finished (CudaModel's decode steps: the embedding starts each
  // step). Only then may the head decode kernel request them before its PDL wait (DecodeChoice::early_state): two
  // decode kernels on one state with only PDL launches between them would otherwise race.
  bool settled = false;
  // The head decode kernel launches under PDL at any batch, not only up to pdl_max_rows(): CudaModel sets it for
  // decode steps whose products are the stream GEMM's (the norms folded at 65–128 rows), where the kernel then starts,
  // and requests its settled state, while in_proj's tail runs (H100, 1.5B SISO, ms per step: b65 4.197 → 4.127, b128
  // 6.446 → 6.390). Behind cuBLAS products it lost (MIMO b96 5.75 → 5.80, b128 7.06 → 7.09; H200 with cuBLAS, thirty-
  // first session: b128 5.145 → 5.168), so the default stays the small-launch rule.
  bool pdl_any_batch = false;
  // Deferred state writes (write_every W > 1; mamba3_decode_gpu.h, "Deferred state writes"): the SISO head decode
  // kernel writes head h's ssm state only every W-th step (heads staggered by h), keeping the tokens since in `ring`
  // (per (row, head): W − 1 entries of mamba3_ring_entry_floats floats: k, x, α, β, γ) and the count and phase in
  // `lazy` (row, head) int32: ssm, k and v then hold the state at the head's last write, not the current one.
  // mamba3_settle_gpu folds the pending tokens in (what every other kernel needs first: GpuMamba3Layer::forward does
  // it). Zeroed words (a fresh or reset row) mean nothing pending. W = 1 (lazy and ring null): every step writes.
  int* lazy = nullptr;
  float* ring = nullptr;
  int write_every = 1;
};

// Which kernels run the recurrence. Staged: an angle scan, a fully parallel staging kernel (B/C norm, bias,
// rotation, α/β/γ) and a streaming state kernel. Fused: the single kernel that stages every token per head.
// Chunked (the layers' default since 2026-12-01): Staged, except that a bf16 prefill (L > 1) runs the chunked
// tensor-core state kernel of spec §5.3 (mamba3_chunk_gpu.h); f32 layers and decode steps run exactly as Staged.
// GpuMamba3Layer routes it (it calls mamba3_staged_gpu with chunked_prefill); mamba3_recurrent_gpu itself only knows
// Staged and Fused.
enum class Mamba3GpuPath { Staged, Fused, Chunked };

// Largest supported sizes of the fused kernel (checked by mamba3_gpu_supported).
constexpr int64_t kMamba3GpuMaxRank = 4;
constexpr int64_t kMamba3GpuMaxState = 256;
constexpr int64_t kMamba3GpuMaxHeaddim = 128;  // 16 warps of 8 channels

// The shape and switches of one Mamba-3 layer as every inference kernel reads them; each kernel's argument struct
// derives from it (mamba3_kernel_shape fills it once per call).
struct Mamba3KernelShape {
  int H, P, N, R, G, S;
  int L;  // tokens per sequence in zx and o (their row stride)
  int d_in, d_inner;
  int off_x, off_B, off_C, off_dt, off_angles;  // sections of an in_proj row
  float A_floor;
  bool heavy_tail, mimo, no_rotary, euler, o_bf16;
};
Mamba3KernelShape mamba3_kernel_shape(const Mamba3Config& c, int64_t L, Precision o_precision);

// Empty when the kernel handles the configuration, else the reason (names the field).
std::string mamba3_gpu_supported(const Mamba3Config& c);

// Floats of a Mamba3GpuStage for `tokens` tokens of `batch` sequences, and its view of `base` (16-byte aligned).
int64_t mamba3_gpu_stage_floats(const Mamba3Config& c, int64_t batch, int64_t tokens);
Mamba3GpuStage mamba3_gpu_stage_view(const Mamba3Config& c, float* base, int64_t batch, int64_t tokens);
// Tokens per sequence a prefill stage of `batch` sequences holds within `max_bytes` (at least 1, at most L): a longer
// prefill runs in segments of that many tokens.
int64_t mamba3_gpu_stage_tokens(const Mamba3Config& c, int64_t batch, int64_t L, size_t max_bytes);

// zx: (batch, L, d_in_proj) f32 in_proj outputs; o: (batch, L, d_inner) in the precision's activation dtype.
// Staged path: L = 1 uses state.stage; L > 1 uses `prefill_stage` (sized for `batch` sequences), in segments of
// prefill_stage.tokens tokens.
void mamba3_recurrent_gpu(cudaStream_t s, const Mamba3Config& c, const Mamba3GpuParams& p, int64_t batch, int64_t L,
                          const float* zx, Mamba3GpuState state, void* o, Precision o_precision,
                          Mamba3GpuPath path = Mamba3GpuPath::Staged, const Mamba3GpuStage& prefill_stage = {});

}  // namespace mamba3::cuda
