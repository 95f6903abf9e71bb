#pragma once
// Kernels of the Mamba-3 mixer's GPU training pass (used by mamba3_train_gpu.cpp only): plain parameter structs and
// their launchers. Layouts: M = B·L token rows (batch-major); "bh" = b·H + h indexes one (sequence, head) task, and
// per-task arrays are (B·H, L, …). Every launcher enqueues on the given stream and checks the launch.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace mamba3::cuda::train_detail {

constexpr int kChunkThreads = 256;  // threads of a chunk block
constexpr int kMaxRank = 4;         // R ≤ 4 (MIMO)

// Sizes and switches of a Mamba3Config as the kernels need them (spec §1.2).
struct MixerDims {
  int B, L, H, P, N, R, G, S, din, d_inner;
  int off_x, off_B, off_C, off_dt, off_A, off_trap, off_ang;
  bool mimo, euler, no_rotary, heavy_tail, outnorm;
  float A_floor;
};

// Per-token, per-head scalars of spec §2.2, (B·H, L) each, with the derivatives the backward needs.
struct TokenScalars {
  float* dt;    // Δ
  float* A;     // A (Λ sums A·Δ)
  float* lam;   // λ (1 under euler)
  float* dAdl;  // dA/d(dd_A), 0 where the A_floor clamp binds
  float* dsp;   // softplus′(dd_dt + dt_bias)
};

// In place on zx (M, din): every B and C vector RMS-normalised and scaled by B_norm / C_norm; the raw vectors saved
// to bc_raw (M, 2·R·G·N: B's then C's) for the backward. bc_unrot (optional): the normalised coordinates [N/2, N) of
// every vector again, (M, 2·R·G, N/2) in bc_raw's vector order (BatchedParams::bc_unrot).
void launch_normalize_bc(cudaStream_t s, const MixerDims& d, float* zx, const float* B_norm, const float* C_norm,
                         float* bc_raw, float* bc_unrot = nullptr);
void launch_token_scalars(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt_bias, TokenScalars out);
// The angle scan and the angle backward run in segments of kAngleSegment tokens (each in parallel) with the
// segments' carries in a scratch of angle_scratch_floats(d) floats, (B·H, segments, S).
constexpr int kAngleSegment = 64;
size_t angle_scratch_floats(const MixerDims& d);
// The cumulative angles φ_t = wrap(φ_{t−1} + π·tanh(θ_t)·Δ_t), φ_{−1} = 0, into phi (B·H, L, S). seg: scratch.
// Their readers take cos/sin themselves (rotary_cos_sin): φ is half the bytes of (cos, sin), and each reader reads the angle once
// where it read both before.
// Three forms, the same bits: segment blocks over all heads (mamba3_train_angle_blocks.cu; rotary layers whose
// shared memory fits), one kernel per (head, tile of angles) keeping the sequence in shared memory ("fused": L ≤ 4096
// with S ≥ 8), or local scans, carries and a finish pass ("split", everywhere). The first that applies among the
// chosen one and those after it runs. MAMBA3_TRAIN_ANGLES=blocks|fused|split (read once; default blocks) or
// set_angles_mode (process-wide, for the test that compares them) chooses; the angle backward takes its segment-block
// form in the blocks mode and the per-angle kernels otherwise.
enum class AnglesMode { kBlocks, kFused, kSplit };
void launch_angles(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, float* phi, float* seg);
void set_angles_mode(AnglesMode mode);
// The angles as codes (BatchedParams::phi_code) into codes (B·H, L, S), by the segment-block scan where the blocks
// mode is chosen and applies; false: nothing launched (the caller writes φ with launch_angles instead).
bool launch_angle_codes(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, uint16_t* codes,
                        float* seg);
// The segment-block forms (false: they do not apply to d, nothing launched). codes (optional): φ written as angle
// codes there instead of into phi (BatchedParams::phi_code).
bool launch_angles_blocks(cudaStream_t s, const MixerDims& d, const float* zx, const float* dt, float* phi, float* seg,
                          uint16_t* codes = nullptr);

