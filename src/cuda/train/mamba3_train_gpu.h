#pragma once
// The Mamba-3 mixer's training forward and backward on the GPU (f32 inside; the projections through TrainGemm in
// its precision). A port of the CPU's chunked backward (src/ops/mamba3_scan_backward.h, whose comment gives the
// math) over GPU chunks of T tokens (T·R ≤ 64, independent of config.chunk_size: the result is the same up to
// rounding): by default as strided-batched cuBLAS products over all (sequence, head, chunk)s with per-chunk kernels
// between them (docs/kernels/mamba3_train_cuda.md "Batched-GEMM path"); or fused chunk kernels, one thread block per
// (sequence, head, chunk) with the chunk-start states from a scan over chunks (or, sequential schedule, one block per
// (sequence, head) walking its chunks). Every sequence starts from the zero state.
// Deterministic: fixed-order reductions only (no float atomics), so the same inputs give bit-identical gradients.
// Scratch (grow-only, kept between calls) is O(B·L·(d_in + d_inner + H·R·(2N + P) + H·S)) floats for the backward:
// the per-head gradients of the normalised B and C, (B·L, H, R, N) each, are the largest part.
#include <cstdint>
#include <utility>
#include <vector>

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/chunk_ready_counters.h"
#include "cuda/train/phase_profile.h"
#include "cuda/train/train_gemm.h"
#include "ops/mamba3_config.h"

namespace mamba3::cuda {

class PhaseProfile;
namespace train_detail {
struct BatchedParams;
}

// Device pointers (f32) of one mixer's parameters, official names (spec); null where the config has none.
// in_proj16, out_proj16 (optional, the bf16 mode only): the two projection weights already rounded to bf16 (the
// parameter store's mirror), read by their products instead of rounding the f32 weights on every product (the same
// bits); null: rounded as needed.
struct Mamba3TrainWeights {
  const float *in_proj, *out_proj, *dt_bias, *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *D, *B_norm, *C_norm, *norm;
  const uint16_t *in_proj16 = nullptr, *out_proj16 = nullptr;
};
// Gradient destinations, same shapes; ACCUMULATED (+=). Null where the config has none (or where not wanted).
struct Mamba3TrainGrads {
  float *in_proj, *out_proj, *dt_bias, *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *D, *B_norm, *C_norm, *norm;
};

// The forward's activations that the backward reads (the batched chunk path), kept per layer by a trainer that has
// the memory (Mamba3TrainGpu::activation_bytes): in_proj's output (B/C normalised; the raw B/C apart), the scalars and
// angles, the gated output, and the chunk tensors (q, k, v, w ⊙ v, q·kᵀ, W, q·H_cᵀ, W·v, chunk states, chunk scalars).
struct Mamba3TrainActivations {
  // o: the gated output, f32 (o) or, on the batched path in the bf16 mode, only its bf16 rounding (o16: the
  // out_proj products' operand, written by the output kernel).
  // zx16: zx's z and x columns in bf16 (M, 2·d_inner), written by the in_proj instead of zx's own (zx16_used).
  // bc_unrot: the normalised B/C coordinates [N/2, N) again, compact (BatchedParams::bc_unrot; bc_unrot_written).
  DeviceBuffer bc_raw, bc_unrot, zx, zx16, scalars, phi, o, o16, angle_seg, Hc, Hc16, bscal, bQ, bK, bV, bVw, bS, bW,
      bZ, bWV;
  int64_t B = -1, L = -1;
  bool zx16_used = false;  // the last prepare wrote z and x to zx16 (Mamba3TrainGpu::set_zx_bf16)
  bool phi_codes = false;  // the last prepare wrote the angles into phi as codes (Mamba3TrainGpu::set_angle_codes)
  bool valid = false;  // a forward's results, not yet consumed by a backward
  bool chunk_cores = false;  // written by the chunk cores (no S, W)
  bool wv_holds_y = false;   // MIMO: WV holds the pre-norm output y (Mamba3TrainGpu::set_mimo_y)
  bool vw_formed = false;    // bVw not written: its readers form w ⊙ v from v (Mamba3TrainGpu::set_vw_formed)
  bool z_unread = false;     // bZ's Z not written (with vw_formed): the fused core's output part forms Λ's term
  bool qk_rotated_only = false;   // bQ/bK hold only the rotated columns (Mamba3TrainGpu::set_qk_rotated_only)
  bool bc_unrot_written = false;  // the last prepare wrote bc_unrot
  size_t bytes() const {
    size_t n = 0;
    for (const DeviceBuffer* b : {&bc_raw, &bc_unrot, &zx, &zx16, &scalars, &phi, &o,  &o16, &angle_seg, &Hc,
                                  &Hc16,   &bscal,    &bQ, &bK,   &bV,      &bVw, &bS, &bW,  &bZ,        &bWV})
      n += b->bytes();
    return n;
  }
};

class Mamba3TrainGpu {
 public:
  // Throws mamba3::Error for configs the kernels do not handle (MIMO rank > 4, more than 256 rotary angles).
  explicit Mamba3TrainGpu(const Mamba3Config& c);
  const Mamba3Config& config() const { return c_; }

