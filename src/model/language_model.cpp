#include "model/language_model.h"

#include <algorithm>
#include <filesystem>

#include "io/weights.h"
#include "ops/linear.h"
#include "ops/norm.h"

namespace mamba3 {

struct LanguageModel::Scratch {
  Tensor hidden, residual, normed, mixed, mlp_hidden;  // (rows, ·)
  Tensor mamba_in, mamba_out;                          // decode: (B, d_model) views for the mixer step
  int64_t rows = 0;

  void reserve(const ModelConfig& c, int64_t n) {
    if (n <= rows) return;
    rows = n;
    hidden = Tensor::empty(DType::F32, {n, c.d_model});
    residual = Tensor::empty(DType::F32, {n, c.d_model});
    normed = Tensor::empty(DType::F32, {n, c.d_model});
    mixed = Tensor::empty(DType::F32, {n, c.d_model});
    mlp_hidden = Tensor::empty(DType::F32, {n, std::max<int64_t>(1, 2 * c.d_ff())});
  }
};

LanguageModel::LanguageModel(LanguageModel&&) noexcept = default;
LanguageModel::~LanguageModel() = default;

LanguageModel LanguageModel::load(const std::string& dir) {
  namespace fs = std::filesystem;
  MAMBA3_CHECK(fs::is_directory(dir), "{}: not a model directory", dir);
  ModelConfig config = ModelConfig::load((fs::path(dir) / "config.json").string());
  Weights weights = load_weights(dir);
  return LanguageModel(config, weights.tensors(), weights.source());
}

LanguageModel::LanguageModel(const ModelConfig& config, const TensorMap& w, const std::string& source)
    : config_(config), scratch_(std::make_unique<Scratch>()) {
  const ModelConfig& c = config_;
  const int64_t D = c.d_model, V = c.vocab_padded();
  std::set<std::string> used;
  embedding_ = load_parameter(w, "backbone.embedding.weight", {V, D}, source, &used);
  if (c.tie_embeddings) {
    lm_head_ = embedding_;
    if (w.count("lm_head.weight")) {  // pytorch_model.bin stores the tied copy too
      load_parameter(w, "lm_head.weight", {V, D}, source, &used);
    }
  } else {
    lm_head_ = load_parameter(w, "lm_head.weight", {V, D}, source, &used);
  }
  auto load_norm = [&](const std::string& p, Tensor& weight, Tensor& bias) {
    weight = load_parameter(w, p + ".weight", {D}, source, &used);
    if (!c.rms_norm) bias = load_parameter(w, p + ".bias", {D}, source, &used);
  };
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "backbone.layers." + std::to_string(i) + ".";
    Block b;
    load_norm(p + "norm", b.norm_w, b.norm_b);
    if (c.is_attention_layer(i)) {
      b.attention = std::make_unique<AttentionLayer>(c.attn, D, w, p + "mixer.", source, &used);
    } else {
      b.mamba = std::make_unique<Mamba3Mixer>(c.ssm, w, p + "mixer.", source, &used);
    }
    if (c.d_intermediate > 0) {
      load_norm(p + "norm2", b.norm2_w, b.norm2_b);
      b.mlp = std::make_unique<GatedMlp>(D, c.d_ff(), w, p + "mlp.", source, &used);
    }
    blocks_.push_back(std::move(b));
  }
  load_norm("backbone.norm_f", norm_f_w_, norm_f_b_);
  for (const auto& [name, t] : w)
    MAMBA3_CHECK(used.count(name), "{}: unexpected tensor '{}' (not a parameter of this configuration)", source, name);
}

size_t LanguageModel::parameter_count() const {
  size_t n = size_t(embedding_.numel() + norm_f_w_.numel() + (norm_f_b_.defined() ? norm_f_b_.numel() : 0));
  if (!config_.tie_embeddings) n += size_t(lm_head_.numel());
  for (const Block& b : blocks_) {
    n += b.mamba ? b.mamba->parameter_count() : b.attention->parameter_count();
    if (b.mlp) n += b.mlp->parameter_count();
    for (const Tensor* t : {&b.norm_w, &b.norm_b, &b.norm2_w, &b.norm2_b})
      if (t->defined()) n += size_t(t->numel());
  }
  return n;
}

ModelCache LanguageModel::new_cache(int64_t batch) const {
  MAMBA3_CHECK(batch >= 1, "cache: batch must be at least 1, got {}", batch);
  std::vector<LayerCache> layers;
  for (const Block& b : blocks_) {
    LayerCache l;
    if (b.mamba) l.mamba = b.mamba->new_state(batch);
    if (b.attention) l.attn.assign(size_t(batch), b.attention->new_cache());
    layers.push_back(std::move(l));
  }
  return ModelCache(config_, std::move(layers), batch);
}

size_t LanguageModel::state_bytes_per_sequence() const {
  size_t n = 0;
  for (const Block& b : blocks_)
    if (b.mamba) n += b.mamba->new_state(1).nbytes();
  return n;
}

