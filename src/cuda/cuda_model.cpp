#include "cuda/cuda_model.h"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <set>

#include "cuda/attention_gpu.h"
#include "cuda/basic_kernels.h"
#include "cuda/device_buffer.h"
#include "cuda/env_switch.h"
#include "cuda/gemv_small_m.h"
#include "cuda/gpu_matrix.h"
#include "cuda/mamba3_decode_gpu.h"
#include "cuda/mamba3_layer_gpu.h"
#include "cuda/sampling_gpu.h"
#include "cuda/stream_gemm.h"
#include "cuda/weight_prefetch.h"
#include "io/weights.h"
#include "model/gated_mlp.h"

namespace mamba3::cuda {

namespace {

// Activation buffers for `rows` token rows (a prefill segment, or one decode step of a batch).
struct Workspace {
  DeviceBuffer ids, hidden, residual, normed, mlp, mlp_act, zx, o, logits;
  DeviceBuffer norm_partials;  // decode with folded norms: a product's partial Σ v² (gpu_matrix.h: folded_norm_parts)
  DeviceBuffer last;  // (logit rows, D) activations: each prompt's last row, gathered for fixed-shape products
  int64_t rows = 0, logit_rows = 0;
};

// fc1 (2F, D) = [value rows; gate rows] with its rows interleaved, value j at row 2j and gate j at 2j + 1: the
// activation then reads neighbouring columns, and at batch 1–4 the matrix-vector kernel finds both halves of a pair
// in one block and applies it in its epilogue (linear_gated_silu). The same values in another order: exact.
Tensor interleave_gate_rows(const Tensor& fc1) {
  const Tensor w = fc1.to(DType::F32);
  const int64_t f = w.dim(0) / 2, d = w.dim(1);
  Tensor out = Tensor::empty(DType::F32, {2 * f, d});
  const float* src = static_cast<const float*>(w.raw());
  float* dst = static_cast<float*>(out.raw());
  for (int64_t j = 0; j < f; ++j) {
    std::copy_n(src + j * d, d, dst + 2 * j * d);
    std::copy_n(src + (f + j) * d, d, dst + (2 * j + 1) * d);
  }
  return out;
}

// MAMBA3_DECODE_NORM_FOLD (1 | 0, default 1): one-row decode steps fold the RMSNorms into the matrix-vector products.
// Read once.
bool fold_norms_from_env() {
  static const bool on = env_choice("MAMBA3_DECODE_NORM_FOLD", {"1", "0"}) != "0";
  return on;
}

// MAMBA3_DECODE_STATE_WRITES (auto | 1 | 2 | 4, default auto = 0): caches write each head's Mamba-3 state every n-th
// decode step (Mamba3GpuState::write_every). Read once.
int state_writes_from_env() {
  static const int every = [] {
    const std::string s = env_choice("MAMBA3_DECODE_STATE_WRITES", {"auto", "1", "2", "4"});
    return s.empty() || s == "auto" ? 0 : std::stoi(s);
  }();
  return every;
}

}  // namespace

struct GpuCache::Impl {
  int64_t batch = 0, capacity = 0;
  std::vector<int64_t> positions;
  std::vector<std::unique_ptr<GpuMamba3State>> mamba;      // per layer (null for attention layers)
  std::vector<std::unique_ptr<GpuAttentionCache>> attn;    // per layer (null for Mamba-3 layers)
  Workspace ws;                                            // the decode step's buffers
  DeviceBuffer active;                                     // (batch) int32: rows that decode steps advance
  std::vector<uint8_t> active_host;                        // the same on the host (positions, capacity check)
  std::vector<int32_t> active_staging;                     // source of the last mask upload (kept alive)
  int steps_run = 0;                                       // eager steps before capture
  const GpuSampler* graph_sampler = nullptr;               // the sampler captured in the graph (if any)
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;

  ~Impl() {
    if (graph_exec) cudaGraphExecDestroy(graph_exec);
    if (graph) cudaGraphDestroy(graph);
  }
};

GpuCache::GpuCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuCache::GpuCache(GpuCache&&) noexcept = default;
GpuCache& GpuCache::operator=(GpuCache&&) noexcept = default;
GpuCache::~GpuCache() = default;
int64_t GpuCache::batch() const { return impl_->batch; }
int64_t GpuCache::capacity() const { return impl_->capacity; }
int64_t GpuCache::position(int64_t row) const { return impl_->positions.at(size_t(row)); }
int32_t* GpuCache::device_ids() const { return impl_->ws.ids.as<int32_t>(); }
float* GpuCache::device_logits() const { return impl_->ws.logits.as<float>(); }
void GpuCache::upload_logits(const Tensor& logits) const {
  MAMBA3_CHECK(logits.dtype() == DType::F32 && logits.ndim() == 2 && logits.dim(0) == impl_->batch &&
                   logits.nbytes() <= impl_->ws.logits.bytes(),
               "upload_logits: expected F32 logits ({}, V_pad), got {} {}", impl_->batch, dtype_name(logits.dtype()),
               shape_str(logits.shape()));
  impl_->ws.logits.upload(logits.raw(), logits.nbytes());
}

struct CudaModel::Impl {
  struct Block {
    std::unique_ptr<GpuMamba3Layer> mamba;
    std::unique_ptr<GpuAttentionLayer> attention;
    GpuMatrix fc1, fc2;
    bool has_mlp = false;
    DeviceBuffer norm_w, norm_b, norm2_w, norm2_b;
  };

