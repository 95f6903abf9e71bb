#include "cuda/mamba3_layer_gpu.h"

#include "cuda/basic_kernels.h"
#include "cuda/env_switch.h"
#include "cuda/mamba3_decode_gpu.h"
#include "cuda/mamba3_stage_gpu.h"
#include "model/mamba3_mixer.h"

namespace mamba3::cuda {

namespace {
// Sections start on 16-byte boundaries (the decode kernel copies the ssm state in 16-byte pieces).
int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }

// MAMBA3_PREFILL_PATH, read once per process (the bench and users compare the paths without rebuilding).
Mamba3GpuPath env_default_path() {
  static const Mamba3GpuPath path = [] {
    const std::string s = env_choice("MAMBA3_PREFILL_PATH", {"chunked", "staged", "fused"});
    return s == "staged" ? Mamba3GpuPath::Staged : (s == "fused" ? Mamba3GpuPath::Fused : Mamba3GpuPath::Chunked);
  }();
  return path;
}

// MAMBA3_FUSED_DECODE_MAX: decode steps of at most this many (sequence, head) pairs run the fused kernel when the
// path is chosen automatically; default 0: the one-kernel head decode (mamba3_decode_gpu.h) at every batch. It
// won for SISO (H200, 1.5B: b1 1.58 vs 1.63 ms, b16 2.32 vs 2.40 ms) and, since it stages its own head, for MIMO
// R = 4 too (b1 1.225 vs 1.649 ms, b16 2.318 vs 3.279 ms; H200, 2026-12-01). Read once.
int64_t env_fused_decode_max() {
  static const int64_t limit = env_integer("MAMBA3_FUSED_DECODE_MAX", 0, 0, int64_t(1) << 40);
  return limit;
}

// MAMBA3_PREFILL_STAGE_MB: the staged prefill's scratch bound in MiB. Default 1024 (one buffer per model, so the
// bound is paid once): 1.5B b128 prefill 82.6k tokens/s against 69.0k with 256 MiB (segments of 96 vs 24 tokens:
// the chunked kernel reloads the state once per segment; H200, 2026-12-01). Read once.
size_t env_prefill_stage_bytes() {
  static const size_t bytes = size_t(env_integer("MAMBA3_PREFILL_STAGE_MB", 1024, 1, int64_t(1) << 20)) << 20;
  return bytes;
}
}  // namespace

int64_t GpuMamba3Layer::fused_decode_max() const { return env_fused_decode_max(); }

GpuMamba3State::GpuMamba3State(const Mamba3Config& c, int64_t batch_rows, bool bf16, int every)
    : batch(batch_rows), heads(c.nheads()), sizes(c), config(c), ssm_bf16(bf16), write_every(every) {
  MAMBA3_CHECK(every == 1 || every == 2 || every == kMaxStateWriteEvery,
               "GpuMamba3State: write_every {} (state writes every 1, 2 or 4 decode steps)", every);
  const int64_t floats =
      lazy_offset() + (every > 1 ? round4(batch * heads) : 0) + batch * heads * mamba3_ring_floats_per_head(c, every);
  buffer.resize(size_t(floats) * sizeof(float));
  MAMBA3_CUDA_CHECK(cudaMemset(buffer.raw(), 0, buffer.bytes()));
}

int64_t GpuMamba3State::lazy_offset() const {
  return round4(batch * sizes.angle) + ssm_section_floats() + round4(batch * sizes.k) + round4(batch * sizes.v) +
         round4(batch * heads) + mamba3_gpu_stage_floats(config, batch, 1);
}

void* GpuMamba3State::lazy_row(int64_t row) const { return buffer.as<float>() + lazy_offset() + row * heads; }

size_t GpuMamba3State::lazy_row_bytes() const { return write_every > 1 ? size_t(heads) * 4 : 0; }

size_t GpuMamba3State::ring_row_bytes() const {
  return size_t(heads * mamba3_ring_floats_per_head(config, write_every)) * 4;
}

void* GpuMamba3State::ring_row(int64_t row) const {
  return buffer.as<float>() + lazy_offset() + round4(batch * heads) +
         row * heads * mamba3_ring_floats_per_head(config, write_every);
}

int64_t GpuMamba3State::ssm_section_floats() const {
  return round4(ssm_bf16 ? (batch * sizes.ssm + 1) / 2 : batch * sizes.ssm);
}

void* GpuMamba3State::ssm_row(int64_t row) const {
  char* section = reinterpret_cast<char*>(buffer.as<float>() + round4(batch * sizes.angle));
  return section + size_t(row) * ssm_row_bytes();
}

