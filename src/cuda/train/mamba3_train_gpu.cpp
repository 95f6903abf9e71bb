// Orchestration of the Mamba-3 mixer's GPU training pass: projections through TrainGemm, then the per-token, chunk
// and reduction kernels (mamba3_train_token.cu, mamba3_train_chunk.cu) in stream order. No host round trips.
#include "cuda/train/mamba3_train_gpu.h"

#include <algorithm>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "cuda/env_switch.h"
#include "cuda/train/mamba3_train_bwd_core.h"
#include "cuda/train/mamba3_train_fwd_core.h"
#include "cuda/train/mamba3_train_kernels.h"
#include "cuda/train/mamba3_train_state_chain.h"
#include "cuda/train/out_proj_beside.h"
#include "cuda/train/phase_profile.h"

namespace mamba3::cuda {

using namespace train_detail;

namespace {

MixerDims make_dims(const Mamba3Config& c, int64_t B, int64_t L) {
  MAMBA3_CHECK(B <= std::numeric_limits<int>::max() && L <= std::numeric_limits<int>::max() &&
                   B * c.nheads() <= std::numeric_limits<int>::max() && B * L <= std::numeric_limits<int>::max(),
               "Mamba3TrainGpu: batch {} × length {} too large", B, L);
  MixerDims d{};
  d.B = int(B), d.L = int(L), d.H = int(c.nheads()), d.P = int(c.headdim), d.N = int(c.d_state);
  d.R = int(c.rank()), d.G = int(c.ngroups), d.S = int(c.num_angles()), d.din = int(c.d_in_proj());
  d.d_inner = int(c.d_inner());
  d.off_x = int(c.off_x()), d.off_B = int(c.off_B()), d.off_C = int(c.off_C()), d.off_dt = int(c.off_dt());
  d.off_A = int(c.off_A()), d.off_trap = int(c.off_trap()), d.off_ang = int(c.off_angles());
  d.mimo = c.is_mimo, d.euler = c.euler, d.no_rotary = c.no_rotary;
  d.heavy_tail = c.a_activation == AActivation::HeavyTail, d.outnorm = c.is_outproj_norm;
  d.A_floor = float(c.A_floor);
  return d;
}

void check_weights(const Mamba3Config& c, const Mamba3TrainWeights& w) {
  MAMBA3_CHECK(w.in_proj && w.out_proj && w.dt_bias && w.B_bias && w.C_bias && w.D && w.B_norm && w.C_norm,
               "Mamba3TrainGpu: a required weight pointer is null");
  MAMBA3_CHECK(!c.is_mimo || (w.mimo_x && w.mimo_z && w.mimo_o), "Mamba3TrainGpu: MIMO needs mimo_x, mimo_z, mimo_o");
  MAMBA3_CHECK(!c.is_outproj_norm || w.norm, "Mamba3TrainGpu: is_outproj_norm needs norm.weight");
}

// MAMBA3_TRAIN_CHUNK, read once per process: the bf16 mode's chunk products on tensor cores ("tc") or in f32 ("f32",
// the default while the tensor-core path is validated).
bool env_chunk_tensor_cores() {
  static const bool tc = env_choice("MAMBA3_TRAIN_CHUNK", {"f32", "tc"}) == "tc";
  return tc;
}

// MAMBA3_TRAIN_SCAN, read once per process: the chunk kernels' schedule, chunk-parallel ("parallel", the default) or
// one block walking each (sequence, head)'s chunks ("sequential").
bool env_chunk_scan_parallel() {
  static const bool par = env_choice("MAMBA3_TRAIN_SCAN", {"parallel", "sequential"}) != "sequential";
  return par;
}

// MAMBA3_TRAIN_CHUNK_LEN, read once per process: an upper bound on the GPU chunk length in tokens (unset: none), a
// tuning knob for the chunk-parallel schedule, where shorter chunks cost no sequential steps and smaller tiles fit more
// blocks per SM (at the price of B·H·chunks·P·N floats of chunk states).
int env_max_chunk_length() {
  static const int cap = int(env_integer("MAMBA3_TRAIN_CHUNK_LEN", 64, 1, 64));
  return cap;
}

// MAMBA3_TRAIN_BATCHED_ROWS, read once per process: the batched path's rows per chunk (T·R; unset: 64; at most 128,
// the coef kernel's two rows × rows tiles in shared memory), a tuning knob: longer chunks do more intra-chunk work
// per token and fewer chunk-state products and scans. (MAMBA3_TRAIN_CHUNK_LEN is the fused kernels' knob.)
int env_batched_rows() {
  static const int rows = int(env_integer("MAMBA3_TRAIN_BATCHED_ROWS", 64, 8, 128));
  return rows;
}

// MAMBA3_TRAIN_CHUNK_BLOCKS, read once per process: the register variant of the parallel schedule's per-chunk
// kernels, "auto" (or unset: two blocks per SM where their shared memory fits), "1" or "2" (forced).
int env_chunk_blocks() {
  static const int blocks = [] {
    const std::string v = env_choice("MAMBA3_TRAIN_CHUNK_BLOCKS", {"auto", "1", "2"});
    return v == "1" ? 1 : v == "2" ? 2 : 0;
  }();
  return blocks;
}

// MAMBA3_TRAIN_EPILOGUE_HEADS, read once per process: the batched epilogue's heads per block (unset or 0: auto, the
// largest divisor of a B/C group's heads up to 4), a tuning knob.
int env_epilogue_heads() {
  static const int heads = int(env_integer("MAMBA3_TRAIN_EPILOGUE_HEADS", 0, 0, 64));
  return heads;
}

// MAMBA3_TRAIN_CHUNK_CORE, read once per process: the batched path's forward and backward cores as one tensor-core
// kernel per chunk each ("fused", the default where the shapes allow) or as batched products with the mask and coef
// kernels ("products").
bool env_chunk_cores() {
  static const bool fused = env_choice("MAMBA3_TRAIN_CHUNK_CORE", {"fused", "products"}) != "products";
  return fused;
}

// MAMBA3_TRAIN_STATE_CHAIN, read once per process: with the cores, the chunk states as one chain kernel per direction
// ("chain", the default) or as products (ΔH batched, G in the backward core) and a scan pass ("pass").
bool env_state_chain() {
  static const bool chain = env_choice("MAMBA3_TRAIN_STATE_CHAIN", {"chain", "pass"}) != "pass";
  return chain;
}

// MAMBA3_TRAIN_BACKWARD_CORE, read once per process: with the state chains (SISO), the backward core and the post-scan
// core as one kernel ("fused", the default) or two ("split").
bool env_backward_core_fused() {
  static const bool fused = env_choice("MAMBA3_TRAIN_BACKWARD_CORE", {"fused", "split"}) != "split";
  return fused;
}

// MAMBA3_TRAIN_DQK16, read once per process: with the SISO cores or MIMO's state core, dQ and dK handed to the
// rotation backward in bf16 ("1", the default where its instances run) or f32 ("0").
bool env_dqk16() {
  static const bool on = env_choice("MAMBA3_TRAIN_DQK16", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_OUTPUT_TOKENS, read once per process: the SISO output-stage backward's tokens in flight per warp (and
// with "2", MIMO's output forward's: all of a warp's).
int env_output_tokens() {
  static const int tokens = env_choice("MAMBA3_TRAIN_OUTPUT_TOKENS", {"2", "1"}) == "1" ? 1 : 2;
  return tokens;
}

// MAMBA3_TRAIN_BUILD_FAST, read once per process: the SISO build's path for full chunks ("1", the default) or its
// general loop everywhere ("0"); the same bits.
bool env_build_fast() {
  static const bool on = env_choice("MAMBA3_TRAIN_BUILD_FAST", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_OUTPUT_FULL, read once per process: the SISO output-stage backward's kernel for whole chunks ("1", the
// default, where it applies) or its general kernel ("0").
bool env_output_full() {
  static const bool on = env_choice("MAMBA3_TRAIN_OUTPUT_FULL", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_ROTATION_PREFETCH, read once per process: the SISO rotation backward prefetches each warp's next token
// into L2 ("1", the default) or not ("0"); the same bits.
bool env_rotation_prefetch() {
  static const bool on = env_choice("MAMBA3_TRAIN_ROTATION_PREFETCH", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_ROTATION_SPLIT, read once per process: the SISO rotation backward at N 128 with a lane on the rotary
// pairs l and l + 32 ("1", the default) or on four consecutive elements ("0"); the same bits.
bool env_rotation_split() {
  static const bool on = env_choice("MAMBA3_TRAIN_ROTATION_SPLIT", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_ROTATION_PIPE, read once per process: with the split lanes, the SISO rotation backward loads a warp's
// next token into registers while it works on the current one ("1", the default) or not ("0"); the same bits.
bool env_rotation_pipe() {
  static const bool on = env_choice("MAMBA3_TRAIN_ROTATION_PIPE", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_ANGLE_CODES, read once per process: the bf16 batched path's rotary angles as 16-bit codes ("1", the
// default) or in f32 ("0").
bool env_angle_codes() {
  static const bool on = env_choice("MAMBA3_TRAIN_ANGLE_CODES", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_ROTATION_TOTALS, read once per process: the SISO rotation backward sums dφ per angle segment for the
// angle backward ("1") or the angle backward's totals kernel does ("0", the default: no step difference on an H100);
// the same bits.
bool env_rotation_totals() {
  static const bool on = env_choice("MAMBA3_TRAIN_ROTATION_TOTALS", {"0", "1"}) == "1";
  return on;
}

// MAMBA3_TRAIN_CORE_UNROTATE, read once per process: the SISO fused backward core un-rotates dQ and dK and forms dφ
// itself, the rotation backward only summing over heads ("1"); also sums over clusters of 8 heads, no rotation
// backward ("heads"); or the rotation backward does it all ("0", the default: both others measured slower).
const std::string& env_core_unrotate() {
  static const std::string mode = env_choice("MAMBA3_TRAIN_CORE_UNROTATE", {"0", "1", "heads"});
  return mode;
}

// MAMBA3_TRAIN_ZY16, read once per process: the SISO forward core stores Z and the pre-norm output y in bf16 for the
// output-stage backward ("1", the default, where both apply) or Z and W·v in f32 ("0").
bool env_zy16() {
  static const bool on = env_choice("MAMBA3_TRAIN_ZY16", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_CORE_OUTPUT, read once per process: the SISO fused backward core runs the output stage's backward
// itself, after a kernel forming only e^Λ ⊙ dy for the reverse chain ("1", the default, where it applies), or the
// output-stage backward kernel runs before the chain ("0"). The same bits.
bool env_core_output() {
  static const bool on = env_choice("MAMBA3_TRAIN_CORE_OUTPUT", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_VW_FORMED, read once per process: the SISO build leaves w ⊙ v to its readers, which form it from v
// ("1", the default, where it applies), or writes it ("0"). The same bits.
bool env_vw_formed() {
  static const bool on = env_choice("MAMBA3_TRAIN_VW_FORMED", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_QK_ROTATED_ONLY, read once per process: the SISO build stores only q's and k's rotated columns and their
// readers form the others from the normalised B/C rows and the biases ("1", where it applies), or it stores them whole
// ("0", the default: no step gain measured, docs/perf.md "Fifty-second session"). The same bits.
bool env_qk_rotated_only() {
  static const bool on = env_choice("MAMBA3_TRAIN_QK_ROTATED_ONLY", {"1", "0"}) == "1";
  return on;
}

// MAMBA3_TRAIN_KV_CHAIN, read once per process: the SISO build writes only q and one kernel per sequence-head forms
// k and v and runs the forward chain on them, q's build before it ("1") or beside it ("beside"), or forms q as well
// ("q"), or forms q and runs the forward core's work too ("walk": launch_fwd_walk, the default since the fifty-ninth
// session: 42.0 → 40.8 ms per 125M step on an H100), where it applies; or the build writes k and v and the chain
// reads them ("0"). The same bits.
const std::string& env_kv_chain() {
  static const std::string mode = env_choice("MAMBA3_TRAIN_KV_CHAIN", {"0", "1", "beside", "q", "walk"});
  return mode;
}

// MAMBA3_TRAIN_QK_HEAD_ORDER, read once per process: with q and k stored in part, the forward core and the fused core
// take a chunk's heads in consecutive blocks ("1", the default) or the chunks of a head ("0"). The same bits.
bool env_qk_head_order() {
  static const bool on = env_choice("MAMBA3_TRAIN_QK_HEAD_ORDER", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_CHAIN_DYE, read once per process: with the fused core's output part, the reverse chain forms e^Λ ⊙ dy
// from dO and z itself ("1", the default) or a kernel writes it first ("0"). The same bits.
bool env_chain_dye() {
  static const bool on = env_choice("MAMBA3_TRAIN_CHAIN_DYE", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_CORE_BESIDE, read once per process: the fused core beside the reverse chain ("1") or after it ("0",
// the default until measured). The same bits.
bool env_core_beside() {
  static const bool on = env_choice("MAMBA3_TRAIN_CORE_BESIDE", {"0", "1"}) == "1";
  return on;
}

// MAMBA3_TRAIN_OUT_PROJ_BESIDE, read once per process: the mixer's out_proj beside the forward walk ("1") or after
// it ("0", the default until measured). To rounding (the product's own summation order).
bool env_out_proj_beside() {
  static const bool on = env_choice("MAMBA3_TRAIN_OUT_PROJ_BESIDE", {"0", "1"}) == "1";
  return on;
}

// MAMBA3_TRAIN_CORE_STAGED, read once per process: the fused core's state tiles in its phases' own copies ("1") or
// with the other tiles ("0", the default until measured). The same bits.
bool env_core_staged() {
  static const bool on = env_choice("MAMBA3_TRAIN_CORE_STAGED", {"0", "1"}) == "1";
  return on;
}

// MAMBA3_TRAIN_MIMO_EPILOGUE, read once per process: MIMO's state core runs the epilogue's state part ("core", the
// default) or stores tp and dV for the MIMO epilogue kernel ("kernel").
bool env_mimo_epilogue_in_core() {
  static const bool on = env_choice("MAMBA3_TRAIN_MIMO_EPILOGUE", {"core", "kernel"}) != "kernel";
  return on;
}

// MAMBA3_TRAIN_MIMO_Y, read once per process: MIMO's forward core stores the pre-norm output y for the output stage
// ("1", the default) or W·v, which the output stage adds to e^Λ·Z + D·v itself ("0").
bool env_mimo_y() {
  static const bool on = env_choice("MAMBA3_TRAIN_MIMO_Y", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_BC_NORM_FUSED, read once per process: the B/C norm backward inside the SISO rotation backward ("1",
// the default) or its own kernel ("0").
bool env_bc_norm_fused() {
  static const bool on = env_choice("MAMBA3_TRAIN_BC_NORM_FUSED", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_ZX16, read once per process: z, x and dO in bf16 on the batched path's bf16 mode ("1", the default)
// or in f32 ("0").
bool env_zx16() {
  static const bool on = env_choice("MAMBA3_TRAIN_ZX16", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_TRAIN_CHUNK_PATH, read once per process: the chunked form as batched cuBLAS products ("batched", the
// default) or as the fused chunk kernels ("fused").
bool env_chunk_batched() {
  static const bool batched = env_choice("MAMBA3_TRAIN_CHUNK_PATH", {"batched", "fused"}) != "fused";
  return batched;
}

// Row-major C = op(A)·op(B) + β·C for `batch` independent products at strides sA, sB, sC (elements): f32 operands on
// CUDA cores (pedantic: the exact mode) or bf16 operands on tensor cores (the bf16 mode), f32 accumulation and C.
// Column-major cuBLAS sees Cᵀ = op(B)ᵀ·op(A)ᵀ, so B goes first (as in TrainGemm::run).
void batched_gemm(const Context& ctx, bool bf16, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const void* A,
                  int64_t lda, int64_t sA, const void* B, int64_t ldb, int64_t sB, float beta, float* C, int64_t ldc,
                  int64_t sC, int64_t batch) {
  if (m == 0 || n == 0 || batch == 0) return;
  MAMBA3_CHECK(batch <= INT32_MAX, "Mamba3TrainGpu: {} batched products exceed cuBLAS's int", batch);
  const float alpha = 1.0f;
  const cudaDataType_t in = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  MAMBA3_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      ctx.cublas(), tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m), int(k), &alpha, B,
      in, int(ldb), sB, A, in, int(lda), sA, &beta, C, CUDA_R_32F, int(ldc), sC, int(batch),
      bf16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
}

void reserve_elems(DeviceBuffer& b, int64_t n, size_t bytes_each) {
  b.reserve(size_t(std::max<int64_t>(n, 1)) * bytes_each);
}
float* f(const DeviceBuffer& b, size_t offset = 0) { return b.as<float>() + offset; }
void reserve_floats(DeviceBuffer& b, int64_t n) { b.reserve(size_t(std::max<int64_t>(n, 1)) * sizeof(float)); }

}  // namespace

Mamba3TrainGpu::Mamba3TrainGpu(const Mamba3Config& c)
    : c_(c),
      chunk_blocks_(env_chunk_blocks()),
      chunk_tc_(env_chunk_tensor_cores()),
      chunk_parallel_(env_chunk_scan_parallel()),
      chunk_batched_(env_chunk_batched()),
      chunk_cores_(env_chunk_cores()),
      state_chain_(env_state_chain()),
      backward_core_fused_(env_backward_core_fused()),
      dqk16_(env_dqk16()),
      bc_norm_fusion_(env_bc_norm_fused()),
      output_tokens_(env_output_tokens()),
      build_fast_(env_build_fast()),
      output_full_(env_output_full()),
      rotation_prefetch_(env_rotation_prefetch()),
      rotation_split_(env_rotation_split()),
      rotation_pipe_(env_rotation_pipe()),
      angle_codes_(env_angle_codes()),
      rotation_totals_(env_rotation_totals()),
      core_unrotate_(env_core_unrotate() == "1" || env_core_unrotate() == "heads"),  // ("" when unset: off)
      core_head_sum_(env_core_unrotate() == "heads"),
      zy16_(env_zy16()),
      core_output_(env_core_output()),
      vw_formed_(env_vw_formed()),
      chain_dye_(env_chain_dye()),
      core_beside_(env_core_beside()),
      core_staged_(env_core_staged()),
      out_proj_beside_(env_out_proj_beside()),
      qk_rotated_only_(env_qk_rotated_only()),
      kv_chain_(env_kv_chain() != "0"),  // ("" when unset: the walk)
      kv_chain_beside_(env_kv_chain() == "beside"),
      kv_chain_q_(env_kv_chain() == "q"),
      kv_chain_walk_(env_kv_chain() == "walk" || env_kv_chain().empty()),
      qk_head_order_(env_qk_head_order()),
      mimo_epilogue_in_core_(env_mimo_epilogue_in_core()),
      mimo_y_(env_mimo_y()),
      zx_bf16_(env_zx16()) {
  c_.validate("Mamba3TrainGpu");
  MAMBA3_CHECK(c_.rank() <= kMaxRank, "Mamba3TrainGpu: MIMO rank {} > {} is not supported", c_.rank(), kMaxRank);
}

void Mamba3TrainGpu::query_device() {
  if (max_smem_ != 0) return;
  int dev = 0;
  MAMBA3_CUDA_CHECK(cudaGetDevice(&dev));
  MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&sm_smem_, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&smem_reserved_, cudaDevAttrReservedSharedMemoryPerBlock, dev));
  MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem_, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
}

void Mamba3TrainGpu::set_chunk_blocks_per_sm(int blocks) {
  MAMBA3_CHECK(blocks >= 0 && blocks <= 2, "Mamba3TrainGpu: chunk blocks per SM {} (0 auto, 1 or 2 expected)",
               blocks);
  chunk_blocks_ = blocks;
}

int Mamba3TrainGpu::reverse_blocks(int T) {
  if (chunk_blocks_ != 0) return chunk_blocks_;
  query_device();
  const size_t bytes = chunk_reverse_smem_bytes(make_dims(c_, 1, 1), T);
  return chunk_two_blocks_fit(bytes, size_t(sm_smem_), size_t(smem_reserved_)) ? 2 : 1;
}

int Mamba3TrainGpu::chunk_reverse_blocks(int64_t L) { return reverse_blocks(chunk_length(L, true)); }

int Mamba3TrainGpu::chunk_length(int64_t L, bool backward) {
  query_device();
  const MixerDims d = make_dims(c_, 1, 1);
  const int64_t cap = std::min<int64_t>(64 / c_.rank(), env_max_chunk_length());
  for (int T = int(std::min<int64_t>(cap, L)); T >= 1; --T) {
    const size_t need = backward ? std::max(chunk_forward_smem_bytes(d, T, true), chunk_reverse_smem_bytes(d, T))
                                 : chunk_forward_smem_bytes(d, T, false);
    if (need <= size_t(max_smem_)) return T;
  }
  fail("Mamba3TrainGpu: headdim {} × d_state {} tiles exceed the device's {} bytes of shared memory per block",
               c_.headdim, c_.d_state, max_smem_);
}

int Mamba3TrainGpu::forward_chunk_length(int64_t L, int& blocks) {
  const int T = chunk_length(L, false);
  blocks = chunk_blocks_ == 2 ? 2 : 1;
  if (!chunk_parallel_ || chunk_blocks_ != 0) return T;
  // Auto: the longest chunk at least half as long whose tiles let two blocks share an SM (the output kernel runs
  // latency-bound at 8 warps per SM; N 128, P 64: 46 tokens, 112 KiB, instead of 64 tokens, 147 KiB).
  const MixerDims d = make_dims(c_, 1, 1);
  for (int t = T; t >= 1 && 2 * t >= T; --t)
    if (chunk_two_blocks_fit(chunk_forward_smem_bytes(d, t, false), size_t(sm_smem_), size_t(smem_reserved_))) {
      blocks = 2;
      return t;
    }
  return T;
}

void Mamba3TrainGpu::prepare(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t B, int64_t L,
                             const float* u, const uint16_t* u16, PhaseProfile* prof) {
  const auto mark = [prof](const char* part) {
    if (prof) prof->mark(part);
  };
  const MixerDims d = make_dims(c_, B, L);
  const int64_t M = B * L, din = d.din, BHL = B * d.H * L;
  const cudaStream_t s = ctx.stream();
  reserve_floats(act_->bc_raw, M * 2 * d.R * d.G * d.N);
  reserve_floats(act_->zx, M * din);
  reserve_floats(act_->scalars, 5 * BHL);
  reserve_floats(act_->phi, BHL * d.S);
  if (o_in_bf16(gemm)) reserve_elems(act_->o16, M * d.d_inner, 2);
  else reserve_floats(act_->o, M * d.d_inner);
  // u16 and the weight's mirror, where given, are read instead of rounding u and W_in (the f32 mode ignores them).
  const int64_t D = c_.d_model;
  act_->zx16_used = zx_in_bf16(gemm);
  if (act_->zx16_used) {
    // z and x (W_in's first 2·d_inner rows) rounded to bf16 into zx16; the rest in f32 into zx's own columns.
    const int64_t zxw = 2 * int64_t(d.d_inner), rest = din - zxw;
    reserve_elems(act_->zx16, M * zxw, 2);
    std::optional<TrainGemm::HeldA> held;  // u rounded once for both products where no producer gave u16
    if (!u16) held.emplace(gemm, ctx, u, M, D, D);
    gemm.run_mixed_bf16_out(ctx, false, true, M, zxw, D, 1.0f, u, u16, D, w.in_proj, w.in_proj16, D,
                            act_->zx16.as<uint16_t>(), zxw);
    gemm.run_mixed(ctx, false, true, M, rest, D, 1.0f, u, u16, D, w.in_proj + zxw * D,
                   w.in_proj16 ? w.in_proj16 + zxw * D : nullptr, D, 0.0f, f(act_->zx) + zxw, din);
  } else {
    gemm.run_mixed(ctx, false, true, M, din, D, 1.0f, u, u16, D, w.in_proj, w.in_proj16, D, 0.0f, f(act_->zx), din);
  }
  mark("in_proj");
  // (the compact copy of the unrotated coordinates that the readers of q and k stored in part take, where the
  // switch and the bf16 mode's SISO path may use it: batched_chunks decides)
  act_->bc_unrot_written = writes_bc_unrot(o_in_bf16(gemm));
  if (act_->bc_unrot_written) reserve_floats(act_->bc_unrot, M * 2 * d.G * (d.N / 2));
  launch_normalize_bc(s, d, f(act_->zx), w.B_norm, w.C_norm, f(act_->bc_raw),
                      act_->bc_unrot_written ? f(act_->bc_unrot) : nullptr);
  mark("normalize bc");
  const TokenScalars sc{f(act_->scalars), f(act_->scalars, BHL), f(act_->scalars, 2 * BHL),
                        f(act_->scalars, 3 * BHL), f(act_->scalars, 4 * BHL)};
  launch_token_scalars(s, d, f(act_->zx), w.dt_bias, sc);
  mark("token scalars");
  reserve_floats(act_->angle_seg, int64_t(angle_scratch_floats(d)));
  // The bf16 batched path's angles as codes where the segment-block scan writes them (its readers all take either).
  act_->phi_codes = angle_codes_ && o_in_bf16(gemm) &&
                    launch_angle_codes(s, d, f(act_->zx), sc.dt, act_->phi.as<uint16_t>(), f(act_->angle_seg));
  if (!act_->phi_codes) launch_angles(s, d, f(act_->zx), sc.dt, f(act_->phi), f(act_->angle_seg));
  mark("angles");
}

namespace {

// The chunk kernels' inputs shared by forward and backward.
// (a: the activations prepare wrote; the chunk path reads f32 angles, never codes)
ChunkParams base_params(const MixerDims& d, int T, const Mamba3TrainWeights& w, const Mamba3TrainActivations& a) {
  MAMBA3_CHECK(!a.phi_codes, "Mamba3TrainGpu: the chunk path reads f32 angles, the last prepare wrote codes");
  const int64_t BHL = int64_t(d.B) * d.H * d.L;
  const float* scalars = f(a.scalars);
  ChunkParams p{};
  p.d = d, p.T = T, p.zx = f(a.zx);
  p.dt = scalars, p.A = scalars + BHL, p.lam = scalars + 2 * BHL;
  p.phi = f(a.phi);
  p.B_bias = w.B_bias, p.C_bias = w.C_bias, p.mimo_x = w.mimo_x, p.mimo_z = w.mimo_z, p.mimo_o = w.mimo_o;
  p.D = w.D, p.norm = w.norm, p.o = f(a.o);
  return p;
}

}  // namespace

int64_t Mamba3TrainGpu::activation_bytes(int64_t B, int64_t L, Precision precision) const {
  const MixerDims d = make_dims(c_, B, L);
  const int T = batched_chunk_length(std::max<int64_t>(L, 1));
  const int64_t M = B * L, BHL = B * d.H * L, nc = (L + T - 1) / T, BHc = B * d.H * nc, rows = int64_t(T) * d.R;
  const bool bf16 = precision == Precision::BF16;
  const int64_t sw = uses_chunk_cores(bf16, std::max<int64_t>(L, 1)) ? 0 : rows;  // S and W (not kept by the cores)
  const int64_t floats = M * d.din + M * 2 * d.R * d.G * d.N + 5 * BHL + BHL * d.S + (bf16 ? 0 : M * d.d_inner) +
                         int64_t(angle_scratch_floats(d)) + (BHc + 1) * d.P * d.N + 5 * BHc * T + BHc +
                         BHc * rows * (2 * d.P + sw);  // Z, WV, S
  // Product operands (q, k, v, w ⊙ v, W) and, in the bf16 mode, the scan's bf16 copy of the chunk states.
  const int64_t operands = BHc * rows * (2 * d.N + 2 * d.P + sw);
  // The bf16 mode keeps o as bf16 only (o_in_bf16) and, with set_zx_bf16, z and x in bf16 too (zx keeps its f32
  // width: the z and x columns there are then unused).
  const int64_t zx16 = bf16 && chunk_batched_ && zx_bf16_ && !d.mimo ? M * 2 * d.d_inner * 2 : 0;
  // (the compact copy of B/C's unrotated coordinates, where prepare writes it)
  const int64_t bc_unrot = writes_bc_unrot(bf16) ? M * d.G * d.N * 4 : 0;
  return floats * 4 + operands * (bf16 ? 2 : 4) + (bf16 ? BHc * d.P * d.N * 2 + M * d.d_inner * 2 + zx16 : 0) +
         bc_unrot;
}

bool Mamba3TrainGpu::writes_bc_unrot(bool bf16) const {
  return bf16 && qk_rotated_only_ && !c_.is_mimo && c_.d_state % 8 == 0;
}

int Mamba3TrainGpu::epilogue_heads() const {
  const int per_group = int(c_.nheads() / c_.ngroups);
  // The rotation backward's shared memory: per warp and head, the C and B bias partials (R·N floats each).
  const auto bytes = [&](int hb) { return int64_t(kChunkThreads / 32) * hb * 2 * c_.rank() * c_.d_state * 4; };
  const int want = epilogue_heads_ ? epilogue_heads_ : env_epilogue_heads();
  if (want > 0) {
    MAMBA3_CHECK(per_group % want == 0, "Mamba3TrainGpu: {} epilogue heads per block do not divide the {} heads of a "
                 "B/C group (MAMBA3_TRAIN_EPILOGUE_HEADS)", want, per_group);
    MAMBA3_CHECK(bytes(want) <= 200 * 1024, "Mamba3TrainGpu: {} epilogue heads per block need {} bytes of shared "
                 "memory (MAMBA3_TRAIN_EPILOGUE_HEADS)", want, bytes(want));
    return want;
  }
  // Up to 96 KB: two blocks per SM still fit. (125M MIMO R = 4, N 128: 3 heads per block instead of 2 — a third
  // fewer dBn/dCn slots to write and read back — took its steps from 91.9, 91.5 to 91.2, 90.5 ms on an H200.)
  for (int h = 4; h > 1; --h)
    if (per_group % h == 0 && bytes(h) <= 96 * 1024) return h;
  return 1;
}

bool Mamba3TrainGpu::uses_chunk_cores(bool bf16, int64_t L) const {
  if (!chunk_cores_) return false;
  BatchedParams p{};
  p.d = make_dims(c_, 1, std::max<int64_t>(L, 1));
  p.bf16 = bf16, p.rows = batched_chunk_length(std::max<int64_t>(L, 1)) * p.d.R;
  return forward_core_supported(p) && backward_core_supported(p);
}

int Mamba3TrainGpu::batched_chunk_length(int64_t L) const {
  return int(std::min<int64_t>(std::max<int64_t>(1, env_batched_rows() / c_.rank()), L));
}

void Mamba3TrainGpu::batched_chunks(const Context& ctx, bool bf16, const Mamba3TrainWeights& w, int64_t B, int64_t L,
                                    bool backward, const PartOffsets* parts, PhaseProfile& prof, bool reuse) {
  const MixerDims d = make_dims(c_, B, L);
  const cudaStream_t s = ctx.stream();
  const int T = batched_chunk_length(L);
  const int64_t nc = (L + T - 1) / T, rows = int64_t(T) * d.R, N = d.N, P = d.P, PN = P * N;
  const int64_t BHc = B * d.H * nc, BHL = B * d.H * L;
  const size_t op = bf16 ? 2 : 4;  // bytes of a product operand element
  BatchedParams p{};
  p.d = d, p.T = T, p.nc = int(nc), p.rows = int(rows), p.bf16 = bf16, p.siso_kernels = siso_kernels_;
  p.output_tokens = output_tokens_;
  p.build_fast = build_fast_;
  p.output_full = output_full_;
  p.rotation_prefetch = rotation_prefetch_;
  p.rotation_split = rotation_split_;
  p.rotation_pipe = rotation_pipe_;
  p.qk_head_order = qk_head_order_;
  p.heads_per_block = epilogue_heads();
  p.zx = f(act_->zx), p.dt = f(act_->scalars), p.A = f(act_->scalars, BHL);
  p.zx16 = act_->zx16_used ? act_->zx16.as<uint16_t>() : nullptr;
  p.lam = f(act_->scalars, 2 * BHL);
  p.phi = act_->phi_codes ? nullptr : f(act_->phi);
  p.phi_code = act_->phi_codes ? act_->phi.as<uint16_t>() : nullptr;
  p.B_bias = w.B_bias, p.C_bias = w.C_bias, p.mimo_x = w.mimo_x, p.mimo_z = w.mimo_z, p.mimo_o = w.mimo_o;
  p.bc_unrot = act_->bc_unrot_written ? f(act_->bc_unrot) : nullptr;
  p.D = w.D, p.norm = w.norm;
  if (bf16) p.o16 = act_->o16.raw();  // the out_proj products' operand (o_in_bf16)
  else p.o = f(act_->o);
  const int64_t nT = BHc * T;
  reserve_floats(act_->bscal, 5 * nT + BHc);
  p.Lam = f(act_->bscal), p.eL = f(act_->bscal, nT), p.gam = f(act_->bscal, 2 * nT);
  p.scale = f(act_->bscal, 3 * nT);
  p.wv = f(act_->bscal, 4 * nT), p.decay = f(act_->bscal, 5 * nT);
  for (DeviceBuffer* b : {&act_->bQ, &act_->bK}) reserve_elems(*b, BHc * rows * N, op);
  for (DeviceBuffer* b : {&act_->bV, &act_->bVw}) reserve_elems(*b, BHc * rows * P, op);
  for (DeviceBuffer* b : {&act_->bZ, &act_->bWV}) reserve_floats(*b, BHc * rows * P);
  // The cores (one tensor-core kernel per chunk forward and backward) where the shapes allow; S and W are then never
  // stored (the backward core recomputes them).
  const bool use_cores = uses_chunk_cores(bf16, L);
  // Z and y in bf16 between the SISO forward core (writing the output) and the SISO output-stage backwards.
  p.zy16 = zy16_ && use_cores && output_backward_siso_applies(p) && forward_core_writes_output(p);
  zy16_used_ = p.zy16;
  if (!use_cores) {
    reserve_floats(act_->bS, BHc * rows * rows);
    reserve_elems(act_->bW, BHc * rows * rows, op);
  }
  p.Q = act_->bQ.raw(), p.K = act_->bK.raw(), p.V = act_->bV.raw(), p.Vw = act_->bVw.raw();
  p.S = f(act_->bS), p.W = act_->bW.raw(), p.Z = f(act_->bZ), p.WV = f(act_->bWV);
  // With the cores the chunk states may come from the chain kernels (launch_state_chain), which write only the bf16
  // states: no f32 slots, forward or backward.
  const bool chain = use_cores && state_chain_ && state_chain_supported(p);
  // Hc: one slot per chunk plus one, the state change of chunk c written to slot c + 1 (the last chunk's spills into
  // the next sequence's slot 0, which the scan zeroes, or into the extra slot). The bf16 mode's products read the
  // scan's bf16 copy (Hc16, one slot per chunk).
  if (!chain) reserve_floats(act_->Hc, (BHc + 1) * PN);
  float* Hc = chain ? nullptr : f(act_->Hc);
  if (bf16) reserve_elems(act_->Hc16, BHc * PN, 2);
  const void* Hc_op = bf16 ? act_->Hc16.raw() : static_cast<const void*>(Hc);
  const int64_t sRN = rows * N, sRP = rows * P, sRR = rows * rows;

  if (reuse) MAMBA3_CHECK(act_->chunk_cores == use_cores, "Mamba3TrainGpu: kept activations of another chunk path");
  // Whether q and k may be stored in part (p.qk_rotated_only): where the backward takes the fused core (not the head
  // sum), whose rotation backward forms q and k itself, and the shapes allow it.
  const auto qk_half_applies = [&] {
    return chain && backward_core_fused_ && post_scan_core_supported(p) && !(core_unrotate_ && core_head_sum_) &&
           qk_rotated_only_supported(p);
  };
  // MIMO: y in WV from the forward core for the output instance (a kept forward's choice stands).
  p.wv_holds_y = reuse ? act_->wv_holds_y : mimo_y_ && use_cores && d.mimo && output_mimo_applies(p);
  mimo_y_used_ = p.wv_holds_y;
  if (!reuse) {  // the forward part (kept activations already hold it)
    act_->chunk_cores = use_cores;
    act_->wv_holds_y = p.wv_holds_y;
    // (only where the backward's fused core is expected to run the output part, which forms w ⊙ v itself: another
    // path would form Vw in a kernel of its own, which measured slower than the build writing it)
    p.vw_formed = vw_formed_ && core_output_ && backward_core_fused_ && chain && vw_formed_supported(p) &&
                  fused_core_output_may_apply(p);
    act_->vw_formed = p.vw_formed;
    vw_formed_used_ = p.vw_formed;
    p.z_unread = p.vw_formed && p.zy16;
    act_->z_unread = p.z_unread;
    // (only where the backward is expected to take the fused core, whose rotation backward forms q and k itself: any
    // other backward path runs the build again, whole)
    p.qk_rotated_only = qk_rotated_only_ && qk_half_applies();
    act_->qk_rotated_only = p.qk_rotated_only;
    qk_rotated_only_used_ = p.qk_rotated_only;
    // (k, v and the forward chain in one kernel; q from the build before it, beside it, or from the kernel itself)
    p.build_q_only = chain && kv_chain_ && kv_chain_supported(p);
    kv_chain_used_ = p.build_q_only;
    // (the walk: the kv chain forming q, with the forward core's products and output stage; then no core kernel)
    const bool walk = p.build_q_only && kv_chain_walk_ && use_cores && fwd_walk_supported(p);
    fwd_walk_used_ = walk;
    p.kv_forms_q = p.build_q_only && (kv_chain_q_ || walk);
    p.q_beside = p.build_q_only && kv_chain_beside_ && !p.kv_forms_q;
    if (p.kv_forms_q || p.q_beside) {
      launch_chunk_scalars(s, p);
    } else {
      launch_batched_build(s, p);  // (with build_q_only: the chunk scalars and q alone)
      prof.mark("build");
    }
    if (walk) {
      // out_proj beside the walk where forward() asked for it (walk_ready_wanted_: its shapes and operands checked
      // there): the walk's per-(sequence, chunk) counters, zeroed whenever the shape they count for changes.
      walk_ready_used_ = !backward && walk_ready_wanted_ && d.L % p.T == 0 && p.T == 64;
      if (walk_ready_used_) p.walk_ready = walk_ready_.next_launch(s, B * nc, int(d.H));  // (every head's walk)
      launch_fwd_walk(s, p, act_->Hc16.raw());
      p.walk_ready = nullptr;
      // (beside: no event between the walk and out_proj, which would hold the product back until the walk ends; the
      // profile counts both as out_proj)
      if (!walk_ready_used_) prof.mark("forward walk");
      p.build_q_only = p.kv_forms_q = false;
    } else if (p.build_q_only) {
      launch_kv_chain(s, p, act_->Hc16.raw());
      if (p.q_beside) launch_build_q_beside(s, p);
      prof.mark("kv chain");
      p.build_q_only = p.q_beside = p.kv_forms_q = false;  // (a build run again later writes k and v)
    } else if (chain) {
      launch_state_chain(s, p, p.vw_formed ? p.V : p.Vw, p.K, false, act_->Hc16.raw(), p.vw_formed ? p.wv : nullptr);
      prof.mark("state chain");
    } else {
      // ΔH_c = (w ⊙ v)ᵀ·k from zero → slot c + 1; the scan turns the slots into the chunk-start states.
      batched_gemm(ctx, bf16, true, false, P, N, rows, p.Vw, P, sRP, p.K, N, sRN, 0.0f, Hc + PN, N, PN, BHc);
      prof.mark("gemm dH");
      launch_state_scan(s, Hc, p.decay, B * d.H, int(nc), int(PN), false,
                        bf16 ? act_->Hc16.as<uint16_t>() : nullptr, !bf16);
      prof.mark("scan");
    }
    if (walk) {
      // (the walk wrote what the forward core writes)
    } else if (use_cores) {
      launch_batched_forward_core(s, p, act_->Hc16.raw());
      prof.mark("forward core");
    } else {
      batched_gemm(ctx, bf16, false, true, rows, rows, N, p.Q, N, sRN, p.K, N, sRN, 0.0f, p.S, rows, sRR, BHc);
      prof.mark("gemm S");
      launch_batched_mask(s, p);
      prof.mark("mask");
      batched_gemm(ctx, bf16, false, true, rows, P, N, p.Q, N, sRN, Hc_op, N, PN, 0.0f, p.Z, P, sRP, BHc);
      prof.mark("gemm Z");
      batched_gemm(ctx, bf16, false, false, rows, P, rows, p.W, rows, sRR, p.V, P, sRP, 0.0f, p.WV, P, sRP, BHc);
      prof.mark("gemm WV");
    }
  }
  if (!backward) {
    if (!(use_cores && forward_core_writes_output(p))) {  // (the SISO forward core wrote o16 itself)
      launch_batched_output(s, p, false);
      prof.mark("output");
    }
    return;
  }

  for (DeviceBuffer* b : {&bdY_, &bdYe_}) reserve_elems(*b, BHc * rows * P, op);
  reserve_floats(bdV_, BHc * rows * P);
  for (DeviceBuffer* b : {&bdQ_, &bdK_}) reserve_floats(*b, BHc * rows * N);
  // The SISO cores (fused or split) or MIMO's state core before the rotation backward's instances: dQ and dK reach
  // it in bf16 (dK's f32 buffer stays the split SISO path's intermediate).
  p.dQ16 = p.dK16 = nullptr;
  const bool state_core = chain && backward_core_fused_ && backward_state_core_supported(p);
  if (dqk16_ && use_cores && (post_scan_core_supported(p) || state_core) && dqk16_supported(p)) {
    reserve_elems(bdQK16_, 2 * BHc * rows * N, 2);
    p.dQ16 = bdQK16_.as<uint16_t>(), p.dK16 = p.dQ16 + BHc * rows * N;
  }
  if (!use_cores) {
    reserve_floats(bdWf_, BHc * rows * rows);
    reserve_elems(bdS_, BHc * rows * rows, op);
  }
  reserve_floats(bdLam_, nT);
  if (!chain) reserve_floats(dHc_, (BHc + 1) * PN);
  if (bf16) reserve_elems(dHc16_, BHc * PN, 2);
  p.dzx16 = std::exchange(dzx16_offer_, nullptr);  // the bf16 twin of dzx, when backward() offers one
  p.dO = dO16_used_ ? nullptr : f(dO_), p.dO16 = dO16_used_ ? dO16_.as<uint16_t>() : nullptr;
  p.dzx = f(dzx_), p.dY = bdY_.raw(), p.dYe = bdYe_.raw(), p.dWf = f(bdWf_), p.dS = bdS_.raw();
  p.dQ = f(bdQ_), p.dK = f(bdK_), p.dV = f(bdV_);
  p.Hc = Hc, p.dHc = chain ? nullptr : f(dHc_, size_t(PN)), p.dLam = f(bdLam_);
  p.dadt = f(sgrad_), p.dgam = f(sgrad_, BHL), p.dscale = f(sgrad_, 2 * BHL);
  p.dphi = f(dphi_), p.dBn = f(dBn_), p.dCn = f(dCn_);
  // (the angle backward's segment sums, where the SISO rotation backward forms them: angle_seg_ready_ below)
  p.angle_seg = backward && rotation_totals_ ? f(act_->angle_seg) : nullptr;
  p.part_D = f(part_, parts->D), p.part_B_bias = f(part_, parts->B_bias), p.part_C_bias = f(part_, parts->C_bias);
  p.part_mimo_x = f(part_, parts->mimo_x), p.part_mimo_z = f(part_, parts->mimo_z);
  p.part_mimo_o = f(part_, parts->mimo_o), p.part_norm = f(part_, parts->norm);
  if (bc_norm_fusion_) {  // the B/C norm backward inside the rotation backward, where its instance applies
    p.bc_raw = f(act_->bc_raw), p.B_normw = w.B_norm, p.C_normw = w.C_norm;
    p.part_B_norm = f(part_, parts->B_norm), p.part_C_norm = f(part_, parts->C_norm);
    bc_norm_fused_ = rotation_backward_fuses_bc_norm(p);
  }
  float* dHc = chain ? nullptr : f(dHc_, size_t(PN));
  const void* dHc_op = bf16 ? dHc16_.raw() : static_cast<const void*>(dHc);

  // The kept forward wrote o already, or (zy16) the forward core did in this call: the output-stage backward would
  // only form it again (from y rounded to bf16 with zy16).
  if (reuse || p.zy16) p.o = nullptr, p.o16 = nullptr;
  mimo_epilogue_in_core_used_ = false;
  const bool fused_core = chain && backward_core_fused_ && post_scan_core_supported(p);
  // q and k stored in part by the forward: the fused core and its rotation backward form the rest; any other path
  // reads them whole, so the build runs again first (the same values; it also writes v and the chunk scalars again).
  p.qk_rotated_only = act_->qk_rotated_only;
  if (p.qk_rotated_only && !qk_half_applies()) {
    BatchedParams whole = p;
    whole.qk_rotated_only = false, whole.vw_formed = false;
    launch_batched_build(s, whole);
    prof.mark("build again");
    p.qk_rotated_only = false;
  }
  if (fused_core) {
    p.dqk_unrotated = core_unrotate_ && fused_core_unrotate_supported(p);
    p.dqk_head_sum = p.dqk_unrotated && core_head_sum_ && fused_core_head_sum_supported(p);
  }
  // The output stage's backward inside the fused core where it applies (only e^Λ ⊙ dy, the reverse chain's operand,
  // formed before), else its kernel.
  p.core_output = fused_core && core_output_ && !p.dqk_unrotated && fused_core_output_supported(p);
  core_output_used_ = p.core_output;
  // w ⊙ v left to its readers by the forward: the fused core with the output part forms it; any other path reads Vw.
  p.vw_formed = act_->vw_formed;
  if (p.vw_formed && !p.core_output) {
    launch_form_vw(s, p);
    prof.mark("form w⊙v");
  }
  // Z not written by the forward: the output part forms Λ's term without it; any other path needs Z, which the forward
  // core writes again (with its other outputs, the same bits).
  p.z_unread = act_->z_unread;
  if (p.z_unread && !p.core_output) {
    BatchedParams fwd = p;
    fwd.z_unread = false, fwd.o = nullptr, fwd.o16 = act_->o16.raw();
    launch_batched_forward_core(s, fwd, act_->Hc16.raw());
    prof.mark("forward core again");
    p.z_unread = false;
  }
  const bool chain_dye = p.core_output && chain_dye_;
  if (p.core_output && !chain_dye) {
    launch_output_dye(s, p);
    prof.mark("output dye");
  } else if (!p.core_output) {
    launch_batched_output(s, p, true);
    prof.mark("output bwd");
  }
  if (fused_core) {
    // The reverse chain first (it needs only e^Λ ⊙ dy and q), then both cores in one kernel — beside the chain where
    // set (the chain's per-chunk counters, zeroed whenever the shape they count for changes).
    // (both where the 8-warp instance with the output part runs, q and k whole: fused_core_beside_supported)
    p.core_staged = core_staged_ && p.core_output && fused_core_beside_supported(p);
    core_staged_used_ = p.core_staged;
    core_beside_used_ = chain_dye && core_beside_ && fused_core_beside_supported(p);
    if (core_beside_used_) {  // (every chain block of a sequence-head raises its chunks' counters)
      p.chain_ready = chain_ready_.next_launch(s, BHc, state_chain_blocks_per_head(p));
      p.chain_ready_target = chain_ready_.target();
    }
    launch_state_chain(s, p, chain_dye ? nullptr : p.dYe, p.Q, true, dHc16_.raw(), nullptr, chain_dye);
    // (beside: no event between the two launches, which would hold the core back until the chain ends; the profile
    // counts both as the core)
    if (!core_beside_used_) prof.mark("state chain rev");
    p.Hc16 = act_->Hc16.raw(), p.dHc16 = dHc16_.raw();
    core_unrotated_ = p.dqk_unrotated, core_head_summed_ = p.dqk_head_sum;
    launch_batched_backward_fused_core(s, p, act_->Hc16.raw(), dHc16_.raw());
    p.chain_ready = nullptr;  // (no later kernel waits on the counters)
    prof.mark("backward core");
    if (p.dqk_head_sum) {
      bc_norm_fused_ = false;  // (the B/C norm backward's own kernel follows, over H/8 slots)
      return;
    }
    launch_batched_rotation_backward(s, p);
    angle_seg_ready_ = rotation_backward_writes_angle_totals(p);
    prof.mark("rotation bwd");
    return;
  }
  if (chain && backward_core_fused_ && backward_state_core_supported(p)) {
    // MIMO: the reverse chain first, then the core with the state products (tp, dK's second term) and, where the MIMO
    // epilogue instance would run, its state part; else the epilogue (its state part reads tp from p.Z). Then the
    // rotation backward.
    launch_state_chain(s, p, p.dYe, p.Q, true, dHc16_.raw());
    prof.mark("state chain rev");
    p.Hc16 = act_->Hc16.raw(), p.dHc16 = dHc16_.raw();
    p.epilogue_in_core = mimo_epilogue_in_core_ && epilogue_mimo_applies(p);
    mimo_epilogue_in_core_used_ = p.epilogue_in_core;
    launch_batched_backward_state_core(s, p, act_->Hc16.raw(), dHc16_.raw());
    prof.mark("backward core");
    if (p.epilogue_in_core) launch_batched_rotation_backward(s, p);
    else launch_batched_epilogue(s, p);
    angle_seg_ready_ = rotation_backward_writes_angle_totals(p);
    prof.mark("epilogue");
    return;
  }
  if (use_cores) {
    // dW, coef, dV, dQ, dK's first term and G in one kernel per chunk (S, W and dS recomputed in registers).
    // (with the chain, G is the chain's: the core skips it)
    launch_batched_backward_core(s, p, act_->Hc16.raw(), chain ? nullptr : dHc - PN);
    prof.mark("backward core");
  } else {
    batched_backward_products(ctx, bf16, p, Hc_op, dHc, BHc, prof);
  }
  if (chain) {
    launch_state_chain(s, p, p.dYe, p.Q, true, dHc16_.raw());
    prof.mark("state chain rev");
  } else {
    launch_state_scan(s, dHc, p.decay, B * d.H, int(nc), int(PN), true, bf16 ? dHc16_.as<uint16_t>() : nullptr,
                      !bf16);
    prof.mark("scan rev");
  }
  if (bf16) p.Hc16 = act_->Hc16.raw(), p.dHc16 = dHc16_.raw();  // the epilogue's ⟨dH, H_c⟩ (no f32 states)
  if (use_cores && post_scan_core_supported(p)) {  // tp, dK's second term and the epilogue's state part in one kernel
    launch_batched_post_scan_core(s, p, dHc16_.raw(), act_->Hc16.raw());
    prof.mark("post-scan core");
    launch_batched_rotation_backward(s, p);
    angle_seg_ready_ = rotation_backward_writes_angle_totals(p);
    prof.mark("rotation bwd");
    return;
  }
  batched_gemm(ctx, bf16, false, true, rows, P, N, p.K, N, sRN, dHc_op, N, PN, 0.0f, p.Z, P, sRP, BHc);
  prof.mark("gemm tp");
  batched_gemm(ctx, bf16, false, false, rows, N, P, p.Vw, P, sRP, dHc_op, N, PN, 1.0f, p.dK, N, sRN, BHc);
  prof.mark("gemm dK");
  launch_batched_epilogue(s, p);  // (its second kernel is the rotation backward)
  angle_seg_ready_ = rotation_backward_writes_angle_totals(p);
  prof.mark("epilogue");
}

void Mamba3TrainGpu::batched_backward_products(const Context& ctx, bool bf16, const BatchedParams& p,
                                               const void* Hc_op, float* dHc, int64_t BHc, PhaseProfile& prof) {
  const cudaStream_t s = ctx.stream();
  const int64_t rows = p.rows, N = p.d.N, P = p.d.P, PN = P * N;
  const int64_t sRN = rows * N, sRP = rows * P, sRR = rows * rows;
  // dW = dy·vᵀ, then coef's gradient and dS = dW ⊙ coef (W = S ⊙ coef is the mask's).
  batched_gemm(ctx, bf16, false, true, rows, rows, P, p.dY, P, sRP, p.V, P, sRP, 0.0f, p.dWf, rows, sRR, BHc);
  prof.mark("gemm dW");
  launch_batched_coef(s, p);
  prof.mark("coef");
  batched_gemm(ctx, bf16, true, false, rows, P, rows, p.W, rows, sRR, p.dY, P, sRP, 0.0f, p.dV, P, sRP, BHc);
  prof.mark("gemm dV");
  batched_gemm(ctx, bf16, false, false, rows, N, rows, p.dS, rows, sRR, p.K, N, sRN, 0.0f, p.dQ, N, sRN, BHc);
  batched_gemm(ctx, bf16, false, false, rows, N, P, p.dYe, P, sRP, Hc_op, N, PN, 1.0f, p.dQ, N, sRN, BHc);
  prof.mark("gemm dQ");
  batched_gemm(ctx, bf16, true, false, rows, N, rows, p.dS, rows, sRR, p.Q, N, sRN, 0.0f, p.dK, N, sRN, BHc);
  prof.mark("gemm dK");
  // Chunk c's dH contribution (e^Λ ⊙ dy)ᵀ·q → slot c − 1 (chunk 0's into the previous sequence's last slot, which the
  // reverse scan zeroes, or into the extra slot before the first); the scan gives the dH entering every chunk (and
  // its bf16 copy for the bf16 mode's products).
  batched_gemm(ctx, bf16, true, false, P, N, rows, p.dYe, P, sRP, p.Q, N, sRN, 0.0f, dHc - PN, N, PN, BHc);
  prof.mark("gemm G");
}

void Mamba3TrainGpu::forward(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t B, int64_t L,
                             const float* u, float* out, Mamba3TrainActivations* keep, const uint16_t* u16,
                             uint16_t* out16) {
  MAMBA3_CHECK(B >= 0 && L >= 0, "Mamba3TrainGpu::forward: negative batch {} or length {}", B, L);
  if (B == 0 || L == 0) return;
  if (gemm.precision() != Precision::BF16) out16 = nullptr;
  MAMBA3_CHECK(out || out16, "Mamba3TrainGpu::forward: no output buffer (out, or out16 in the bf16 mode)");
  check_weights(c_, w);
  act_ = keep ? keep : &own_;
  act_->valid = false;
  const MixerDims d = make_dims(c_, B, L);
  PhaseProfile prof(ctx.stream(), "mixer forward profile", 2);
  prepare(ctx, gemm, w, B, L, u, u16, &prof);
  if (chunk_batched_) {
    // out_proj beside the walk (set_out_proj_beside): asked for here, where its operands are known; batched_chunks
    // says whether the walk ran with the counters (walk_ready_used_).
    const bool bf16 = gemm.precision() == Precision::BF16;
    walk_ready_wanted_ = out_proj_beside_ && bf16 && o_in_bf16(gemm) && w.out_proj16 &&
                         out_proj_beside_supported(L, c_.d_inner(), c_.d_model, act_->o16.raw(), w.out_proj16,
                                                   out16 ? static_cast<const void*>(out16) : out);
    walk_ready_used_ = false;
    batched_chunks(ctx, bf16, w, B, L, false, nullptr, prof);
    walk_ready_wanted_ = false;
    act_->B = B, act_->L = L, act_->valid = true;
    out_proj_beside_used_ = walk_ready_used_;
    if (walk_ready_used_) {
      OutProjBesideParams op{};
      op.o16 = act_->o16.as<uint16_t>(), op.w16 = w.out_proj16, op.out16 = out16, op.out = out16 ? nullptr : out;
      op.B = B, op.L = L, op.K = int(c_.d_inner()), op.D = int(c_.d_model), op.nc = int(L / 64);
      op.ready = walk_ready_.counters(), op.target = walk_ready_.target();
      launch_out_proj_beside(ctx.stream(), op);
    } else {
      out_projection(ctx, gemm, w, B * L, out, out16);
    }
    prof.mark("out_proj");
    prof.report();
    return;
  }
  int fwd_blocks = 1;
  const int T = forward_chunk_length(L, fwd_blocks);
  ChunkParams p = base_params(d, T, w, *act_);
  p.tc = chunk_tc_ && gemm.precision() == Precision::BF16;
  p.parallel = chunk_parallel_;
  if (p.parallel) {  // chunk-start states (B·H, chunks, P, N) and decays from the state kernel and the scan
    const int64_t BHc = B * d.H * ((L + T - 1) / T);
    reserve_floats(act_->Hc, BHc * d.P * d.N);
    reserve_floats(decay_, BHc);
    p.Hc = f(act_->Hc), p.decay = f(decay_);
    p.fwd_blocks = fwd_blocks;
  }
  launch_chunk_forward(ctx.stream(), p, false);
  out_projection(ctx, gemm, w, B * L, out, out16);
}

void Mamba3TrainGpu::out_projection(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w, int64_t M,
                                    float* out, uint16_t* out16) {
  const int64_t di = c_.d_inner(), D = c_.d_model;
  if (out16) {  // the bf16 mode: the result rounded once by the product
    const bool o16 = o_in_bf16(gemm);
    gemm.run_mixed_bf16_out(ctx, false, true, M, D, di, 1.0f, o16 ? nullptr : f(act_->o),
                            o16 ? act_->o16.as<uint16_t>() : nullptr, di, w.out_proj, w.out_proj16, di, out16, D);
  } else if (o_in_bf16(gemm))
    gemm.run_mixed(ctx, false, true, M, D, di, 1.0f, nullptr, act_->o16.as<uint16_t>(), di, w.out_proj, w.out_proj16,
                   di, 0.0f, out, D);
  else
    gemm.run_mixed(ctx, false, true, M, D, di, 1.0f, f(act_->o), nullptr, di, w.out_proj, w.out_proj16, di, 0.0f, out,
                   D);
}

void Mamba3TrainGpu::fused_chunks_backward(const Context& ctx, bool bf16, const Mamba3TrainWeights& w, int64_t B,
                                           int64_t L, int T, const PartOffsets& parts) {
  const MixerDims d = make_dims(c_, B, L);
  const int64_t BHL = B * d.H * L;
  ChunkParams p = base_params(d, T, w, *act_);
  p.tc = chunk_tc_ && bf16;
  p.parallel = chunk_parallel_;
  p.dO = f(dO_), p.dzx = f(dzx_), p.dy = f(dy_), p.Hc = f(act_->Hc);
  if (p.parallel) {
    p.dHc = f(dHc_), p.decay = f(decay_);
    p.fwd_blocks = chunk_blocks_ == 2 ? 2 : 1;
    // Auto keeps the plain tensor-core reverse kernel: at 106 registers it already fits two blocks' registers.
    p.rev_blocks = p.tc && chunk_blocks_ == 0 ? 1 : reverse_blocks(T);
  }
  p.part_mimo_z = f(part_, parts.mimo_z), p.part_mimo_o = f(part_, parts.mimo_o), p.part_norm = f(part_, parts.norm);
  p.dBn = f(dBn_), p.dCn = f(dCn_), p.dphi = f(dphi_);
  p.dadt = f(sgrad_), p.dgam = f(sgrad_, BHL), p.dscale = f(sgrad_, 2 * BHL);
  p.part_B_bias = f(part_, parts.B_bias), p.part_C_bias = f(part_, parts.C_bias);
  p.part_mimo_x = f(part_, parts.mimo_x), p.part_D = f(part_, parts.D);
  launch_chunk_forward(ctx.stream(), p, true);
  launch_chunk_reverse(ctx.stream(), p);
}

void Mamba3TrainGpu::backward(const Context& ctx, TrainGemm& gemm, const Mamba3TrainWeights& w,
                              const Mamba3TrainGrads& g, int64_t B, int64_t L, const float* u, const float* dout,
                              float* du, Mamba3TrainActivations* kept, const uint16_t* u16,
                              const uint16_t* dout16, uint16_t* du16) {
  MAMBA3_CHECK(B >= 0 && L >= 0, "Mamba3TrainGpu::backward: negative batch {} or length {}", B, L);
  if (B == 0 || L == 0) return;
  if (gemm.precision() != Precision::BF16) du16 = nullptr;
  MAMBA3_CHECK(du || du16, "Mamba3TrainGpu::backward: no du buffer (du, or du16 in the bf16 mode)");
  check_weights(c_, w);
  act_ = kept ? kept : &own_;
  // The kept forward (batched path, same shape, not yet consumed) replaces prepare and the chunk stage's forward.
  const bool reuse = kept && kept->valid && kept->B == B && kept->L == L && chunk_batched_ &&
                     kept->chunk_cores == uses_chunk_cores(gemm.precision() == Precision::BF16, L);
  act_->valid = false;  // consumed: the backward overwrites S, W and Z
  const MixerDims d = make_dims(c_, B, L);
  const int64_t M = B * L, D = c_.d_model, din = d.din, di = d.d_inner, BH = B * d.H, BHL = BH * L;
  const int64_t H = d.H, R = d.R, N = d.N, P = d.P, S = d.S, RG = R * d.G;
  const cudaStream_t s = ctx.stream();
  PhaseProfile prof(s, "mixer backward profile", 2);
  if (!reuse) prepare(ctx, gemm, w, B, L, u, u16);
  prof.mark("prepare");

  const bool batched = chunk_batched_;
  const int T = batched ? batched_chunk_length(L) : chunk_length(L, true);
  const int64_t chunks = (L + T - 1) / T;
  const bool par = chunk_parallel_ || batched;  // the batched path's partials are per chunk too
  const int64_t pc = par ? chunks : 1;  // chunk groups per sequence in the chunk kernels' parameter partials
  // dO in bf16 where the chunk kernels read it so (zx_in_bf16: the batched path), else f32.
  dO16_used_ = batched && zx_in_bf16(gemm);
  if (dO16_used_) reserve_elems(dO16_, M * di, 2);
  else reserve_floats(dO_, M * di);
  reserve_floats(dzx_, M * din);
  if (!batched) {
    reserve_floats(dy_, BHL * R * P);
    reserve_floats(act_->Hc, BH * chunks * P * N);
  }
  if (par && !batched) {
    reserve_floats(dHc_, BH * chunks * P * N);
    reserve_floats(decay_, BH * chunks);
  }
  reserve_floats(dBn_, M * H * R * N);
  reserve_floats(dCn_, M * H * R * N);
  reserve_floats(dphi_, BHL * S);
  reserve_floats(sgrad_, 3 * BHL);
  // Partials, one row per batch row (× chunk in the parallel schedule, for those of the chunk kernels; per token row
  // for the B/C norm weights), reduced over rows at the end.
  const int64_t BHp = BH * pc;
  const int64_t n_dtb = BH, n_D = BHp, n_bias = BHp * R * N, n_mimo = BHp * R * P, n_norm = BHp * P,
                n_bcn = M * RG * N;
  const int64_t o_D = n_dtb, o_Bb = o_D + n_D, o_Cb = o_Bb + n_bias, o_mx = o_Cb + n_bias, o_mz = o_mx + n_mimo,
                o_mo = o_mz + n_mimo, o_nm = o_mo + n_mimo, o_Bn = o_nm + n_norm, o_Cn = o_Bn + n_bcn;
  reserve_floats(part_, o_Cn + n_bcn);

  // dO = dout·W_out (the gradient of the gated output o); with the kept o, dW_out += doutᵀ·o beside it (dout
  // rounded once for both).
  const bool o16 = o_in_bf16(gemm);
  const auto out_proj_grad = [&] {
    if (!g.out_proj) return;
    if (o16)
      gemm.run_mixed(ctx, true, false, D, di, M, 1.0f, dout, nullptr, D, nullptr, act_->o16.as<uint16_t>(), di, 1.0f,
                     g.out_proj, di);
    else
      gemm.run(ctx, true, false, D, di, M, 1.0f, dout, D, f(act_->o), di, 1.0f, g.out_proj, di);
  };
  {
    const TrainGemm::HeldA held(gemm, ctx, dout, dout16, M, D, D);
    if (dO16_used_)
      gemm.run_mixed_bf16_out(ctx, false, false, M, di, D, 1.0f, dout, nullptr, D, w.out_proj, w.out_proj16, di,
                              dO16_.as<uint16_t>(), di);
    else
      gemm.run_mixed(ctx, false, false, M, di, D, 1.0f, dout, nullptr, D, w.out_proj, w.out_proj16, di, 0.0f,
                     f(dO_), di);
    if (reuse) out_proj_grad();
  }
  prof.mark("gemm dO");

  // dzx's bf16 rounding from the kernels that write dzx (set_dzx_bf16; the batched path in the bf16 mode): offered
  // to the chunk stage, whose output and epilogue kernels write the z and x columns' rounding when it takes the offer
  // (BatchedParams::dzx16); then the angle/scalar backward writes dt, A, trap's and the angles', the B/C norm
  // backward B and C's. Every column of dzx has exactly one writer in every backward, so no stale byte is read. Not taken:
  // dzx is rounded after the fact, as without the switch.
  uint16_t* offer16 = nullptr;
  if (batched && gemm.precision() == Precision::BF16 && dzx_bf16_) {
    reserve_elems(dzx16_, M * din, 2);
    offer16 = dzx16_.as<uint16_t>();
  }
  dzx16_offer_ = offer16;
  const PartOffsets parts{o_D, o_Bb, o_Cb, o_mx, o_mz, o_mo, o_nm, o_Bn, o_Cn};
  bc_norm_fused_ = false;  // (batched_chunks: whether its rotation backward ran the B/C norm backward)
  angle_seg_ready_ = false;  // (batched_chunks: whether it wrote the angle segment sums)
  core_unrotated_ = false;  // (batched_chunks: whether its fused core un-rotated dQ/dK)
  core_output_used_ = false;  // (batched_chunks: whether its fused core ran the output stage's backward)
  core_beside_used_ = false;
  core_staged_used_ = false;
  core_head_summed_ = false;
  if (batched) batched_chunks(ctx, gemm.precision() == Precision::BF16, w, B, L, true, &parts, prof, reuse);
  else fused_chunks_backward(ctx, gemm.precision() == Precision::BF16, w, B, L, T, parts);
  prof.mark("chunks");
  uint16_t* const dzx16 = offer16 && !dzx16_offer_ ? offer16 : nullptr;  // taken: z and x are written
  dzx16_offer_ = nullptr;
  dzx16_read_ = dzx16 != nullptr;

  AngleBackwardParams ap{};
  ap.d = d, ap.zx = f(act_->zx);
  ap.dt = f(act_->scalars), ap.A = f(act_->scalars, BHL), ap.lam = f(act_->scalars, 2 * BHL);
  ap.dAdl = f(act_->scalars, 3 * BHL);
  ap.dsp = f(act_->scalars, 4 * BHL);
  ap.dphi = f(dphi_), ap.dadt = f(sgrad_), ap.dgam = f(sgrad_, BHL), ap.dscale = f(sgrad_, 2 * BHL);
  ap.dzx = f(dzx_), ap.dzx16 = dzx16, ap.part_dt_bias = f(part_);
  ap.seg = f(act_->angle_seg);  // reserved by prepare
  ap.seg_ready = angle_seg_ready_;
  launch_angle_scalar_backward(s, ap);
  prof.mark("angle bwd");
  if (!bc_norm_fused_) {
    const int slots = !batched ? int(H) : core_head_summed_ ? int(H) / 8 : int(H) / epilogue_heads();
    launch_bc_norm_backward(s, d, slots, f(act_->bc_raw), w.B_norm, w.C_norm, f(dBn_), f(dCn_), f(dzx_), f(part_, o_Bn),
                            f(part_, o_Cn), dzx16);
    prof.mark("bc norm bwd");
  }

  // Parameter partials summed over rows in a fixed order.
  struct Sum {
    float* dst;
    int64_t offset, rows, cols;
  };
  const int64_t Bp = B * pc;
  const Sum sums[] = {{g.dt_bias, 0, B, H},
                      {g.D, o_D, Bp, H},
                      {g.B_bias, o_Bb, Bp, H * R * N},
                      {g.C_bias, o_Cb, Bp, H * R * N},
                      {c_.is_mimo ? g.mimo_x : nullptr, o_mx, Bp, H * R * P},
                      {c_.is_mimo ? g.mimo_z : nullptr, o_mz, Bp, H * R * P},
                      {c_.is_mimo ? g.mimo_o : nullptr, o_mo, Bp, H * R * P},
                      {c_.is_outproj_norm ? g.norm : nullptr, o_nm, Bp, H * P},
                      {g.B_norm, o_Bn, M * RG, N},
                      {g.C_norm, o_Cn, M * RG, N}};
  // All in two launches, each sum with its own scratch.
  size_t scratch = 0;
  for (const Sum& x : sums) scratch += x.dst ? colsum_scratch_floats(x.rows, x.cols) : 0;
  reserve_floats(colsum_, int64_t(std::max<size_t>(scratch, 1)));
  ColsumJob jobs[std::size(sums)];
  int count = 0;
  scratch = 0;
  for (const Sum& x : sums)
    if (x.dst) {
      jobs[count++] = {f(part_, size_t(x.offset)), x.rows, x.cols, x.dst, f(colsum_, scratch)};
      scratch += colsum_scratch_floats(x.rows, x.cols);
    }
  colsum_add_batch(s, jobs, count);
  prof.mark("colsums");

  // Projections: du = dzx·W_in, dW_in += dzxᵀ·u, dW_out += doutᵀ·o. dzx's bf16 operand (the bf16 mode): its
  // producers' rounding, else dzx rounded once for both products (HeldA). u16, the weight's mirror: where given.
  {
    std::optional<TrainGemm::HeldA> held;
    if (!dzx16) held.emplace(gemm, ctx, f(dzx_), M, din, din);
    if (du16)
      gemm.run_mixed_bf16_out(ctx, false, false, M, D, din, 1.0f, f(dzx_), dzx16, din, w.in_proj, w.in_proj16, D,
                              du16, D);
    else
      gemm.run_mixed(ctx, false, false, M, D, din, 1.0f, f(dzx_), dzx16, din, w.in_proj, w.in_proj16, D, 0.0f, du,
                     D);
    if (g.in_proj)
      gemm.run_mixed(ctx, true, false, din, D, M, 1.0f, f(dzx_), dzx16, din, u, u16, D, 1.0f, g.in_proj, D);
  }
  if (!reuse) out_proj_grad();
  prof.mark("gemm projections");
  prof.report();
}

}  // namespace mamba3::cuda