  ModelConfig config;
  Precision precision;
  std::unique_ptr<Context> ctx;
  GpuMatrix embedding, lm_head;  // lm_head aliases the embedding's buffer when tied (see `head`)
  bool tied = true;
  DeviceBuffer norm_f_w, norm_f_b;
  std::vector<Block> blocks;
  bool use_graphs = true;
  Precision state_precision = Precision::F32;  // of the Mamba-3 ssm state in caches made from now on
  int64_t prefill_row_block = 0;  // Context::gemm_row_block during prefill (0: off)
  mutable Workspace prefill_ws;
  mutable WeightPrefetcher prefetcher;  // decode steps' weight requests into L2 (set_weight_prefetch)
  bool fold_norms = fold_norms_from_env();  // set_fold_norms
  int state_writes_every = state_writes_from_env();  // set_state_writes_every (0: auto)

  // The write interval of a layer's states in a cache of `batch` rows: the set one where its decode defers, else 1.
  // Auto (H100, 1.5B, with read-only steps; docs/kernels/mamba3_cuda.md): SISO every 4 steps from 128 rows (b128
  // 5.60–5.62 → 5.45–5.47 ms against every 2; every step 6.38) and every 2 below (b16 1.970 against 1.986–1.991 at
  // every 4); MIMO every 2 (b128 6.99 → 6.93–6.96; every 4 is slower, 7.76–7.77). copy_row between caches of
  // different intervals folds the source row's pending tokens in first (the server's one-row prompt caches and slots).
  int writes_every(const GpuMamba3Layer& layer, int64_t batch) const {
    if (!layer.defers_state_writes()) return 1;
    if (state_writes_every > 0) return state_writes_every;
    return layer.config().is_mimo || batch < 128 ? 2 : kMaxStateWriteEvery;
  }

  const GpuMatrix& head() const { return tied ? embedding : lm_head; }
  size_t act() const { return activation_size(precision); }

  void reserve(Workspace& ws, int64_t rows, int64_t logit_rows) const {
    const ModelConfig& c = config;
    // Fixed-shape products (Context::gemm_row_block) need the padded last block, plus one block of slack for the
    // per-sequence attention products whose padding runs past their sequence's rows.
    if (const int64_t block = ctx->gemm_row_block(); block > 0)
      rows = ctx->padded_rows(rows) + block, logit_rows = ctx->padded_rows(logit_rows);
    if (rows > ws.rows) {
      int64_t zx_cols = 0, o_cols = 0;
      for (const Block& b : blocks)
        if (b.mamba) zx_cols = std::max(zx_cols, b.mamba->config().d_in_proj()), o_cols = b.mamba->config().d_inner();
      ws.ids.resize(size_t(rows) * 4);
      ws.hidden.resize(size_t(rows * c.d_model) * 4);
      ws.residual.resize(size_t(rows * c.d_model) * 4);
      ws.normed.resize(size_t(rows * c.d_model) * act());
      ws.mlp.resize(size_t(rows * 2 * std::max<int64_t>(1, c.d_ff())) * 4);
      ws.mlp_act.resize(size_t(rows * std::max<int64_t>(1, c.d_ff())) * act());
      ws.zx.resize(size_t(rows * std::max<int64_t>(1, zx_cols)) * 4);
      ws.o.resize(size_t(rows * std::max<int64_t>(1, o_cols)) * act());
      // At most one per output column at one row (gemv_norm_parts); one per batch row and tile of ≥ 64 columns at
      // 65–128 rows (stream_gemm_norm_parts; 64-row tiles under MAMBA3_STREAM_GEMM_WIDE_TILE=64).
      ws.norm_partials.resize(size_t(kStreamGemmMaxRows * ((c.d_model + 63) / 64)) * 4);
      ws.rows = rows;
    }
    if (logit_rows > ws.logit_rows) {
      ws.logits.resize(size_t(logit_rows * c.vocab_padded()) * 4);
      ws.last.resize(size_t(logit_rows * c.d_model) * act());
      ws.logit_rows = logit_rows;
    }
  }

  const float* nb(const DeviceBuffer& b) const { return b.empty() ? nullptr : b.as<float>(); }

  // Whether a decode step of `rows` rows folds the blocks' RMSNorms into their products (set_fold_norms): bf16
  // weights and activations; every block a Mamba-3 mixer (SISO, or MIMO at more than one row) and a GatedMLP without
  // biases, with RMSNorms without biases; every product taking the folded forms at this row count (gpu_matrix.h: one
  // row on the matrix-vector kernel as linear() routes it, 65–128 on the stream GEMM's wide class unless
  // MAMBA3_STREAM_GEMM=0: stream_gemm_folds_preferred) — else the step runs the add + norm kernels.
  bool folds_norms(int64_t rows) const {
    if (!fold_norms || precision != Precision::BF16 || !config.rms_norm) return false;
    const auto folds = [&](const GpuMatrix& w) { return folded_norm_supported(*ctx, w, rows); };
    for (const Block& b : blocks) {
      if (!b.mamba || !b.has_mlp || !b.norm_b.empty() || !b.norm2_b.empty()) return false;
      // MIMO folds at the wide class's rows only: a 1.5B MIMO R = 4 step at one row measured slower folded (H200, b1
      // 1.187–1.195 ms against 1.208–1.209 with the state requested early either way; SISO 1.127 against 1.135–1.136).
      if (b.mamba->config().is_mimo && rows == 1) return false;
      if (!folds(b.mamba->in_proj()) || !folds(b.mamba->out_proj()) || !folds(b.fc1) || !folds(b.fc2)) return false;
    }
    return !blocks.empty();
  }