size_t LanguageModel::kv_bytes_per_token() const {
  size_t n = 0;
  for (const Block& b : blocks_)
    if (b.attention) n += size_t(b.attention->kv_bytes_per_token());
  return n;
}

void LanguageModel::check_ids(std::span<const int64_t> ids) const {
  for (size_t i = 0; i < ids.size(); ++i)
    MAMBA3_CHECK(ids[i] >= 0 && ids[i] < config_.vocab_size, "token id {} at position {} is outside the vocabulary [0, {})",
                 ids[i], i, config_.vocab_size);
}

void LanguageModel::norm(const float* x, int64_t rows, const Tensor& w, const Tensor& b, float* y) const {
  const float eps = float(config_.norm_epsilon);
  if (config_.rms_norm) {
    rmsnorm(x, rows, config_.d_model, w.data<float>(), eps, y);
  } else {
    layernorm(x, rows, config_.d_model, w.data<float>(), b.data<float>(), eps, y);
  }
}

void LanguageModel::run_blocks(Scratch& s, int64_t rows, ModelCache& cache, int64_t row, bool decode) const {
  const int64_t D = config_.d_model;
  float* hidden = s.hidden.data<float>();
  float* residual = s.residual.data<float>();
  float* normed = s.normed.data<float>();
  auto add_into_residual = [&](bool first) {  // residual ← hidden + residual (first block: residual ← hidden)
    for (int64_t i = 0; i < rows * D; ++i) residual[i] = first ? hidden[i] : hidden[i] + residual[i];
  };
  for (size_t li = 0; li < blocks_.size(); ++li) {
    const Block& b = blocks_[li];
    LayerCache& lc = cache.layer(int64_t(li));
    add_into_residual(li == 0);
    norm(residual, rows, b.norm_w, b.norm_b, normed);
    if (b.mamba) {
      if (decode) {
        b.mamba->step(normed, rows, lc.mamba, hidden);
      } else {
        Mamba3State st = lc.mamba.rows(row, row + 1);
        Tensor out = b.mamba->prefill(s.normed.slice(0, rows).reshape({1, rows, D}), st);
        std::copy_n(out.data<float>(), rows * D, hidden);
      }
    } else if (decode) {
      for (int64_t r = 0; r < rows; ++r) b.attention->forward(normed + r * D, 1, lc.attn[size_t(r)], hidden + r * D);
    } else {
      b.attention->forward(normed, rows, lc.attn[size_t(row)], hidden);
    }
    if (b.mlp) {
      add_into_residual(false);
      norm(residual, rows, b.norm2_w, b.norm2_b, normed);
      b.mlp->forward(normed, rows, s.mlp_hidden.data<float>(), hidden);
    }
  }
  add_into_residual(false);
  norm(residual, rows, norm_f_w_, norm_f_b_, normed);
}

Tensor LanguageModel::prefill(std::span<const int64_t> ids, ModelCache& cache, int64_t row, bool all_logits) const {
  MAMBA3_CHECK(!ids.empty(), "prefill: the prompt is empty");
  MAMBA3_CHECK(row >= 0 && row < cache.batch(), "prefill: row {} outside the cache's batch of {}", row, cache.batch());
  check_ids(ids);
  const int64_t L = int64_t(ids.size()), D = config_.d_model, V = config_.vocab_padded();
  Scratch& s = *scratch_;
  s.reserve(config_, L);
  for (int64_t t = 0; t < L; ++t) std::copy_n(embedding_.data<float>() + ids[size_t(t)] * D, D, s.hidden.data<float>() + t * D);
  run_blocks(s, L, cache, row, false);
  cache.advance(row, L);
  const int64_t first = all_logits ? 0 : L - 1, n = L - first;
  Tensor logits = Tensor::empty(DType::F32, {n, V});
  linear(s.normed.data<float>() + first * D, n, D, lm_head_.data<float>(), V, logits.data<float>());
  return logits;
}

void LanguageModel::step(std::span<const int64_t> ids, ModelCache& cache, Tensor& logits) const {
  const int64_t B = cache.batch(), D = config_.d_model, V = config_.vocab_padded();
  MAMBA3_CHECK(int64_t(ids.size()) == B, "step: {} ids for a cache of {} rows", ids.size(), B);
  if (!has_shape(logits, {B, V}) || logits.dtype() != DType::F32) check_shape(logits, {B, V}, "step: logits (F32)");
  check_ids(ids);
  Scratch& s = *scratch_;
  s.reserve(config_, B);
  for (int64_t b = 0; b < B; ++b) std::copy_n(embedding_.data<float>() + ids[size_t(b)] * D, D, s.hidden.data<float>() + b * D);
  run_blocks(s, B, cache, 0, true);
  for (int64_t b = 0; b < B; ++b) cache.advance(b, 1);
  linear(s.normed.data<float>(), B, D, lm_head_.data<float>(), V, logits.data<float>());
}

}  // namespace mamba3