Mamba3GpuState GpuMamba3State::rows_from(int64_t row) const {
  float* base = buffer.as<float>();
  float* angle = base;
  float* ssm = angle + round4(batch * sizes.angle);
  float* k = ssm + ssm_section_floats();
  float* v = k + round4(batch * sizes.k);
  int* arrivals = reinterpret_cast<int*>(v + round4(batch * sizes.v));
  float* stage_base = reinterpret_cast<float*>(arrivals) + round4(batch * heads);
  // The decode stage is batch-major per array: row `row`'s views start `row` rows in.
  Mamba3GpuStage stage = mamba3_gpu_stage_view(config, stage_base, batch, 1);
  stage.phi += row * sizes.angle;
  stage.k += row * 2 * sizes.k;
  stage.q += row * sizes.k;
  stage.scal += row * heads * 4;
  Mamba3GpuState view{angle + row * sizes.angle, ssm + row * sizes.ssm, k + row * sizes.k, v + row * sizes.v,
                      arrivals + row * heads, stage, /*active=*/nullptr};
  if (ssm_bf16) view.ssm = nullptr, view.ssm16 = static_cast<uint16_t*>(ssm_row(row));
  if (write_every > 1) {
    view.lazy = static_cast<int*>(lazy_row(row));
    view.ring = static_cast<float*>(ring_row(row));
    view.write_every = write_every;
  }
  return view;
}

GpuMamba3Layer::GpuMamba3Layer(const Mamba3Config& config, const TensorMap& weights, const std::string& prefix,
                               const std::string& source, std::set<std::string>* used, Precision precision)
    : config_(config),
      precision_(precision),
      path_(env_default_path()),
      prefill_stage_bytes_(env_prefill_stage_bytes()),
      prefill_stage_(std::make_shared<DeviceBuffer>()),
      state_scratch_(std::make_shared<DeviceBuffer>()) {
  const std::string why = mamba3_gpu_supported(config);
  MAMBA3_CHECK(why.empty(), "{}: {}: the CUDA backend does not support this Mamba-3 configuration ({})", source, prefix,
               why);
  // The CPU layer performs every name and shape check and widens to f32; this one uploads its parameters.
  const Mamba3Mixer host(config, weights, prefix, source, used);
  in_proj_ = GpuMatrix::upload(host.param("in_proj.weight"), precision);
  out_proj_ = GpuMatrix::upload(host.param("out_proj.weight"), precision);
  auto up = [&](const char* name, DeviceBuffer& dst) -> const float* {
    if (name == std::string("norm.weight") && !config.is_outproj_norm) return nullptr;
    if ((name == std::string("mimo_x") || name == std::string("mimo_z") || name == std::string("mimo_o")) &&
        !config.is_mimo)
      return nullptr;
    dst = upload_f32(host.param(name));
    return dst.as<float>();
  };
  params_.dt_bias = up("dt_bias", dt_bias_);
  params_.B_bias = up("B_bias", B_bias_);
  params_.C_bias = up("C_bias", C_bias_);
  params_.B_norm = up("B_norm.weight", B_norm_);
  params_.C_norm = up("C_norm.weight", C_norm_);
  params_.D = up("D", D_);
  params_.mimo_x = up("mimo_x", mimo_x_);
  params_.mimo_z = up("mimo_z", mimo_z_);
  params_.mimo_o = up("mimo_o", mimo_o_);
  params_.norm = up("norm.weight", norm_);
}

size_t GpuMamba3Layer::parameter_bytes() const {
  size_t n = in_proj_.nbytes() + out_proj_.nbytes();
  for (const DeviceBuffer* b : {&dt_bias_, &B_bias_, &C_bias_, &B_norm_, &C_norm_, &D_, &mimo_x_, &mimo_z_, &mimo_o_,
                                &norm_})
    n += b->bytes();
  return n;
}

bool GpuMamba3Layer::decodes_bf16_state() const {
  return mamba3_head_decode_reaches(mamba3_kernel_shape(config_, 1, precision_));
}

bool GpuMamba3Layer::defers_state_writes() const {
  Mamba3GpuState probe{};  // aligned stand-ins: only the shape and the decode choice decide
  alignas(16) static float dummy[4];
  probe.ssm = probe.k = probe.ring = dummy;
  probe.lazy = reinterpret_cast<int*>(dummy);
  probe.write_every = 2;
  return mamba3_decode_defers_writes(mamba3_kernel_shape(config_, 1, precision_), probe);
}