  // The blocks and the final norm over `batch` sequences of L rows each (decode: L = 1), starting from ws.hidden
  // (the embeddings). Leaves norm_f's output in ws.normed. A decode step whose weights the prefetcher requests asks
  // for each product's weights one kernel or one product ahead (weight_prefetch.h); decode() begins and ends them.
  void run_blocks(Workspace& ws, GpuCache::Impl& cache, int64_t row0, int64_t batch, int64_t L, bool decode) const {
    const ModelConfig& c = config;
    const int64_t D = c.d_model, rows = batch * L;
    const float eps = float(c.norm_epsilon);
    const cudaStream_t s = ctx->stream();
    float* hidden = ws.hidden.as<float>();
    float* residual = ws.residual.as<float>();
    char* normed = ws.normed.as<char>();
    const WeightPrefetch pf = decode && prefetcher.active(rows) ? prefetcher.options().mode : WeightPrefetch::Off;
    const auto request = [&](const GpuMatrix* w) {
      if (w) prefetcher.request(s, *w);
    };
    // The first product after layer li: the next Mamba-3 layer's in_proj, the lm_head after the last layer (none
    // before an attention layer: its products are its own).
    const auto after_layer = [&](size_t li) -> const GpuMatrix* {
      if (li + 1 == blocks.size()) return &head();
      return blocks[li + 1].mamba ? &blocks[li + 1].mamba->in_proj() : nullptr;
    };
    // Decode with the norms folded into the products (folds_norms): the add + norm before each layer's in_proj (but
    // the first) and before each fc1 happen in the product before them and the product after them.
    const bool fold = decode && folds_norms(rows);
    float* partials = fold ? ws.norm_partials.as<float>() : nullptr;
    // A product's partial sums must fit the buffer sized above (a wider split of the outputs would overrun it).
    const auto checked_parts = [&](int64_t parts) {
      MAMBA3_CHECK(size_t(rows == 1 ? parts : parts * kStreamGemmMaxRows) * 4 <= ws.norm_partials.bytes(),
                   "decode with folded norms: {} partial sums per row do not fit the buffer", parts);
      return parts;
    };
    int64_t parts = 0;  // partials the last residual-norm product wrote
    for (size_t li = 0; li < blocks.size(); ++li) {
      const Block& b = blocks[li];
      // in_proj: beside this add+norm (kernel lead, or the first layer), else beside the previous layer's fc2
      if (b.mamba && (pf == WeightPrefetch::Kernel || (pf == WeightPrefetch::Product && li == 0)))
        request(&b.mamba->in_proj());
      const bool folded_in = fold && li > 0;  // the previous fc2 wrote bf16(v ⊙ norm_w) to normed
      if (!folded_in)
        add_norm(s, hidden, residual, rows, D, li == 0, b.norm_w.as<float>(), nb(b.norm_b), eps, normed, precision);
      if (b.mamba) {
        Mamba3GpuState state = cache.mamba[li]->rows_from(row0);
        if (decode) {
          state.active = cache.active.as<int32_t>() + row0;  // decode skips inactive rows
          state.settled = true;  // the step began with the embedding's plain launch (or is a graph replay)
          state.pdl_any_batch = fold;  // in_proj before it is the stream GEMM (Mamba3GpuState::pdl_any_batch)
        }
        std::function<void(GpuMamba3Layer::Edge)> edge;
        if (pf != WeightPrefetch::Off)
          edge = [&](GpuMamba3Layer::Edge e) {
            if (e == GpuMamba3Layer::Edge::AfterInProj) request(&b.mamba->out_proj());  // beside the state kernel
            if (e == GpuMamba3Layer::Edge::BeforeOutProj && pf == WeightPrefetch::Product)
              request(b.has_mlp ? &b.fc1 : after_layer(li));  // beside out_proj (and the add+norm)
          };
        const GemvRowScale in_scale{partials, parts, D, eps};
        const GemvResidualNorm out_norm{residual, b.norm2_w.as<float>(), normed, partials};
        const GpuMamba3Layer::FoldedNorms folded{folded_in ? &in_scale : nullptr, &out_norm};
        b.mamba->forward(*ctx, normed, batch, L, state, ws.zx.as<float>(), ws.o.raw(), hidden, edge,
                         fold ? &folded : nullptr);
        if (fold) parts = checked_parts(folded_norm_parts(*ctx, b.mamba->out_proj(), rows));
      } else if (decode) {
        b.attention->step(*ctx, normed, batch, *cache.attn[li], hidden);
      } else {
        for (int64_t r = 0; r < batch; ++r)
          b.attention->prefill(*ctx, normed + size_t(r * L * D) * act(), L, *cache.attn[li], row0 + r,
                               cache.positions[size_t(row0 + r)], hidden + r * L * D);
      }
      if (b.has_mlp) {
        if (pf == WeightPrefetch::Kernel || (pf == WeightPrefetch::Product && !b.mamba)) request(&b.fc1);
        if (!fold)
          add_norm(s, hidden, residual, rows, D, false, b.norm2_w.as<float>(), nb(b.norm2_b), eps, normed, precision);
        if (pf != WeightPrefetch::Off) request(&b.fc2);  // beside fc1 and the activation
        if (fold)
          linear_gated_silu_scaled(*ctx, b.fc1, normed, rows, ws.mlp_act.raw(), GemvRowScale{partials, parts, D, eps});
        else
          linear_gated_silu(*ctx, b.fc1, normed, rows, ws.mlp.as<float>(), ws.mlp_act.raw(), precision);
        if (pf == WeightPrefetch::Product) request(after_layer(li));  // beside fc2
        if (fold && li + 1 < blocks.size()) {                         // the next layer's norm in fc2's epilogue
          linear_residual_norm(*ctx, b.fc2, ws.mlp_act.raw(), rows,
                               GemvResidualNorm{residual, blocks[li + 1].norm_w.as<float>(), normed, partials});
          parts = checked_parts(folded_norm_parts(*ctx, b.fc2, rows));
        } else {
          linear(*ctx, b.fc2, ws.mlp_act.raw(), rows, hidden);
        }
      }
    }
    if (pf == WeightPrefetch::Kernel) request(&head());  // beside the final norm
    add_norm(s, hidden, residual, rows, D, false, norm_f_w.as<float>(), nb(norm_f_b), eps, normed, precision);
  }