  // out (B·L, d_model) f32 = mixer(u), u (B·L, d_model) f32, every sequence from the zero state (training).
  // keep (optional): where the forward leaves its activations for the backward of the same layer (see backward).
  // u16 (optional, used in the bf16 mode only): u rounded to bf16 by its producer, which the in_proj product then
  // reads instead of rounding u again (u may be null there).
  // out16 (optional, the bf16 mode only): out_proj's result rounded once to bf16 there instead of f32 into out (out
  // may then be null), as PyTorch autocast's linear gives it — for a consumer that reads bf16 (the residual step).
  void forward(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t B, int64_t L,
               const float* u, float* out, Mamba3TrainActivations* keep = nullptr, const uint16_t* u16 = nullptr,
               uint16_t* out16 = nullptr);
  // Gradients of sum(out ⊙ dout): du (B·L, d_model) overwritten; parameter grads accumulated. Recomputes what it
  // needs from u (nothing is kept from forward). Deterministic: no float atomics; same inputs → bit-identical grads.
  // kept (optional): the activations a forward of this layer on the same u left there; the batched chunk path then
  // starts from them instead of recomputing the forward (in_proj, the chunk products and scan), and consumes them
  // (a second backward recomputes). Without it, or with the fused path, everything is recomputed from u.
  // dout16 (optional, bf16 mode): dout's rounding written by its producer, read instead of rounding dout again.
  // du16 (optional, the bf16 mode only): du rounded once to bf16 there by its product instead of f32 into du (du may
  // then be null), as autocast's linear backward gives it.
  void backward(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, const Mamba3TrainGrads& g,
                int64_t B, int64_t L, const float* u, const float* dout, float* du,
                Mamba3TrainActivations* kept = nullptr, const uint16_t* u16 = nullptr,
                const uint16_t* dout16 = nullptr, uint16_t* du16 = nullptr);
  // The bytes a Mamba3TrainActivations holds after a forward of B × L tokens with the batched chunk path, its product
  // operands in `precision`'s element size (F32 gives an upper bound for both modes).
  int64_t activation_bytes(int64_t B, int64_t L, Precision precision = Precision::F32) const;

  // The GPU chunk length (tokens) used for sequences of length L: the largest T ≤ 64/R (and ≤ L, and ≤
  // MAMBA3_TRAIN_CHUNK_LEN when set: a tuning knob read once per process) whose shared-memory tiles fit the device.
  // Needs a device.
  int chunk_length(int64_t L, bool backward);

  // Chunk path of the bf16 mode: true runs the chunk kernels' products on tensor cores (mma.sync, operands rounded to
  // bf16, f32 accumulation, states kept f32), false the exact f32 products. Only used when the TrainGemm runs in
  // Precision::BF16 (the f32 mode is always exact). Default from MAMBA3_TRAIN_CHUNK, read once per process: "tc" or
  // "f32" (unset: f32); any other value throws.
  void set_chunk_tensor_cores(bool on) { chunk_tc_ = on; }
  bool chunk_tensor_cores() const { return chunk_tc_; }

  // Schedule of the chunk kernels: true (default) runs them chunk-parallel (one block per (sequence, head, chunk);
  // the chunk-start states and the incoming state gradients come from an elementwise scan over chunks; extra scratch
  // of B·H·chunks·P·N floats for the latter), false walks each (sequence, head)'s chunks in one block. The f32
  // results are bit-identical between the two except the parameter gradients summed over tokens (B/C biases, D,
  // mimo_*, norm), whose partials are summed in another order. Default from MAMBA3_TRAIN_SCAN, read once per process:
  // "parallel" or "sequential" (unset: parallel); any other value throws.
  void set_chunk_scan_parallel(bool on) { chunk_parallel_ = on; }
  bool chunk_scan_parallel() const { return chunk_parallel_; }