// Everything a chunk kernel reads and writes; entries a pass does not use may be null.
// Two schedules over a sequence's chunks (MAMBA3_TRAIN_SCAN): "sequential", one block per (sequence, head) walking
// its chunks and carrying H (forward) / dH (reverse); "parallel" (chunk-parallel, the SSD decomposition), one block
// per (sequence, head, chunk) with the carried states from an elementwise scan over chunks (see the launchers).
// Parameter partials have one row per (b, h) task and chunk group: index (b·pc + c)·H + h with pc = chunks and c the
// chunk in the parallel schedule, pc = 1 and c = 0 in the sequential one (so B·pc rows of H·… columns to sum).
struct ChunkParams {
  MixerDims d;
  int T;                       // GPU chunk length in tokens (T·R ≤ 64)
  bool tc;                     // products on tensor cores (bf16 operands, f32 accumulation): the bf16 mode's "tc" path
  bool parallel;               // chunk-parallel schedule (needs Hc and decay; the backward also dHc)
  // Parallel schedule: the resident blocks per SM (1 or 2) the per-chunk output kernel (training forward, backward
  // pass 1) and the reverse kernel are compiled for: 2 launches their __launch_bounds__(256, 2) variants (≤ 128
  // registers, so two 256-thread blocks share an SM's registers when their shared memory also fits), 1 the plain
  // ones (__launch_bounds__(256)). Register allocation only: the same PTX arithmetic, bit-identical results.
  // Ignored by the sequential schedule.
  int fwd_blocks, rev_blocks;
  const float* zx;             // (M, din), B/C normalised
  const float *dt, *A, *lam;   // (B·H, L)
  const float* phi;            // (B·H, L, S) cumulative rotary angles (launch_angles)
  const float *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *D, *norm;
  float* o;                    // (M, d_inner) gated output (forward and backward pass 1)
  // Backward, pass 1 (forward over chunks).
  const float* dO;             // (M, d_inner) gradient of o
  float* dzx;                  // (M, din): z columns (pass 1), x columns (reverse pass)
  float* dy;                   // (B·H, L, R, P) gradient of y
  float* Hc;                   // (B·H, chunks, P, N) state at each chunk start (parallel: also the forward pass)
  float* dHc;                  // (B·H, chunks, P, N) parallel: dH entering each chunk from the later ones
  float* decay;                // (B·H, chunks) parallel: e^{Λ_last} of every chunk
  float *part_mimo_z, *part_mimo_o, *part_norm;  // (B·pc, H, R, P) ×2, (B·pc, H, P)
  // Backward, reverse pass.
  float *dBn, *dCn;            // (M, H, R, N) gradient of the normalised B / C seen by each head
  float* dphi;                 // (B·H, L, S) per-token gradient of φ_t (before the reverse cumulative sum)
  float *dadt, *dgam, *dscale; // (B·H, L) gradients of A·Δ, γ and scale
  float *part_B_bias, *part_C_bias, *part_mimo_x, *part_D;  // (B·pc, H, R, N) ×2, (B·pc, H, R, P), (B·pc, H)
};

size_t chunk_forward_smem_bytes(const MixerDims& d, int T, bool backward, bool parallel = false);
size_t chunk_reverse_smem_bytes(const MixerDims& d, int T);
size_t chunk_state_smem_bytes(const MixerDims& d, int T);  // the parallel schedule's chunk-state kernel
// Whether two blocks of a chunk kernel with `bytes` of dynamic shared memory fit one SM: 2·(bytes + reserved) ≤
// sm_bytes, with sm_bytes the device's shared memory per SM (cudaDevAttrMaxSharedMemoryPerMultiprocessor, 228 KB on
// H100/H200) and reserved its per-block reserve (cudaDevAttrReservedSharedMemoryPerBlock, 1 KB). The chunk kernels
// have no static shared memory.
constexpr bool chunk_two_blocks_fit(size_t bytes, size_t sm_bytes, size_t reserved) {
  return 2 * (bytes + reserved) <= sm_bytes;
}
// Forward over chunks: o; with `backward` also Hc, dy, dz and the output-stage parameter partials. Parallel: the
// chunk-state kernel (each chunk's state change from zero → Hc[c + 1], e^{Λ_last} → decay), the state scan (Hc in
// place), then the output kernel per chunk (with `backward` also each chunk's dH contribution → dHc[c − 1]).
void launch_chunk_forward(cudaStream_t s, const ChunkParams& p, bool backward);
// Reverse over chunks (needs pass 1's Hc and dy). Parallel: the reverse dH scan (dHc in place), then the reverse
// kernel per chunk.
void launch_chunk_reverse(cudaStream_t s, const ChunkParams& p);