  void decode(GpuCache::Impl& cache) const {
    Workspace& ws = cache.ws;
    const int64_t B = cache.batch;
    // A plain launch, and it must stay one: the step's head decode kernels read their states before their PDL wait
    // (Mamba3GpuState::settled), which is safe only because nothing of this step starts before the last one ended.
    embed(ctx->stream(), ws.ids.as<int32_t>(), B, embedding.weight.raw(), precision, config.d_model,
          ws.hidden.as<float>());
    const bool prefetch = prefetcher.active(B);  // run_blocks asks the same
    if (prefetch) prefetcher.begin();
    run_blocks(ws, cache, 0, B, 1, true);
    linear(*ctx, head(), ws.normed.raw(), B, ws.logits.as<float>());
    if (prefetch) prefetcher.end(ctx->stream());
  }
};

CudaModel CudaModel::load(const std::string& dir, Precision precision) {
  namespace fs = std::filesystem;
  MAMBA3_CHECK(fs::is_directory(dir), "{}: not a model directory", dir);
  ModelConfig config = ModelConfig::load((fs::path(dir) / "config.json").string());
  Weights weights = load_weights(dir);
  return CudaModel(config, weights.tensors(), weights.source(), precision);
}

CudaModel::CudaModel(const ModelConfig& config, const TensorMap& w, const std::string& source, Precision precision)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.config = config;
  m.precision = precision;
  m.ctx = std::make_unique<Context>();
  m.prefetcher.set_options(weight_prefetch_from_env());
  const ModelConfig& c = m.config;
  const int64_t D = c.d_model, V = c.vocab_padded();
  std::set<std::string> used;
  m.embedding = GpuMatrix::upload(load_parameter(w, "backbone.embedding.weight", {V, D}, source, &used), precision);
  m.tied = c.tie_embeddings;
  if (c.tie_embeddings) {
    if (w.count("lm_head.weight")) load_parameter(w, "lm_head.weight", {V, D}, source, &used);
  } else {
    m.lm_head = GpuMatrix::upload(load_parameter(w, "lm_head.weight", {V, D}, source, &used), precision);
  }
  auto load_norm = [&](const std::string& p, DeviceBuffer& weight, DeviceBuffer& bias) {
    weight = upload_f32(load_parameter(w, p + ".weight", {D}, source, &used));
    if (!c.rms_norm) bias = upload_f32(load_parameter(w, p + ".bias", {D}, source, &used));
  };
  // One prefill scratch for every Mamba-3 layer: they run one after another on the model's stream.
  const auto prefill_stage = std::make_shared<DeviceBuffer>();
  const auto state_scratch = std::make_shared<DeviceBuffer>();  // the bf16-state mode's f32 copy, likewise
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "backbone.layers." + std::to_string(i) + ".";
    Impl::Block b;
    load_norm(p + "norm", b.norm_w, b.norm_b);
    if (c.is_attention_layer(i)) {
      b.attention = std::make_unique<GpuAttentionLayer>(c.attn, D, w, p + "mixer.", source, &used, precision);
    } else {
      b.mamba = std::make_unique<GpuMamba3Layer>(c.ssm, w, p + "mixer.", source, &used, precision);
      b.mamba->share_prefill_stage(prefill_stage);
      b.mamba->share_state_scratch(state_scratch);
    }
    if (c.d_intermediate > 0) {
      load_norm(p + "norm2", b.norm2_w, b.norm2_b);
      const int64_t F = c.d_ff();
      b.fc1 = GpuMatrix::upload(
          interleave_gate_rows(load_parameter(w, p + "mlp.fc1.weight", {2 * F, D}, source, &used)), precision);
      b.fc2 = GpuMatrix::upload(load_parameter(w, p + "mlp.fc2.weight", {D, F}, source, &used), precision);
      b.has_mlp = true;
    }
    m.blocks.push_back(std::move(b));
  }
  load_norm("backbone.norm_f", m.norm_f_w, m.norm_f_b);
  for (const auto& [name, t] : w)
    MAMBA3_CHECK(used.count(name), "{}: unexpected tensor '{}' (not a parameter of this configuration)", source, name);
}