  // Chunk path: true runs the chunked form as strided-batched cuBLAS products over every (sequence, head, chunk) with
  // small per-chunk kernels between them (mamba3_train_batched.cu; f32 products in the f32 mode; in the bf16 mode the
  // products' operands are stored in bf16 and run on tensor cores, f32 accumulation; T·R = 64 rows per chunk, MAMBA3_TRAIN_BATCHED_ROWS; the chunk schedule, tensor-core and
  // blocks-per-SM switches do not apply);
  // false the fused chunk kernels. Default from MAMBA3_TRAIN_CHUNK_PATH, read once per process: "batched" or "fused"
  // (unset: batched); any other value throws.
  void set_chunk_batched(bool on) { chunk_batched_ = on; }
  bool chunk_batched() const { return chunk_batched_; }
  // The batched path's backward in the bf16 mode: true (default) has the kernels that write dzx (in_proj's output
  // gradient: the output stage its z columns, the epilogue x, the angle/scalar backward dt, A, trap and the angles,
  // the B/C norm backward B, C) write its bf16 rounding instead of the f32 values (dt, A and trap in both), which
  // du = dzx·W_in and dW_in += dzxᵀ·u read; false writes dzx in f32 and rounds it for them afterwards
  // (TrainGemm::HeldA). The same bits either way.
  void set_dzx_bf16(bool on) { dzx_bf16_ = on; }
  bool dzx_bf16() const { return dzx_bf16_; }
  // Whether the last backward's in_proj products read the producers' bf16 dzx (false: dzx rounded afterwards).
  bool last_backward_read_dzx16() const { return dzx16_read_; }
  // The batched path in the bf16 mode, SISO: true (default) has in_proj write its z and x columns rounded to bf16 (as
  // autocast's linear gives its whole output; the other columns, B, C, dt, A, trap and the angles, stay f32 by a
  // second product over those weight rows) and the backward's dO = dout·W_out rounded to bf16, both read so by the
  // chunk kernels: half of those bytes written and read (125M step −0.7 ms on an H200). false: both f32 (the chunk
  // kernels round only their product operands). MIMO keeps them f32 either way: its D gradient moved to 2.6e-2 from
  // the CPU's f32 on a test case (1.2e-2 with f32 z, x, dO; the bf16 bound is 2e-2) for a 1 % faster step.
  // Default from MAMBA3_TRAIN_ZX16, read once per process: "1" or "0" (unset: 1).
  void set_zx_bf16(bool on) { zx_bf16_ = on; }
  bool zx_bf16() const { return zx_bf16_; }

  // The batched path's epilogue: heads per block (each block sums its heads' B/C gradients before writing them; must
  // divide the heads of a B/C group); 0 = MAMBA3_TRAIN_EPILOGUE_HEADS, read once per process (unset or 0: the largest
  // divisor up to 4). Only the order of the sums over heads changes with it.
  void set_epilogue_heads(int heads) { epilogue_heads_ = heads; }
  int epilogue_heads() const;
  // Whether prepare writes the compact copy of B/C's unrotated coordinates (set_qk_rotated_only, SISO, the bf16 mode).
  bool writes_bc_unrot(bool bf16) const;