// The elementwise scan over chunks of the chunk-parallel schedule on S (B·H, chunks, PN), in place (see
// chunk_scan_kernel): forward S[c] ← decay[c − 1]·S[c − 1] + S[c], S[0] = 0; reverse S[c] ← decay[c + 1]·S[c + 1] +
// S[c], S[last] = 0. decay (B·H, chunks). copy16 (optional): every slot's result also rounded to bf16 there, same
// layout (the operand of bf16 products). write_f32 false (with copy16): the results go to copy16 only and S keeps
// its inputs (the bf16 mode's batched path reads only the bf16 states: 4 bytes per element and scan fewer).
void launch_state_scan(cudaStream_t s, float* S, const float* decay, int64_t BH, int chunks, int PN, bool reverse,
                       uint16_t* copy16 = nullptr, bool write_f32 = true);

// The batched-GEMM path (mamba3_train_batched.cu): the chunked form as strided-batched cuBLAS products over every
// (sequence, head, chunk) at once, with per-chunk elementwise kernels between them. Buffers "per chunk row" are
// (B·H·nc, rows, cols): element ((bh·nc + c)·rows + j)·cols + col, j = tl·R + r the row of token tl of chunk c, rank r;
// tokens past L (the last chunk's padding) are zero rows. Per-token chunk scalars are (B·H·nc, T): index
// (bh·nc + c)·T + tl. Parameter partials as ChunkParams' parallel schedule: row (b·nc + c)·H + h.
struct BatchedParams {
  MixerDims d;
  int T, nc, rows;                       // chunk length (tokens), chunks per sequence, rows = T·R
  int heads_per_block;                   // the epilogue's heads per block (divides H / G): dBn/dCn per head slot
  // The products' chunk-row operands (q, k, v, w ⊙ v, W, dS, dy, e^Λ ⊙ dy) are bf16 (the bf16 mode's products on
  // bf16 tensor cores) or f32 (the exact mode); "op" marks them below. Everything else is f32.
  bool bf16;
  // The SISO instances of the build, the rotation backward and the output-stage backward, and the MIMO instance of the
  // build, where their shapes apply (false: the generic kernels everywhere; the same arithmetic, which a test checks).
  bool siso_kernels;
  // The SISO output-stage backward's tokens in flight per warp, 1 or 2 (the same sums in the same order); not 1: also
  // MIMO's output forward with y stored has all of a warp's tokens in flight (batched_output_mimo_y_kernel).
  int output_tokens;
  // The SISO build's path for full chunks (addresses stepped from pointers made once, the chunk scalars by a kernel
  // of their own before it); false: its general loop. The same bits.
  bool build_fast;
  // The SISO output-stage backward's kernel for whole chunks where the step's configuration allows it; false: its
  // general kernel. The same expressions and sum orders.
  bool output_full;
  // The SISO rotation backward's L2 prefetch of each warp's next token (its loads a round trip from DRAM otherwise).
  bool rotation_prefetch;
  // The SISO rotation backward at N 128 (with the prefetch) with a lane on the rotary pairs l and l + 32 instead of on
  // four consecutive elements (every lane rotates at most one pair); the same bits.
  bool rotation_split;
  // With the split lanes, q and k formed and bf16 dQ/dK: a warp's next token loaded into registers while it works on
  // the current one; the same bits.
  bool rotation_pipe;
  // The SISO forward core (writing the output) stores q·H_cᵀ and the pre-norm output y = e^Λ·Z + D·v + W·v in bf16,
  // in the Z and WV buffers (their first halves), instead of Z and W·v in f32; the SISO output-stage backwards read
  // them so (y as stored, not re-formed). Set only where both apply (batched_chunks).
  bool zy16;
  // MIMO's backward state core runs the epilogue's state part itself (dv, dx, Σ_p v·tp, ⟨dH, H_c⟩, the state-carry
  // terms, dadt, dscale and the mimo_x partials) instead of storing tp and dV for the epilogue kernel. Set only where
  // the MIMO epilogue instance would run otherwise (batched_chunks: epilogue_mimo_applies), whose arithmetic it keeps.
  bool epilogue_in_core;
  // The SISO fused core un-rotates dQ and dK itself and writes dφ (fused_core_unrotate_supported); the rotation
  // backward reads dQ16/dK16 as the per-head gradients of the biased normalised C and B and writes no dφ.
  bool dqk_unrotated;
  // With dqk_unrotated, the fused core also sums dQ/dK over clusters of 8 heads into dCn/dBn slots and writes the
  // bias partials (fused_core_head_sum_supported); no rotation backward runs.
  bool dqk_head_sum;
  // The SISO fused core runs the output stage's backward itself (fused_core_output_supported): its dy and e^Λ ⊙ dy
  // tiles arrive as dO's and z's rows, and it writes dz and D's partials and forms Λ's state-read term from dQ's state
  // term; the reverse chain forms its e^Λ ⊙ dy from dO and z (launch_state_chain's form_dye), or launch_output_dye
  // writes it first. Set in batched_chunks.
  bool core_output;
  // The SISO build does not write Vw (w ⊙ v): the forward state chain and the fused backward core form it from v's
  // fragments and w (p.wv) as bf16(w·v), the build's bits (scale_pair). Needs the full-chunk build with bf16 x
  // (vw_formed_supported); set in batched_chunks and kept with the activations (a backward on another path forms Vw
  // first: launch_form_vw).
  bool vw_formed;
  // The SISO forward core does not write Z (zy16 only): the fused core with the output part forms Λ's state-read term
  // from dQ's state term instead. Set with vw_formed (where the output part is expected) and kept with the
  // activations; a backward on another path runs the forward core again first (batched_chunks).
  bool z_unread;
  // MIMO's forward core stores y = (e^Λ·Z + D·v) + W·v (chunk_row_y) in WV instead of W·v, and the MIMO output
  // instance reads it (the forward nothing else of the chunk rows; the backward Z and v besides). Set only where
  // both run, and kept with the activations (batched_chunks).
  bool wv_holds_y;
  // Q and K hold only the rotated columns [0, N/2) of each row (row pitch N/2; rope_fraction 0.5): their readers (the
  // chains, the forward core, the fused backward core) form the unrotated columns from zx's normalised B/C rows and
  // the biases, the build's bits (qk_unrotated_columns.cuh). SISO only, where qk_rotated_only_supported; set in
  // batched_chunks and kept with the activations (a backward on another path runs the build again, whole).
  bool qk_rotated_only;
  // The SISO build writes only Q: K, V and the forward chain's chunk states come from launch_kv_chain, which forms k
  // and v itself (the build's bits) on its walk over a sequence-head's chunks (Mamba3TrainGpu::set_kv_chain). Set in
  // batched_chunks for the forward's build only.
  bool build_q_only;
  // With build_q_only: the kv chain runs first and triggers its dependents, and q's build runs beside it.
  bool q_beside;
  // The kv chain forms q as well (no build kernel: the chunk scalars alone before it).
  bool kv_forms_q;
  // The normalised B/C coordinates [N/2, N), (M, 2·G, N/2): B's vectors then C's (launch_normalize_bc's bc_unrot),
  // where the readers of qk_rotated_only form the unrotated half (null: qk_rotated_only does not apply).
  const float* bc_unrot;
  // With qk_rotated_only, the forward core and the fused core take their chunks head-fastest ((b, c, h): a chunk's
  // heads, which read the same bc_unrot rows, in consecutive blocks).
  bool qk_head_order;
  const float* zx;                       // (M, din), B/C normalised
  // zx's z and x columns rounded to bf16, (M, 2·d_inner) (null: read from zx). Where given, the bf16 mode's in_proj
  // wrote them so (as autocast's linear gives them) and zx's own z and x columns hold nothing: every reader of those
  // columns goes through zx_col (mamba3_train_batched_common.cuh) or reads this copy itself.
  const uint16_t* zx16;
  const float *dt, *A, *lam;             // (B·H, L)
  const float* phi;                      // (B·H, L, S) cumulative rotary angles (launch_angles)
  // The same angles as codes (the bf16 mode, Mamba3TrainGpu::set_angle_codes): wrap(φ) in steps of 2π/65536, half
  // of φ's bytes; where set, phi is null and every reader takes angle_at (mamba3_train_math.cuh).
  const uint16_t* phi_code;
  const float *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *D, *norm;
  // Built per chunk: Λ (chunk-local prefix of A·Δ), e^Λ, γ = λΔ, scale, w = e^{Λ_last − Λ}·scale; e^{Λ_last}.
  float *Lam, *eL, *gam, *scale, *wv;    // (B·H·nc, T)
  float* decay;                          // (B·H·nc)
  void *Q, *K;                           // op, per chunk row, N: rotated biased C and B
  void *V, *Vw;                          // op, per chunk row, P: mimo_x ⊙ x and w ⊙ V
  float* S;                              // (B·H·nc, rows, rows): q·kᵀ
  void* W;                               // op, (B·H·nc, rows, rows): S ⊙ coef
  float *Z, *WV;                         // per chunk row, P: q·H_cᵀ and W·v (backward: Z then K·dHᵀ)
  float* o;                              // (M, d_inner) gated output (null: not written again)
  void* o16;                             // (M, d_inner) bf16, the same rounded (null: not written)
  // Backward.
  const float* dO;                       // (M, d_inner)
  const uint16_t* dO16;                  // (M, d_inner) bf16: dO as its product rounded it (null: dO in f32)
  float* dzx;                            // (M, din): z and x columns written
  // (M, din) bf16 (null: not written): the same columns rounded to nearest even, instead of dzx's f32 ones (the bf16
  // mode's only operand of du = dzx·W_in and dW_in += dzxᵀ·u; the angle/scalar and B/C norm backwards write the
  // other columns likewise, except dt, A and trap, which stay in f32 too: the dt_bias partial reads dt's).
  uint16_t* dzx16;
  void *dY, *dYe;                        // op, per chunk row, P: dy and e^Λ ⊙ dy
  float* dWf;                            // (B·H·nc, rows, rows): dy·vᵀ
  void* dS;                              // op, (B·H·nc, rows, rows): dW ⊙ coef
  float *dQ, *dK, *dV;                   // per chunk row, N, N, P
  // dQ and dK rounded to bf16, per chunk row, N (null: not used): the SISO cores and MIMO's state core write the
  // finished dQ and dK here instead of to dQ and dK (dK's first term still goes to dK for the split post-scan core),
  // and the rotation backward's instances read them — half the bytes of the f32 pair on both sides (dqk16_supported).
  uint16_t *dQ16, *dK16;
  const float *Hc, *dHc;                 // (B·H·nc, P, N) state and dH entering each chunk (after the scans)
  // The same rounded to bf16 (the scans' copies): in the bf16 mode the epilogue's ⟨dH, H_c⟩ reads these, and the
  // scans write no f32 states (Hc and dHc then hold the scans' inputs).
  const void *Hc16, *dHc16;
  // The fused core beside the reverse chain (Mamba3TrainGpu::set_core_beside; null: not): one counter per chunk
  // (B·H·nc, chunk order of Hc16) that the reverse chain raises by one per block of P rows once the dH entering that
  // chunk is stored (release), and the value at which the fused core, launched while the chain runs, may read it
  // (acquire). The counters only grow; the caller counts the launches (target = launches × the chain's P blocks).
  unsigned* chain_ready;
  unsigned chain_ready_target;
  // out_proj beside the forward walk (Mamba3TrainGpu::set_out_proj_beside; null: not): (B, nc) counters that every
  // head's walk raises by one once a chunk's o16 rows are stored (release); the walk then also triggers its
  // dependents right after its own wait (out_proj_beside.h).
  unsigned* walk_ready;
  // The 8-warp fused core with the output part copies the state tiles in their phases' own groups (H_c by phase A's
  // warps, dH by phase B's), waited for just before their first products (Mamba3TrainGpu::set_core_staged); the same
  // bits.
  bool core_staged;
  float* dLam;                           // (B·H·nc, T) gradient of Λ
  float *dadt, *dgam, *dscale;           // (B·H, L)
  float* dphi;                           // (B·H, L, S)
  // The angle backward's sums of dφ over each segment (launch_angle_totals' layout and bits), written by the SISO
  // rotation backward where rotation_backward_writes_angle_totals (its chunks are the segments); null: not written.
  float* angle_seg;
  float *dBn, *dCn;                      // (M, H, R, N)
  float *part_mimo_z, *part_mimo_o, *part_norm, *part_B_bias, *part_C_bias, *part_mimo_x, *part_D;
  // The B/C norm backward's inputs and partials (launch_bc_norm_backward's), for a rotation backward that runs it
  // itself (rotation_backward_fuses_bc_norm; null: it writes dBn/dCn for the separate kernel): the raw B/C rows
  // (M, 2·R·G, N), the norms' weights (N), the per-row weight partials (M·R·G, N) each.
  const float* bc_raw;
  const float *B_normw, *C_normw;
  float *part_B_norm, *part_C_norm;
};
// Whether launch_batched_rotation_backward runs the B/C norm backward too (the SISO instance, p's B/C norm fields
// given): then dBn/dCn are not written and launch_bc_norm_backward must not run.
bool rotation_backward_fuses_bc_norm(const BatchedParams& p);
// Whether it writes the angle backward's segment sums of dφ into p.angle_seg (the SISO instance forming dφ, p.T =
// kAngleSegment, S 16 or 32 — where the totals kernel's order is eight phases of tokens, one per warp of the rotation
// backward — and p.angle_seg given): then AngleBackwardParams::seg_ready may be set.
bool rotation_backward_writes_angle_totals(const BatchedParams& p);
// Whether the rotation backward that follows the cores reads bf16 dQ/dK (p.dQ16, p.dK16): its SISO and MIMO instances.
bool dqk16_supported(const BatchedParams& p);
// Whether the rotation backward has an instance for dQ16/dK16 already un-rotated by the fused core (p.dqk_unrotated):
// the SISO one with the B/C norm backward inside.
bool rotation_backward_reads_unrotated(const BatchedParams& p);
// q, k, v, w ⊙ v and the chunk scalars (one block per chunk).
void launch_batched_build(cudaStream_t s, const BatchedParams& p);
// The beside order of p.build_q_only (p.q_beside): the chunk scalars alone (the SISO full-chunk build's first kernel),
// then launch_kv_chain, then q alone beside it (launch_build_q_beside; see build_q_beside_kernel).
void launch_chunk_scalars(cudaStream_t s, const BatchedParams& p);
void launch_build_q_beside(cudaStream_t s, const BatchedParams& p);
// W = S ⊙ coef (one block per chunk).
void launch_batched_mask(cudaStream_t s, const BatchedParams& p);
// y = e^Λ ⊙ Z + WV + D·v, the output stage → o; with `backward` also dy, e^Λ ⊙ dy, dz, Λ's gradient from the state
// read (dLam, overwritten), the output stage's partials and D's.
void launch_batched_output(cudaStream_t s, const BatchedParams& p, bool backward);
// Vw = bf16(w ⊙ v) from V and p.wv, where the forward left it to its readers (p.vw_formed) and a path that reads it
// runs: the build's values.
void launch_form_vw(cudaStream_t s, const BatchedParams& p);
// Whether the forward can leave w ⊙ v to its readers (p.vw_formed): the SISO full-chunk build with bf16 x.
bool vw_formed_supported(const BatchedParams& p);
// Whether the SISO build may store only q's and k's rotated columns (p.qk_rotated_only): its full-chunk kernel at
// rope_fraction 0.5 with bc_unrot written and 16-byte-aligned zx rows, bc_unrot and biases, the cores' chunks.
bool qk_rotated_only_supported(const BatchedParams& p);
// e^Λ ⊙ dy alone, for the reverse chain where the fused core does the rest of the output stage's backward
// (p.core_output) and the chain does not form it itself (Mamba3TrainGpu::set_chain_dye(false)): the output-stage
// backward's values (siso_gate_dy), nothing else written.
void launch_output_dye(cudaStream_t s, const BatchedParams& p);
// Whether the output stage's backward runs a SISO instance (mamba3_train_siso.cu; the ones that can read p.zy16's bf16
// Z and y).
bool output_backward_siso_applies(const BatchedParams& p);
// From S (q·kᵀ) and dWf (dy·vᵀ): the gradients of coef into dLam (added), dgam, dscale (written), and dS = dW ⊙ coef.
void launch_batched_coef(cudaStream_t s, const BatchedParams& p);
// The rest per chunk: dV += D·dy + w ⊙ (K·dHᵀ) (from Z), the state-carry terms of Λ and scale, dadt; per token the
// rotation and bias backward (dBn, dCn, dphi, bias partials), dx and the mimo_x partials. A block takes
// heads_per_block heads of one (sequence, chunk) and writes dBn/dCn summed over them: (M, H / heads_per_block, R, N).
void launch_batched_epilogue(cudaStream_t s, const BatchedParams& p);
// Whether launch_batched_epilogue runs the MIMO instance for p (which p.epilogue_in_core's state core stands in for).
bool epilogue_mimo_applies(const BatchedParams& p);
// Whether launch_batched_output runs the MIMO instance for p (the one that reads p.wv_holds_y's rows).
bool output_mimo_applies(const BatchedParams& p);
// The epilogue's second kernel alone (the rotation backward; launch_batched_epilogue runs both), for callers that do
// the first part another way (the post-scan core, mamba3_train_bwd_core.h).
void launch_batched_rotation_backward(cudaStream_t s, const BatchedParams& p);