CudaModel::CudaModel(CudaModel&&) noexcept = default;
CudaModel::~CudaModel() = default;
const ModelConfig& CudaModel::config() const { return impl_->config; }
Precision CudaModel::precision() const { return impl_->precision; }
const Context& CudaModel::context() const { return *impl_->ctx; }
void CudaModel::set_use_graphs(bool on) { impl_->use_graphs = on; }
void CudaModel::set_fold_norms(bool on) { impl_->fold_norms = on; }
bool CudaModel::decode_folds_norms(int64_t rows) const { return impl_->folds_norms(rows); }
void CudaModel::set_state_precision(Precision p) { impl_->state_precision = p; }
void CudaModel::set_state_writes_every(int every) {
  MAMBA3_CHECK(every == 0 || every == 1 || every == 2 || every == kMaxStateWriteEvery,
               "set_state_writes_every: {} (state writes every 1, 2 or 4 decode steps; 0: by layer)", every);
  impl_->state_writes_every = every;
}
int CudaModel::state_writes_every(int64_t batch) const {
  for (const Impl::Block& b : impl_->blocks)
    if (b.mamba) return impl_->writes_every(*b.mamba, batch);
  return 1;
}
Precision CudaModel::state_precision() const { return impl_->state_precision; }
void CudaModel::set_weight_prefetch(const WeightPrefetchOptions& options) {
  MAMBA3_CHECK(options.min_rows >= 1, "set_weight_prefetch: min_rows must be at least 1, got {}", options.min_rows);
  impl_->prefetcher.set_options(options);
}

size_t CudaModel::weight_prefetch_requests() const { return impl_->prefetcher.requests(); }

void CudaModel::set_prefill_row_block(int64_t rows) {
  MAMBA3_CHECK(rows >= 0, "set_prefill_row_block: {} rows", rows);
  impl_->prefill_row_block = rows;
}

size_t CudaModel::parameter_bytes() const {
  const Impl& m = *impl_;
  size_t n = m.embedding.nbytes() + m.lm_head.nbytes() + m.norm_f_w.bytes() + m.norm_f_b.bytes();
  for (const Impl::Block& b : m.blocks) {
    if (b.mamba) n += b.mamba->parameter_bytes();
    if (b.attention) n += b.attention->parameter_bytes();
    n += b.fc1.nbytes() + b.fc2.nbytes() + b.norm_w.bytes() + b.norm_b.bytes() + b.norm2_w.bytes() + b.norm2_b.bytes();
  }
  return n;
}

size_t CudaModel::state_bytes_per_sequence(int64_t batch) const {
  size_t n = 0;
  for (const Impl::Block& b : impl_->blocks)
    if (b.mamba) {
      const Mamba3StateSizes z(b.mamba->config());
      n += size_t(z.total()) * sizeof(float) - (impl_->state_precision == Precision::BF16 ? size_t(z.ssm) * 2 : 0);
      if (const int every = impl_->writes_every(*b.mamba, batch); every > 1)
        n += size_t(b.mamba->config().nheads() * (1 + mamba3_ring_floats_per_head(b.mamba->config(), every))) * 4;
    }
  return n;
}

double CudaModel::decode_state_traffic_per_sequence(int64_t batch) const {
  double n = 0;
  for (const Impl::Block& b : impl_->blocks)
    if (b.mamba) {
      const Mamba3StateSizes z(b.mamba->config());
      const double ssm = double(z.ssm) * (impl_->state_precision == Precision::BF16 ? 2 : 4);
      const int every = impl_->writes_every(*b.mamba, batch);
      n += 2.0 * double(z.angle + z.k + z.v) * 4 + ssm * (1.0 + 1.0 / every);
    }
  return n;
}

GpuCache CudaModel::new_cache(int64_t batch, int64_t capacity) const {
  MAMBA3_CHECK(batch >= 1, "cache: batch must be at least 1, got {}", batch);
  MAMBA3_CHECK(capacity >= 1, "cache: capacity must be at least 1, got {}", capacity);
  auto c = std::make_unique<GpuCache::Impl>();
  c->batch = batch;
  c->capacity = capacity;
  c->positions.assign(size_t(batch), 0);
  for (const Impl::Block& b : impl_->blocks) {
    const int every = b.mamba ? impl_->writes_every(*b.mamba, batch) : 1;
    c->mamba.push_back(b.mamba ? std::make_unique<GpuMamba3State>(b.mamba->config(), batch,
                                                                  impl_->state_precision == Precision::BF16, every)
                               : nullptr);
    c->attn.push_back(b.attention ? std::make_unique<GpuAttentionCache>(b.attention->new_cache(batch, capacity))
                                  : nullptr);
  }
  impl_->reserve(c->ws, batch, batch);
  // A step reads device_ids(): a new cache holds id 0 there, never the bytes of a recycled allocation.
  MAMBA3_CUDA_CHECK(cudaMemset(c->ws.ids.raw(), 0, size_t(batch) * sizeof(int32_t)));
  c->active_host.assign(size_t(batch), 1);
  c->active_staging.assign(size_t(batch), 1);
  c->active = DeviceBuffer(size_t(batch) * sizeof(int32_t));
  c->active.upload(c->active_staging.data(), c->active.bytes());
  return GpuCache(std::move(c));
}