  // The batched path's chunk cores in the bf16 mode: true runs the forward's S, mask, Z and WV and the backward's dW,
  // coef, dV, dQ, dK's first term and G as one tensor-core kernel per chunk each (mamba3_train_fwd_core.h,
  // mamba3_train_bwd_core.h; the shapes they support), false as batched products with the mask and coef kernels.
  // Default from MAMBA3_TRAIN_CHUNK_CORE, read once per process: "fused" or "products" (unset: fused).
  void set_chunk_cores(bool fused) { chunk_cores_ = fused; }
  // The SISO instances of the batched path's build, rotation backward and output-stage backward and the MIMO instance
  // of its build (true, where their shapes apply) or the generic kernels (false): the same arithmetic and sums.
  void set_siso_kernels(bool on) { siso_kernels_ = on; }
  // The SISO output-stage backward's tokens in flight per warp: 2 (each warp loads two tokens before finishing
  // either) or 1; the same bits. With 2, MIMO's output forward (y stored by the forward core) has all of a warp's
  // tokens in flight too. Default from MAMBA3_TRAIN_OUTPUT_TOKENS, read once per process: "2" or "1".
  void set_output_tokens(int tokens) { output_tokens_ = tokens == 1 ? 1 : 2; }
  // The SISO build's path for full chunks (true) or its general loop everywhere (false); the same bits. Default from
  // MAMBA3_TRAIN_BUILD_FAST, read once per process: "1" or "0".
  void set_build_fast(bool on) { build_fast_ = on; }
  // The SISO output-stage backward's kernel for whole chunks (true, where the step's configuration allows it) or its
  // general kernel (false). Default from MAMBA3_TRAIN_OUTPUT_FULL, read once per process: "1" or "0".
  void set_output_full(bool on) { output_full_ = on; }
  void set_rotation_prefetch(bool on) { rotation_prefetch_ = on; }
  // The SISO rotation backward at N 128 with a lane on the rotary pairs l and l + 32 (true) or on four consecutive
  // elements (false); the same bits. Default from MAMBA3_TRAIN_ROTATION_SPLIT, read once per process: "1" or "0".
  void set_rotation_split(bool on) { rotation_split_ = on; }
  // With the split lanes: a warp's next token loaded into registers while it works on the current one (true) or not
  // (false); the same bits. Default from MAMBA3_TRAIN_ROTATION_PIPE, read once per process: "1" or "0".
  void set_rotation_pipe(bool on) { rotation_pipe_ = on; }
  // The bf16 mode's batched path keeps the rotary angles as 16-bit codes (wrap(φ) in steps of 2π/65536, within
  // 4.8e-5 of φ; half of φ's bytes, written once and read by the build and the rotation backward) (true) or in f32
  // (false). Default from MAMBA3_TRAIN_ANGLE_CODES, read once per process: "1" or "0".
  void set_angle_codes(bool on) { angle_codes_ = on; }
  // Whether the last forward's angles were written as codes.
  bool angle_codes_used() const { return act_ != nullptr && act_->phi_codes; }
  // The SISO rotation backward also summing dφ over each angle segment for the angle backward (true, where
  // train_detail::rotation_backward_writes_angle_totals holds: its chunks are the segments, S 16 or 32), so that the
  // angle backward's totals kernel does not run; or that kernel (false). The same bits. Default from
  // MAMBA3_TRAIN_ROTATION_TOTALS, read once per process: "1" or "0" (unset: 0, the same step time on an H100).
  void set_rotation_totals(bool on) { rotation_totals_ = on; }
  // Whether the last backward's rotation backward wrote them.
  bool last_backward_rotation_totals() const { return angle_seg_ready_; }
  void set_zy16(bool on) { zy16_ = on; }
  // Whether the last chunk pass kept Z and y in bf16 (set_zy16 and its shapes).
  bool zy16_used() const { return zy16_used_; }
  // The SISO fused backward core runs the output stage's backward itself where it applies (default from
  // MAMBA3_TRAIN_CORE_OUTPUT, on); the same bits as the output-stage kernel.
  void set_core_output(bool on) { core_output_ = on; }
  // The SISO forward leaves w ⊙ v to its readers (the forward chain, the fused core with the output part) instead of
  // the build writing it, where it applies (default from MAMBA3_TRAIN_VW_FORMED, on); the same bits.
  void set_vw_formed(bool on) { vw_formed_ = on; }
  // With the fused core's output part, the reverse chain forms e^Λ ⊙ dy from dO and z itself (default from
  // MAMBA3_TRAIN_CHAIN_DYE, on) instead of a kernel writing it first; the same bits.
  void set_chain_dye(bool on) { chain_dye_ = on; }
  // With the reverse chain forming e^Λ ⊙ dy and the output part in the fused core, the fused core runs beside the
  // reverse chain (launched while it runs, each chunk waiting for the chain's counter of its dH) instead of after it
  // (default from MAMBA3_TRAIN_CORE_BESIDE, off until measured); the same bits.
  void set_core_beside(bool on) { core_beside_ = on; }
  // Whether the last backward's fused core did (set_core_beside and its configuration).
  bool core_beside_used() const { return core_beside_used_; }
  // The fused core with the output part (8 warps) copies the state tiles H_c and dH in its phases' own groups, each
  // waited for just before the phase's first product that reads it, instead of with the other tiles before the first
  // barrier (default from MAMBA3_TRAIN_CORE_STAGED, off until measured); the same bits.
  void set_core_staged(bool on) { core_staged_ = on; }
  // Whether the last backward's fused core did (set_core_staged and its configuration).
  bool core_staged_used() const { return core_staged_used_; }
  // With the forward walk in the bf16 mode and out_proj's bf16 weight mirror, out_proj runs beside the walk — its own
  // product of 64-row tiles, each waiting for the walk's counter of its (sequence, chunk) — instead of after it
  // (default from MAMBA3_TRAIN_OUT_PROJ_BESIDE, off until measured); out to rounding (another summation order than
  // cuBLAS's), the backward the same bits.
  void set_out_proj_beside(bool on) { out_proj_beside_ = on; }
  // Whether the last forward did (set_out_proj_beside and its configuration).
  bool out_proj_beside_used() const { return out_proj_beside_used_; }
  // Whether the last chunk pass's forward did (set_vw_formed and its configuration).
  bool vw_formed_used() const { return vw_formed_used_; }
  // The SISO build stores only q's and k's rotated columns (rope_fraction 0.5: the upper half of the state passes
  // unrotated) and the chains and cores form the others from zx's B/C rows and the biases, where the fused backward
  // core is expected (default from MAMBA3_TRAIN_QK_ROTATED_ONLY, off: no step gain measured); the same bits.
  void set_qk_rotated_only(bool on) { qk_rotated_only_ = on; }
  // Whether the last chunk pass's forward did (set_qk_rotated_only and its configuration).
  bool qk_rotated_only_used() const { return qk_rotated_only_used_; }
  // The SISO build writes only q, and one kernel per sequence-head forms k and v and runs the forward state chain on
  // them (launch_kv_chain) instead of the build writing k and v for the chain to read back, where it applies (default
  // from MAMBA3_TRAIN_KV_CHAIN: on, as the walk); the same bits.
  void set_kv_chain(bool on) { kv_chain_ = on; }
  // With the kv chain, q's build runs beside it (the chain first, its dependents triggered at its start) instead of
  // before it (default from MAMBA3_TRAIN_KV_CHAIN: "beside"); the same bits.
  void set_kv_chain_beside(bool on) { kv_chain_beside_ = on; }
  // With the kv chain, it forms q too and no build kernel runs (MAMBA3_TRAIN_KV_CHAIN=q); the same bits. Takes
  // precedence over set_kv_chain_beside.
  void set_kv_chain_q(bool on) { kv_chain_q_ = on; }
  // With the kv chain, the forward core's work joins it (launch_fwd_walk: one kernel per sequence-head from the chunk
  // scalars to o16) where it applies (default from MAMBA3_TRAIN_KV_CHAIN: on unless another form is set); the same
  // bits. Takes precedence over set_kv_chain_q and set_kv_chain_beside.
  void set_kv_chain_walk(bool on) { kv_chain_walk_ = on; }
  // Whether the last chunk pass's forward did (set_kv_chain_walk and its configuration).
  bool fwd_walk_used() const { return fwd_walk_used_; }
  // Whether the last chunk pass's forward did (set_kv_chain and its configuration).
  bool kv_chain_used() const { return kv_chain_used_; }
  // Whether the last backward's fused core did (set_core_output and its configuration).
  bool core_output_used() const { return core_output_used_; }
  // MIMO with the state core, where the epilogue's MIMO instance would run: the core runs the epilogue's state part
  // itself from tp and dv in registers (true) instead of storing tp and dV for the epilogue kernel to read back with V,
  // dy and both chunk states (false). dv and dx the same bits; Σ_p v·tp, ⟨dH, H_c⟩ and the mimo_x partials in other
  // orders. Default from MAMBA3_TRAIN_MIMO_EPILOGUE, read once per process: "core" or "kernel".
  void set_mimo_epilogue_in_core(bool on) { mimo_epilogue_in_core_ = on; }
  // Whether the last backward ran it in the core (set_mimo_epilogue_in_core and its shapes).
  bool mimo_epilogue_in_core_used() const { return mimo_epilogue_in_core_used_; }
  // MIMO with the cores and the output stage's MIMO instance: the forward core stores the pre-norm output
  // y = (e^Λ·Z + D·v) + W·v for the output stage (true) instead of W·v, from which it forms y (false): the same bits,
  // and the output stage's forward reads y alone. Default from MAMBA3_TRAIN_MIMO_Y, read once per process: "1" or
  // "0". A kept forward's choice holds for its backward.
  void set_mimo_y(bool on) { mimo_y_ = on; }
  // Whether the last chunk pass did (set_mimo_y and its shapes).
  bool mimo_y_used() const { return mimo_y_used_; }
  bool chunk_cores() const { return chunk_cores_; }
  // With the cores, the chunk states forward and backward as one chain kernel each (launch_state_chain: the products
  // and the scan, bf16 states only; true) or as products and a scan pass (false). The reverse gives the same bits,
  // the forward's products sum in another order (to rounding). Default from MAMBA3_TRAIN_STATE_CHAIN, read once per
  // process: "chain" or "pass" (unset: chain).
  void set_state_chain(bool on) { state_chain_ = on; }
  // With the state chains and the post-scan core's shapes (SISO), the backward core and the post-scan core as one
  // kernel after the reverse chain (true) or as two around it (false): the same bits. MIMO: the backward core after
  // the reverse chain with the state products tp and dK's second term in it (true; to rounding) or those as batched
  // products (false). Default from MAMBA3_TRAIN_BACKWARD_CORE, read once per process: "fused" or "split" (unset:
  // fused).
  void set_backward_core_fused(bool on) { backward_core_fused_ = on; }
  // With the SISO cores (fused or split) or MIMO's state core, and the rotation backward's instances, dQ and dK written
  // by the cores in bf16 and read so by the rotation backward (true), or in f32 (false): half their bytes, to bf16
  // rounding. Default from MAMBA3_TRAIN_DQK16, read once per process: "1" or "0" (unset: 1).
  void set_dqk16(bool on) { dqk16_ = on; }
  // The batched path's SISO rotation backward running the B/C norm backward itself (true: one block per (sequence,
  // group, chunk) sums every head's B/C gradients in shared memory, no dBn/dCn round trip and no separate kernel) or
  // writing dBn/dCn per head slot for bc_norm_backward (false). The same sums in the same order. Default from
  // MAMBA3_TRAIN_BC_NORM_FUSED, read once per process: "1" or "0" (unset: 1).
  void set_bc_norm_fusion(bool on) { bc_norm_fusion_ = on; }
  // Whether the last backward's rotation backward ran the B/C norm backward (set_bc_norm_fusion, where it applies).
  bool last_backward_fused_bc_norm() const { return bc_norm_fused_; }
  // The SISO fused backward core un-rotating dQ and dK and forming dφ itself, the rotation backward only summing the
  // heads' gradients (true, where train_detail::fused_core_unrotate_supported holds: bf16 dQ/dK, the B/C norm inside
  // the rotation backward, the rotating columns within the core's first 64), or the rotation backward doing both
  // (false). To bf16 rounding (dQ and dK are un-rotated before their rounding instead of after). Default from
  // MAMBA3_TRAIN_CORE_UNROTATE, read once per process: "0", "1" or "heads" (also set_core_head_sum; unset: 0).
  void set_core_unrotate(bool on) { core_unrotate_ = on; }
  // Whether the last backward's fused core did (set_core_unrotate, where it applies).
  bool last_backward_core_unrotated() const { return core_unrotated_; }
  // With set_core_unrotate, the fused core also summing dQ/dK over clusters of 8 heads of a B/C group into the B/C norm
  // backward's slots and writing the bias partials, with no rotation backward (true, where
  // train_detail::fused_core_head_sum_supported holds: a multiple of 8 heads per group, the 8-warp block), or not
  // (false). To rounding (the heads' sums in another order). Default: MAMBA3_TRAIN_CORE_UNROTATE=heads. It applies
  // only where the un-rotating core does, which includes the B/C norm backward inside the rotation backward
  // (set_bc_norm_fusion) although the head sum then runs that norm's own kernel.
  void set_core_head_sum(bool on) { core_head_sum_ = on; }
  bool last_backward_core_head_summed() const { return core_head_summed_; }
  // Tests: the backward's per-token dφ, dBn and dCn buffers (empty before the first backward), to poison between a
  // forward and a backward so that an element their writers leave out shows as NaN in the gradients.
  std::vector<DeviceBuffer*> backward_scratch_for_tests() { return {&dphi_, &dBn_, &dCn_}; }
  // Tests: the forward's q, k, v, chunk states, y (bf16 with the cores' output stage) and o16 buffers as the last
  // forward left them (empty before the first), to name the tensor a path changed when its bits differ.
  std::vector<std::pair<const char*, const DeviceBuffer*>> forward_buffers_for_tests() const {
    if (!act_) return {};
    return {{"Q", &act_->bQ},      {"K", &act_->bK},   {"V", &act_->bV},
            {"Hc16", &act_->Hc16}, {"WV", &act_->bWV}, {"o16", &act_->o16}};
  }
  // Whether the batched path runs the cores for sequences of length L in this precision mode (switch and shapes).
  bool uses_chunk_cores(bool bf16, int64_t L) const;