void GpuMamba3Layer::settle(const Context& ctx, const Mamba3GpuState& state, int64_t batch) const {
  mamba3_settle_gpu(ctx.stream(), config_, params_.mimo_x, state, batch);
}

void GpuMamba3Layer::forward(const Context& ctx, const void* x, int64_t batch, int64_t L, Mamba3GpuState state,
                             float* zx, void* o, float* out, const std::function<void(Edge)>& edge,
                             const FoldedNorms* folded) const {
  const int64_t rows = batch * L;
  const Mamba3GpuPath chosen =
      auto_path_ && L == 1 && batch * config_.nheads() <= fused_decode_max() ? Mamba3GpuPath::Fused : path_;
  if (state.write_every > 1 && !(L == 1 && chosen != Mamba3GpuPath::Fused &&
                                 mamba3_decode_defers_writes(mamba3_kernel_shape(config_, 1, precision_), state))) {
    // Every other kernel reads the state as spec §4.2 has it: the pending tokens folded in first.
    settle(ctx, state, batch);
    state.lazy = nullptr, state.ring = nullptr, state.write_every = 1;
    state.settled = false;
  }
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (state.ssm16 && !(L == 1 && chosen != Mamba3GpuPath::Fused && decodes_bf16_state() && aligned16(state.ssm16) &&
                       aligned16(state.k))) {
    // The bf16-state mode where only f32 kernels apply: the rows' state widened (exactly) into the scratch, the call
    // run on it, the result rounded back (rows a decode skips round back to their own bits).
    const int64_t n = batch * Mamba3StateSizes(config_).ssm;
    state_scratch_->reserve(size_t(n) * sizeof(float));
    float* wide = state_scratch_->as<float>();
    bf16_to_f32(ctx.stream(), state.ssm16, n, wide);
    Mamba3GpuState f32_state = state;
    f32_state.ssm = wide, f32_state.ssm16 = nullptr;
    f32_state.settled = false;  // `wide` was written just now, inside the step
    forward(ctx, x, batch, L, f32_state, zx, o, out, edge, folded);
    to_activation(ctx.stream(), wide, n, state.ssm16, Precision::BF16);
    return;
  }
  if (folded && folded->in) {
    MAMBA3_CHECK(folded_norm_supported(ctx, in_proj_, rows),
                 "GpuMamba3Layer: in_proj cannot take a folded norm at {} rows", rows);
    linear_scaled(ctx, in_proj_, x, rows, zx, *folded->in);
  } else {
    linear(ctx, in_proj_, x, rows, zx);
  }
  if (edge) edge(Edge::AfterInProj);
  Mamba3GpuStage stage;
  // Chunked: the staged kernels, with the chunked state kernel for bf16 prefills (f32 keeps the exact stream kernel).
  const bool chunked = chosen == Mamba3GpuPath::Chunked && L > 1 && precision_ == Precision::BF16;
  const Mamba3GpuPath path = chosen == Mamba3GpuPath::Chunked ? Mamba3GpuPath::Staged : chosen;
  if (path == Mamba3GpuPath::Staged && L > 1) {
    const int64_t tokens = mamba3_gpu_stage_tokens(config_, batch, L, prefill_stage_bytes_);
    prefill_stage_->reserve(size_t(mamba3_gpu_stage_floats(config_, batch, tokens)) * sizeof(float));
    stage = mamba3_gpu_stage_view(config_, prefill_stage_->as<float>(), batch, tokens);
  }
  if (chunked) {
    MAMBA3_CHECK(rows < (int64_t(1) << 31) && batch * config_.nheads() < (int64_t(1) << 31),
                 "Mamba-3 CUDA kernel: batch {} too large", batch);
    if (rows > 0)
      mamba3_staged_gpu(ctx.stream(), config_, params_, batch, L, zx, state, o, precision_, stage,
                        /*chunked_prefill=*/true);
  } else {
    mamba3_recurrent_gpu(ctx.stream(), config_, params_, batch, L, zx, state, o, precision_, path, stage);
  }
  if (edge) edge(Edge::BeforeOutProj);
  if (folded && folded->out) {
    MAMBA3_CHECK(folded_norm_supported(ctx, out_proj_, rows),
                 "GpuMamba3Layer: out_proj cannot take a folded norm at {} rows", rows);
    linear_residual_norm(ctx, out_proj_, o, rows, *folded->out);
  } else {
    linear(ctx, out_proj_, o, rows, out);
  }
}

}  // namespace mamba3::cuda