Tensor CudaModel::prefill(std::span<const int64_t> ids, int64_t batch, int64_t length, GpuCache& cache, int64_t row0,
                          bool all_logits) const {
  const Impl& m = *impl_;
  GpuCache::Impl& c = *cache.impl_;
  const ModelConfig& cfg = m.config;
  MAMBA3_CHECK(batch >= 1 && length >= 1, "prefill: empty prompt (batch {}, length {})", batch, length);
  MAMBA3_CHECK(int64_t(ids.size()) == batch * length, "prefill: {} ids for {} prompts of {} tokens", ids.size(), batch,
               length);
  MAMBA3_CHECK(row0 >= 0 && row0 + batch <= c.batch, "prefill: rows [{}, {}) outside the cache's batch of {}", row0,
               row0 + batch, c.batch);
  for (size_t i = 0; i < ids.size(); ++i)
    MAMBA3_CHECK(ids[i] >= 0 && ids[i] < cfg.vocab_size,
                 "token id {} at position {} is outside the vocabulary [0, {})", ids[i], i, cfg.vocab_size);
  bool has_attention = false;
  for (const auto& a : c.attn) has_attention |= a != nullptr;
  if (has_attention)
    for (int64_t r = row0; r < row0 + batch; ++r)
      MAMBA3_CHECK(c.positions[size_t(r)] + length <= c.capacity,
                   "prefill: row {} would hold {} tokens, more than the cache capacity {}", r,
                   c.positions[size_t(r)] + length, c.capacity);

  // Long prompts go through in segments (the states carry over), bounding the activation memory.
  const int64_t row_budget = 16384;
  const int64_t seg = std::max<int64_t>(1, std::min(length, row_budget / batch));
  const int64_t V = cfg.vocab_padded(), D = cfg.d_model;
  Tensor out = Tensor::empty(DType::F32, {all_logits ? batch * length : batch, V});
  Workspace& ws = m.prefill_ws;
  const RowBlockScope fixed_shapes(*m.ctx, m.prefill_row_block);
  std::vector<int32_t> seg_ids;
  for (int64_t t0 = 0; t0 < length; t0 += seg) {
    const int64_t L = std::min(seg, length - t0), rows = batch * L;
    m.reserve(ws, rows, all_logits ? rows : batch);
    seg_ids.resize(size_t(rows));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < L; ++t) seg_ids[size_t(b * L + t)] = int32_t(ids[size_t(b * length + t0 + t)]);
    MAMBA3_CUDA_CHECK(cudaMemcpyAsync(ws.ids.raw(), seg_ids.data(), size_t(rows) * 4, cudaMemcpyHostToDevice,
                                      m.ctx->stream()));
    embed(m.ctx->stream(), ws.ids.as<int32_t>(), rows, m.embedding.weight.raw(), m.precision, D,
          ws.hidden.as<float>());
    m.run_blocks(ws, c, row0, batch, L, false);
    for (int64_t r = row0; r < row0 + batch; ++r) c.positions[size_t(r)] += L;
    if (all_logits) {
      linear(*m.ctx, m.head(), ws.normed.raw(), rows, ws.logits.as<float>());
      std::vector<float> host(static_cast<size_t>(rows * V));
      MAMBA3_CUDA_CHECK(cudaMemcpyAsync(host.data(), ws.logits.raw(), host.size() * 4, cudaMemcpyDeviceToHost,
                                        m.ctx->stream()));
      m.ctx->sync();
      for (int64_t b = 0; b < batch; ++b)
        std::copy_n(host.data() + b * L * V, L * V, out.data<float>() + (b * length + t0) * V);
    } else if (t0 + L == length) {
      // The last position of each prompt: rows b·L + L − 1, a strided view of the normed activations.
      const char* last = ws.normed.as<char>() + size_t((L - 1) * D) * m.act();
      if (m.prefill_row_block > 0) {  // fixed-shape products read whole blocks: gather the rows first
        MAMBA3_CUDA_CHECK(cudaMemcpy2DAsync(ws.last.raw(), size_t(D) * m.act(), last, size_t(L * D) * m.act(),
                                            size_t(D) * m.act(), size_t(batch), cudaMemcpyDeviceToDevice,
                                            m.ctx->stream()));
        linear(*m.ctx, m.head(), ws.last.raw(), batch, ws.logits.as<float>());
      } else {
        linear(*m.ctx, m.head(), last, batch, ws.logits.as<float>(), L * D);
      }
      MAMBA3_CUDA_CHECK(cudaMemcpyAsync(out.raw(), ws.logits.raw(), out.nbytes(), cudaMemcpyDeviceToHost,
                                        m.ctx->stream()));
    }
  }
  m.ctx->sync();
  return out;
}