// The angle gradient's reverse cumulative sum (→ dθ summed over the heads into dzx's angle columns, Δ's share) and
// the per-token scalar gradients (→ dzx's dt, A, trap columns; dt_bias partials (B, H)).
struct AngleBackwardParams {
  MixerDims d;
  const float* zx;
  const float *dt, *A, *lam, *dAdl, *dsp;  // (B·H, L)
  float* dphi;  // (B·H, L, S) per-token dφ in; the per-angle kernels overwrite it with its sums within segments
  const float *dadt, *dgam, *dscale;
  float* dzx;           // (M, din): the dt, A, trap and angle columns written (the angle ones only without dzx16)
  uint16_t* dzx16;      // (M, din) bf16, the same columns rounded to nearest even (null: not written)
  float* part_dt_bias;  // (B, H)
  float* seg;           // angle_scratch_floats(d): the later segments' sums of dφ
  bool seg_ready;       // seg already holds launch_angle_totals' sums (the rotation backward wrote them)
};
void launch_angle_scalar_backward(cudaStream_t s, const AngleBackwardParams& p);
// Its segment-block form without the dt_bias partial (false: does not apply, nothing launched); dφ is only read.
bool launch_angle_backward_blocks(cudaStream_t s, const AngleBackwardParams& p);
// Its S = 32 form sums Δ's angle shares after each tile's walk ("pass", the default) or by a warp butterfly per
// token and head inside it ("warp"); the same bits. MAMBA3_TRAIN_ANGLE_SHARES (read once) or, process-wide,
// set_angle_shares_in_pass (1 pass, 0 warp, -1 back to the environment's choice) chooses.
void set_angle_shares_in_pass(int mode);
// The sums of dφ over each segment of kAngleSegment tokens into seg (B·H, segments, S), in the one order every angle
// backward path uses for its carries: per angle, the tokens in P phases t ≡ q (mod P) — P = 32, 16, 8, 8, 2, 1 at
// S = 4, 8, 16, 32, 64, 128 —, each phase summed in token order, the phases added in a butterfly (at P = 8:
// ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))); other S: a thread per angle in token order.
void launch_angle_totals(cudaStream_t s, const MixerDims& d, const float* dphi, float* seg);