  // Register variant of the chunk-parallel schedule's per-chunk kernels (the output kernel of the training forward
  // and of backward pass 1, the reverse kernel): 1 the plain ones (__launch_bounds__(256), up to 255 registers), 2
  // the __launch_bounds__(256, 2) ones (≤ 128 registers, so that two 256-thread blocks can share an SM), 0 (auto)
  // the two-block reverse kernel where two blocks' shared memory fits an SM at the chunk length in use (at the
  // default chunk length of N 128, P 64 it does not: one block per SM) in the f32 chunk path, and otherwise the plain
  // kernels (the output kernels and the tensor-core reverse kernel already fit two blocks' registers, and nvcc gives
  // their two-block variants more). Forcing 2 where the tiles do not fit
  // still runs, one block per SM. Auto never changes the chunk length: shorten it with MAMBA3_TRAIN_CHUNK_LEN to
  // reach two reverse blocks. Only the register allocation differs: results are bit-identical across the choices.
  // Default from MAMBA3_TRAIN_CHUNK_BLOCKS, read once per process: "auto", "1" or "2" (unset: auto); any other value
  // throws.
  void set_chunk_blocks_per_sm(int blocks);
  int chunk_blocks_per_sm() const { return chunk_blocks_; }
  // The variant (1 or 2) of the f32 reverse kernel the parallel schedule's backward launches for sequences of
  // length L under the current setting (the tensor-core one: 1 under auto). Needs a device.
  int chunk_reverse_blocks(int64_t L);
  // The training forward's chunk length and output-kernel variant (blocks: 1 or 2) for sequences of length L: under
  // auto in the parallel schedule, the longest chunk of at least half chunk_length(L, false) whose tiles let two
  // blocks share an SM (N 128, P 64: 46 tokens instead of 64); otherwise chunk_length(L, false) and the variant the
  // setting names. (The backward keeps chunk_length(L, true): it recomputes the forward, so the forward's chunking
  // changes only the rounding of its output.) Needs a device.
  int forward_chunk_length(int64_t L, int& blocks);