void CudaModel::step_device(GpuCache& cache, const GpuSampler* sampler) const {
  const Impl& m = *impl_;
  GpuCache::Impl& c = *cache.impl_;
  bool has_attention = false;
  for (const auto& a : c.attn) has_attention |= a != nullptr;
  if (has_attention)
    for (int64_t r = 0; r < c.batch; ++r)
      MAMBA3_CHECK(!c.active_host[size_t(r)] || c.positions[size_t(r)] < c.capacity,
                   "step: row {} is full (capacity {} tokens)", r, c.capacity);
  const cudaStream_t s = m.ctx->stream();
  if (sampler)
    MAMBA3_CHECK(sampler->batch() == c.batch && sampler->n_logits() == m.config.vocab_padded(),
                 "step: the sampler is for batch {} and {} logits, the cache for batch {} and {}", sampler->batch(),
                 sampler->n_logits(), c.batch, m.config.vocab_padded());
  auto enqueue = [&] {
    m.decode(c);
    if (sampler) sampler->sample(*m.ctx, c.ws.logits.as<float>(), c.ws.ids.as<int32_t>());
  };
  if (c.graph_exec && c.graph_sampler != sampler) {  // captured with another sampler: capture again
    cudaGraphExecDestroy(c.graph_exec);
    cudaGraphDestroy(c.graph);
    c.graph_exec = nullptr;
    c.graph = nullptr;
  }
  if (!m.use_graphs || c.steps_run == 0) {
    // The first step runs eagerly: it sizes every lazily allocated scratch and tunes the step's matrix-product shapes
    // (gemm_tuner.h: timing cannot happen inside a capture) before the graph is captured with the same shapes.
    enqueue();
  } else {
    if (!c.graph_exec) {
      MAMBA3_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      try {
        enqueue();
      } catch (...) {
        cudaGraph_t broken = nullptr;
        cudaStreamEndCapture(s, &broken);
        if (broken) cudaGraphDestroy(broken);
        throw;
      }
      MAMBA3_CUDA_CHECK(cudaStreamEndCapture(s, &c.graph));
      // Each node at the priority of the stream it was captured from: the weight requests' side stream keeps its
      // greatest priority in the replay (the default flags run every node at the launch stream's).
      MAMBA3_CUDA_CHECK(cudaGraphInstantiate(&c.graph_exec, c.graph, cudaGraphInstantiateFlagUseNodePriority));
      c.graph_sampler = sampler;
    }
    MAMBA3_CUDA_CHECK(cudaGraphLaunch(c.graph_exec, s));
  }
  ++c.steps_run;
  for (int64_t r = 0; r < c.batch; ++r) c.positions[size_t(r)] += c.active_host[size_t(r)] ? 1 : 0;
}

void CudaModel::set_active(GpuCache& cache, std::span<const uint8_t> active) const {
  GpuCache::Impl& c = *cache.impl_;
  MAMBA3_CHECK(int64_t(active.size()) == c.batch, "set_active: {} flags for a cache of {} rows", active.size(), c.batch);
  bool same = true;
  for (int64_t r = 0; r < c.batch; ++r) same &= (active[size_t(r)] != 0) == (c.active_host[size_t(r)] != 0);
  if (same) return;
  // The previous upload may still read the staging vector: wait for the stream before rewriting it.
  impl_->ctx->sync();
  for (int64_t r = 0; r < c.batch; ++r) {
    c.active_host[size_t(r)] = active[size_t(r)] != 0;
    c.active_staging[size_t(r)] = active[size_t(r)] != 0;
  }
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(c.active.raw(), c.active_staging.data(), c.active.bytes(), cudaMemcpyHostToDevice,
                                    impl_->ctx->stream()));
}

void CudaModel::copy_row(const GpuCache& src, int64_t src_row, GpuCache& dst, int64_t dst_row) const {
  const GpuCache::Impl& a = *src.impl_;
  GpuCache::Impl& b = *dst.impl_;
  MAMBA3_CHECK(src_row >= 0 && src_row < a.batch && dst_row >= 0 && dst_row < b.batch,
               "copy_row: row {} of {} → row {} of {} is outside the caches", src_row, a.batch, dst_row, b.batch);
  MAMBA3_CHECK(a.mamba.size() == impl_->blocks.size() && b.mamba.size() == impl_->blocks.size() &&
                   a.capacity == b.capacity,
               "copy_row: the caches must come from this model with equal capacity ({} vs {})", a.capacity,
               b.capacity);
  if (&a == &b && src_row == dst_row) return;
  const cudaStream_t s = impl_->ctx->stream();
  auto copy = [&](void* to, const void* from, size_t bytes) {
    if (bytes) MAMBA3_CUDA_CHECK(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, s));
  };
  const int64_t position = a.positions[size_t(src_row)];
  for (size_t li = 0; li < impl_->blocks.size(); ++li) {
    if (a.mamba[li]) {
      const Mamba3StateSizes& z = a.mamba[li]->sizes;
      const Mamba3GpuState from = a.mamba[li]->rows_from(src_row), to = b.mamba[li]->rows_from(dst_row);
      MAMBA3_CHECK(a.mamba[li]->ssm_bf16 == b.mamba[li]->ssm_bf16, "copy_row: the caches' state precisions differ");
      if (a.mamba[li]->write_every == b.mamba[li]->write_every) {
        // A deferring row moves with its pending tokens: the copy continues exactly where the source row is.
        copy(b.mamba[li]->lazy_row(dst_row), a.mamba[li]->lazy_row(src_row), a.mamba[li]->lazy_row_bytes());
        copy(b.mamba[li]->ring_row(dst_row), a.mamba[li]->ring_row(src_row), a.mamba[li]->ring_row_bytes());
      } else {
        // Caches of different intervals (the automatic one depends on the cache's batch; the ring is sized by it):
        // the source row's pending tokens are folded in first (the row's state as spec §4.2 has it, which its own
        // cache reads on as before), and the copy starts with nothing pending.
        if (a.mamba[li]->write_every > 1) impl_->blocks[li].mamba->settle(*impl_->ctx, from, 1);
        if (const size_t n = b.mamba[li]->lazy_row_bytes(); n)
          MAMBA3_CUDA_CHECK(cudaMemsetAsync(b.mamba[li]->lazy_row(dst_row), 0, n, s));
      }
      copy(to.angle, from.angle, size_t(z.angle) * 4);
      copy(b.mamba[li]->ssm_row(dst_row), a.mamba[li]->ssm_row(src_row), a.mamba[li]->ssm_row_bytes());
      copy(to.k, from.k, size_t(z.k) * 4);
      copy(to.v, from.v, size_t(z.v) * 4);
    }
    if (a.attn[li]) {
      const GpuAttentionCache& x = *a.attn[li];
      GpuAttentionCache& y = *b.attn[li];
      const size_t row_kv = x.k.bytes() / size_t(x.batch), token_kv = row_kv / size_t(x.capacity);
      const size_t row_conv = x.conv.bytes() / size_t(x.batch);
      copy(y.k.as<char>() + row_kv * size_t(dst_row), x.k.as<char>() + row_kv * size_t(src_row),
           token_kv * size_t(position));
      copy(y.v.as<char>() + row_kv * size_t(dst_row), x.v.as<char>() + row_kv * size_t(src_row),
           token_kv * size_t(position));
      copy(y.conv.as<char>() + row_conv * size_t(dst_row), x.conv.as<char>() + row_conv * size_t(src_row), row_conv);
      copy(y.lengths.as<char>() + 4 * size_t(dst_row), x.lengths.as<char>() + 4 * size_t(src_row), 4);
    }
  }
  b.positions[size_t(dst_row)] = position;
}