// Per row: the head slots of dBn/dCn ((M, slots, R, N): one per head, or sums over consecutive heads of a group)
// summed into their B/C groups and the B/C RMSNorm backward (→ dzx's B, C columns, weight partials (M·R·G, N) each).
// slots divides H and is a multiple of G. dzx16 (optional, (M, din) bf16): the columns rounded to nearest even
// there instead of written in f32.
void launch_bc_norm_backward(cudaStream_t s, const MixerDims& d, int slots, const float* bc_raw, const float* B_norm,
                             const float* C_norm, const float* dBn, const float* dCn, float* dzx,
                             float* part_B_norm, float* part_C_norm, uint16_t* dzx16 = nullptr);

// out[c] += Σ_r in[r·cols + c] over rows in a fixed order (deterministic; no atomics). scratch holds
// colsum_scratch_floats(rows, cols) floats.
size_t colsum_scratch_floats(int64_t rows, int64_t cols);
void colsum_add(cudaStream_t s, const float* in, int64_t rows, int64_t cols, float* out, float* scratch);
// Several colsum_adds in two launches (one per level), the same sums in the same order: each job's scratch holds
// colsum_scratch_floats(rows, cols) floats of its own (jobs' scratches must not overlap).
struct ColsumJob {
  const float* in;
  int64_t rows, cols;
  float* out;
  float* scratch;
};
constexpr int kMaxColsumJobs = 12;
void colsum_add_batch(cudaStream_t s, const ColsumJob* jobs, int count);

}  // namespace mamba3::cuda::train_detail