 private:
  // in_proj, B/C normalisation, per-token scalars and angles (shared by forward and backward).
  void prepare(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t B, int64_t L,
               const float* u, const uint16_t* u16, PhaseProfile* prof = nullptr);
  // The gated output kept only as bf16 (act_->o16): the batched path in the bf16 mode.
  bool o_in_bf16(const TrainGemm& gemm) const { return chunk_batched_ && gemm.precision() == Precision::BF16; }
  // z, x and dO in bf16 (set_zx_bf16): the batched path in the bf16 mode with the switch on, SISO.
  bool zx_in_bf16(const TrainGemm& gemm) const { return o_in_bf16(gemm) && zx_bf16_ && !c_.is_mimo; }
  // out (B·L, d_model) = o·W_outᵀ from act_'s o or o16.
  void out_projection(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t M, float* out,
                      uint16_t* out16);

  // The batched path (chunk_batched_): the chunked forward into o (and, with `backward`, everything the backward's
  // chunk stage produces: dz/dx columns of dzx_, dBn_, dCn_, dphi_, sgrad_, the chunk partials at part_ offsets).
  struct PartOffsets {
    int64_t D, B_bias, C_bias, mimo_x, mimo_z, mimo_o, norm, B_norm, C_norm;
  };
  // reuse: the forward part's results are already in act_ (kept activations): the backward part only.
  void batched_chunks(const Context& ctx, bool bf16, const Mamba3TrainWeights& w, int64_t B, int64_t L, bool backward,
                      const PartOffsets* parts, PhaseProfile& prof, bool reuse = false);
  // The batched backward's products from dW to G with the coef kernel between them (the backward core's fallback):
  // dWf, coef (dS, dLam, dgam, dscale), dV, dQ, dK's first term, and G into dHc's slot before each chunk.
  void batched_backward_products(const Context& ctx, bool bf16, const train_detail::BatchedParams& p,
                                 const void* Hc_op, float* dHc, int64_t BHc, PhaseProfile& prof);
  // The fused path's chunk stage of the backward (chunk length T), with the same outputs.
  void fused_chunks_backward(const Context& ctx, bool bf16, const Mamba3TrainWeights& w, int64_t B, int64_t L, int T,
                             const PartOffsets& parts);
  // Chunk length (tokens) of the batched path: 64/R rows per chunk, at most L.
  int batched_chunk_length(int64_t L) const;