void CudaModel::reset_row(GpuCache& cache, int64_t row) const {
  GpuCache::Impl& c = *cache.impl_;
  MAMBA3_CHECK(row >= 0 && row < c.batch, "reset_row: row {} outside the cache's batch of {}", row, c.batch);
  const cudaStream_t s = impl_->ctx->stream();
  auto zero = [&](void* at, size_t bytes) {
    if (bytes) MAMBA3_CUDA_CHECK(cudaMemsetAsync(at, 0, bytes, s));
  };
  for (size_t li = 0; li < c.mamba.size(); ++li) {
    if (c.mamba[li]) {
      const Mamba3StateSizes& z = c.mamba[li]->sizes;
      const Mamba3GpuState v = c.mamba[li]->rows_from(row);
      zero(v.angle, size_t(z.angle) * 4);
      zero(c.mamba[li]->ssm_row(row), c.mamba[li]->ssm_row_bytes());
      zero(v.k, size_t(z.k) * 4);
      zero(v.v, size_t(z.v) * 4);
      zero(c.mamba[li]->lazy_row(row), c.mamba[li]->lazy_row_bytes());  // nothing pending
    }
    if (c.attn[li]) {  // the KV rows past the length are never read
      GpuAttentionCache& a = *c.attn[li];
      const size_t row_conv = a.conv.bytes() / size_t(a.batch);
      zero(a.conv.as<char>() + row_conv * size_t(row), row_conv);
      zero(a.lengths.as<char>() + 4 * size_t(row), 4);
    }
  }
  c.positions[size_t(row)] = 0;
}

size_t CudaModel::row_bytes(const GpuCache& cache) const {
  const GpuCache::Impl& c = *cache.impl_;
  size_t n = 0;
  for (size_t li = 0; li < c.mamba.size(); ++li) {
    if (c.mamba[li]) n += size_t(c.mamba[li]->sizes.total()) * sizeof(float);
    if (c.attn[li]) n += (c.attn[li]->k.bytes() + c.attn[li]->v.bytes() + c.attn[li]->conv.bytes()) / size_t(c.batch);
  }
  return n;
}

void CudaModel::step(std::span<const int64_t> ids, GpuCache& cache, Tensor& logits) const {
  const Impl& m = *impl_;
  GpuCache::Impl& c = *cache.impl_;
  const int64_t B = c.batch, V = m.config.vocab_padded();
  MAMBA3_CHECK(int64_t(ids.size()) == B, "step: {} ids for a cache of {} rows", ids.size(), B);
  if (!has_shape(logits, {B, V}) || logits.dtype() != DType::F32) check_shape(logits, {B, V}, "step: logits (F32)");
  std::vector<int32_t> ids32(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    MAMBA3_CHECK(ids[i] >= 0 && ids[i] < m.config.vocab_size,
                 "token id {} at position {} is outside the vocabulary [0, {})", ids[i], i, m.config.vocab_size);
    ids32[i] = int32_t(ids[i]);
  }
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(c.ws.ids.raw(), ids32.data(), ids32.size() * 4, cudaMemcpyHostToDevice,
                                    m.ctx->stream()));
  step_device(cache);
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(logits.raw(), c.ws.logits.raw(), logits.nbytes(), cudaMemcpyDeviceToHost,
                                    m.ctx->stream()));
  m.ctx->sync();
}

}  // namespace mamba3::cuda