  // Queries the device's shared-memory limits on first use.
  void query_device();
  // The reverse kernel's variant (1 or 2) at chunk length T under chunk_blocks_.
  int reverse_blocks(int T);


  Mamba3Config c_;
  int max_smem_ = 0;  // opt-in shared memory per block of the device (queried on first use)
  int sm_smem_ = 0;   // shared memory per SM of the device (queried on first use)
  int smem_reserved_ = 0;  // shared memory the device reserves per resident block (queried on first use)
  int chunk_blocks_ = 0;  // register variant of the parallel chunk kernels: 0 auto, 1, 2 (set_chunk_blocks_per_sm)
  bool chunk_tc_ = false;  // tensor-core chunk products in the bf16 mode (set_chunk_tensor_cores)
  bool chunk_parallel_ = true;  // chunk-parallel schedule (set_chunk_scan_parallel)
  bool chunk_batched_ = true;   // batched-GEMM chunk path (set_chunk_batched)
  int epilogue_heads_ = 0;      // the batched epilogue's heads per block, 0 auto (set_epilogue_heads)
  bool chunk_cores_ = true;     // the fused chunk cores where supported (set_chunk_cores)
  bool siso_kernels_ = true;    // SISO instances of the elementwise chunk kernels (set_siso_kernels)
  bool state_chain_ = true;     // the chunk states by the chain kernels with the cores (set_state_chain)
  bool backward_core_fused_ = true;  // the backward and post-scan cores as one kernel (set_backward_core_fused)
  bool dqk16_ = true;                // dQ and dK in bf16 between the SISO cores and the rotation backward (set_dqk16)
  bool bc_norm_fusion_ = true;       // the B/C norm backward inside the SISO rotation backward (set_bc_norm_fusion)
  int output_tokens_ = 2;            // the SISO output-stage backward's tokens in flight per warp (set_output_tokens)
  bool build_fast_ = true;           // the SISO build's path for full chunks (set_build_fast)
  bool output_full_ = true;          // the SISO output-stage backward's kernel for whole chunks (set_output_full)
  bool rotation_prefetch_ = true;    // the SISO rotation backward's L2 prefetch (set_rotation_prefetch)
  bool rotation_split_ = true;       // its lane map at N 128 (set_rotation_split)
  bool rotation_pipe_ = true;        // its next token in registers (set_rotation_pipe)
  bool angle_codes_ = true;          // the bf16 batched path's angles as 16-bit codes (set_angle_codes)
  bool rotation_totals_ = false;     // ... and its angle segment sums (set_rotation_totals)
  bool angle_seg_ready_ = false;     // the last backward's rotation backward wrote them (batched_chunks)
  bool core_unrotate_ = false;       // the fused core un-rotates dQ/dK and forms dφ (set_core_unrotate)
  bool core_unrotated_ = false;      // the last backward's did (last_backward_core_unrotated)
  bool core_head_sum_ = false;       // ... and sums over clusters of 8 heads (set_core_head_sum)
  bool core_head_summed_ = false;    // the last backward's did (last_backward_core_head_summed)
  bool zy16_ = true;                 // Z and y in bf16 between the SISO forward core and output backward (set_zy16)
  bool zy16_used_ = false;           // the last chunk pass did (zy16_used)
  bool core_output_ = true;          // the output stage's backward inside the fused core (set_core_output)
  bool core_output_used_ = false;    // the last backward's fused core ran it (core_output_used)
  bool vw_formed_ = true;            // w ⊙ v formed by its readers (set_vw_formed)
  bool chain_dye_ = true;            // the reverse chain forms e^Λ ⊙ dy (set_chain_dye)
  bool core_beside_ = false;         // the fused core beside the reverse chain (set_core_beside)
  bool core_beside_used_ = false;    // the last backward's did (core_beside_used)
  bool core_staged_ = false;         // the fused core's state tiles in its phases' own copies (set_core_staged)
  bool core_staged_used_ = false;    // the last backward's did (core_staged_used)
  bool out_proj_beside_ = false;     // out_proj beside the forward walk (set_out_proj_beside)
  bool out_proj_beside_used_ = false;  // the last forward's did (out_proj_beside_used)
  bool vw_formed_used_ = false;      // the last chunk pass's forward did (vw_formed_used)
  bool qk_rotated_only_ = false;     // q and k stored in part, formed in part by their readers (set_qk_rotated_only)
  bool qk_rotated_only_used_ = false;  // the last chunk pass's forward did (qk_rotated_only_used)
  bool kv_chain_ = true;               // k, v and the forward chain in one kernel (set_kv_chain)
  bool kv_chain_used_ = false;         // the last chunk pass's forward did (kv_chain_used)
  bool kv_chain_beside_ = false;       // q's build beside the kv chain (set_kv_chain_beside)
  bool kv_chain_q_ = false;            // the kv chain forms q too (set_kv_chain_q)
  bool kv_chain_walk_ = true;          // the kv chain with the forward core's work (set_kv_chain_walk)
  bool fwd_walk_used_ = false;         // the last chunk pass's forward did (fwd_walk_used)
  bool qk_head_order_ = true;          // with it, the cores take a chunk's heads in consecutive blocks
  bool mimo_epilogue_in_core_ = true;  // MIMO's state core runs the epilogue's state part (set_mimo_epilogue_in_core)
  bool mimo_epilogue_in_core_used_ = false;  // the last backward did (mimo_epilogue_in_core_used)
  bool mimo_y_ = true;               // MIMO's forward core stores y for the output stage (set_mimo_y)
  bool mimo_y_used_ = false;         // the last chunk pass did (mimo_y_used)
  bool bc_norm_fused_ = false;       // the last backward's rotation backward ran it (batched_chunks)
  // Forward activations (Mamba3TrainActivations): the caller's kept set or own_; act_ points at the one in use.
  Mamba3TrainActivations own_;
  Mamba3TrainActivations* act_ = &own_;
  // Backward: dO (M, d_inner), dzx (M, d_in), dy (B·H, L, R, P), Hc (B·H, chunks, P, N), dBn/dCn (M, H, R, N),
  // dphi (B·H, L, S), dadt/dgam/dscale 3 × (B·H, L), per-row/per-(b, h[, chunk]) partials, colsum
  // scratch. Parallel schedule (forward too): Hc, decay (B·H, chunks); backward also dHc (B·H, chunks, P, N).
  DeviceBuffer dO_, dzx_, dy_, dHc_, decay_, dBn_, dCn_, dphi_, sgrad_, part_, colsum_;
  // Batched path (BatchedParams), backward only: dLam (B·H·nc, T); dq, dk (rows, N) and dy, e^Λ ⊙ dy, dv (rows, P)
  // per chunk; dW (f32) and dS (operand type), (rows, rows) per chunk; the bf16 copy of dHc (bf16 mode).
  DeviceBuffer bdLam_, bdY_, bdYe_, bdQ_, bdK_, bdQK16_, bdV_, bdWf_, bdS_, dHc16_;
  // The reverse chain's per-chunk counters for the fused core beside it (BatchedParams::chain_ready).
  train_detail::ChunkReadyCounters chain_ready_;
  // The forward walk's per-(sequence, chunk) counters for out_proj beside it, whether forward() asks for them this
  // call, and whether the walk took them.
  train_detail::ChunkReadyCounters walk_ready_;
  bool walk_ready_wanted_ = false, walk_ready_used_ = false;
  // dzx's bf16 copy (M, d_in), written by its producers (set_dzx_bf16). backward() offers it to the chunk stage in
  // dzx16_offer_, for batched_chunks to take into BatchedParams::dzx16 (`p.dzx16 = std::exchange(dzx16_offer_,
  // nullptr);`), and only if it was taken (the z and x columns written) do the other producers write theirs and the
  // products read it; else dzx is written in f32 and rounded after the fact (HeldA), so a chunk stage that does not
  // take it costs the saving, never correctness.
  DeviceBuffer dzx16_;
  uint16_t* dzx16_offer_ = nullptr;
  // dO's bf16 rounding (M, d_inner) in place of dO_ (zx_in_bf16); dO16_used_: the backward in progress wrote it.
  DeviceBuffer dO16_;
  bool dO16_used_ = false;
  bool zx_bf16_ = true;      // set_zx_bf16
  bool dzx_bf16_ = true;     // set_dzx_bf16
  bool dzx16_read_ = false;  // last_backward_read_dzx16
};

}  // namespace mamba3::cuda
