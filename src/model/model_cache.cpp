#include "model/model_cache.h"

#include <algorithm>
#include <cstring>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"

namespace mamba3 {

namespace {
Tensor int64_tensor(const std::vector<int64_t>& v) {
  Tensor t = Tensor::empty(DType::I64, {int64_t(v.size())});
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(int64_t));
  return t;
}
std::vector<int64_t> int64_values(const Tensor& t, const std::string& what) {
  MAMBA3_CHECK(t.dtype() == DType::I64 && t.ndim() == 1, "{}: expected a 1-D I64 tensor", what);
  return std::vector<int64_t>(t.data<int64_t>(), t.data<int64_t>() + t.numel());
}
}  // namespace

ModelCache::ModelCache(const ModelConfig& config, std::vector<LayerCache> layers, int64_t batch)
    : config_(config), layers_(std::move(layers)), positions_(size_t(batch), 0), batch_(batch) {}

ModelCache ModelCache::clone() const {
  ModelCache c = *this;
  c.storage_.clear();
  c.capacity_ = 0;
  for (auto& l : c.layers_)
    if (l.mamba.ssm.defined()) l.mamba = l.mamba.clone();
  return c;
}

ModelCache ModelCache::fork(int64_t row, int64_t n) const {
  MAMBA3_CHECK(row >= 0 && row < batch_ && n >= 1, "cache fork: row {} of {} into {} copies", row, batch_, n);
  ModelCache c;
  c.config_ = config_;
  c.batch_ = n;
  c.positions_.assign(size_t(n), positions_[size_t(row)]);
  for (const auto& l : layers_) {
    LayerCache nl;
    if (l.mamba.ssm.defined()) {
      auto rep = [&](const Tensor& t) {
        Shape s = t.shape();
        s[0] = n;
        Tensor out = Tensor::empty(t.dtype(), s);
        const size_t row_bytes = t.nbytes() / size_t(t.dim(0));
        for (int64_t i = 0; i < n; ++i)
          std::memcpy(static_cast<char*>(out.raw()) + size_t(i) * row_bytes,
                      static_cast<const char*>(t.raw()) + size_t(row) * row_bytes, row_bytes);
        return out;
      };
      nl.mamba = {rep(l.mamba.angle), rep(l.mamba.ssm), rep(l.mamba.k), rep(l.mamba.v)};
    }
    if (!l.attn.empty()) nl.attn.assign(size_t(n), l.attn[size_t(row)]);
    c.layers_.push_back(std::move(nl));
  }
  return c;
}

namespace {
// Copies row `src_row` of every tensor of `src` into row `dst_row` of `dst` (same per-row shapes).
void copy_state_row(const Mamba3State& src, int64_t src_row, Mamba3State& dst, int64_t dst_row) {
  auto one = [&](const Tensor& s, Tensor& d) {
    const size_t row_bytes = s.nbytes() / size_t(std::max<int64_t>(s.dim(0), 1));
    std::memcpy(static_cast<char*>(d.raw()) + size_t(dst_row) * row_bytes,
                static_cast<const char*>(s.raw()) + size_t(src_row) * row_bytes, row_bytes);
  };
  one(src.angle, dst.angle), one(src.ssm, dst.ssm), one(src.k, dst.k), one(src.v, dst.v);
}
}  // namespace

void ModelCache::grow_storage(int64_t rows) {
  if (storage_.empty()) {  // the current tight tensors become the storage
    for (const auto& l : layers_) storage_.push_back(l.mamba);
    capacity_ = batch_;
  }
  if (rows <= capacity_) return;
  const int64_t cap = std::max(rows, 2 * capacity_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Mamba3State& old = storage_[i];
    if (!old.ssm.defined()) continue;
    auto bigger = [&](const Tensor& t) {
      Shape s = t.shape();
      s[0] = cap;
      return Tensor::empty(t.dtype(), s);
    };
    Mamba3State grown{bigger(old.angle), bigger(old.ssm), bigger(old.k), bigger(old.v)};
    for (int64_t r = 0; r < batch_; ++r) copy_state_row(old, r, grown, r);
    storage_[i] = std::move(grown);
  }
  capacity_ = cap;
}

void ModelCache::reserve(int64_t rows) {
  grow_storage(std::max(rows, batch_));
  refresh_views();
}

void ModelCache::refresh_views() {
  for (size_t i = 0; i < layers_.size(); ++i)
    if (storage_[i].ssm.defined()) layers_[i].mamba = storage_[i].rows(0, batch_);
}

void ModelCache::append(const ModelCache& other) {
  MAMBA3_CHECK(other.layers_.size() == layers_.size() && other.shape_signature() == shape_signature(),
               "cache append: the caches belong to models of different configurations");
  if (other.batch_ == 0) return;
  grow_storage(batch_ + other.batch_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerCache& src = other.layers_[i];
    MAMBA3_CHECK(src.mamba.ssm.defined() == storage_[i].ssm.defined(),
                 "cache append: layer {} is a Mamba-3 layer in one cache and not in the other", i);
    if (src.mamba.ssm.defined()) {
      MAMBA3_CHECK(src.mamba.ssm.dim(0) == other.batch_, "cache append: layer {} state has {} rows, expected {}", i,
                   src.mamba.ssm.dim(0), other.batch_);
      for (int64_t r = 0; r < other.batch_; ++r) copy_state_row(src.mamba, r, storage_[i], batch_ + r);
    }
    layers_[i].attn.insert(layers_[i].attn.end(), src.attn.begin(), src.attn.end());
  }
  positions_.insert(positions_.end(), other.positions_.begin(), other.positions_.end());
  batch_ += other.batch_;
  refresh_views();
}

void ModelCache::remove_row(int64_t row) {
  MAMBA3_CHECK(row >= 0 && row < batch_, "cache remove_row: row {} of {}", row, batch_);
  grow_storage(batch_);
  const int64_t last = batch_ - 1;
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (storage_[i].ssm.defined() && row != last) copy_state_row(storage_[i], last, storage_[i], row);
    auto& attn = layers_[i].attn;
    if (!attn.empty()) {
      if (row != last) attn[size_t(row)] = std::move(attn[size_t(last)]);
      attn.pop_back();
    }
  }
  positions_[size_t(row)] = positions_[size_t(last)];
  positions_.pop_back();
  batch_ = last;
  refresh_views();
}

size_t ModelCache::nbytes() const {
  size_t n = 0;
  for (const auto& l : layers_) {
    if (l.mamba.ssm.defined()) n += l.mamba.nbytes();
    for (const auto& a : l.attn) n += a.nbytes();
  }
  return n;
}

nlohmann::json ModelCache::shape_signature() const {
  nlohmann::json j = config_.to_json();
  j.erase("vocab_size");  // the cache does not depend on the vocabulary
  return j;
}

void ModelCache::save(const std::string& path) const {
  NamedTensors tensors;
  std::vector<Tensor> keep;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerCache& l = layers_[i];
    const std::string p = "layers." + std::to_string(i) + ".";
    if (l.mamba.ssm.defined()) {
      tensors.push_back({p + "angle_state", l.mamba.angle});
      tensors.push_back({p + "ssm_state", l.mamba.ssm});
      tensors.push_back({p + "k_state", l.mamba.k});
      tensors.push_back({p + "v_state", l.mamba.v});
    }
    for (size_t r = 0; r < l.attn.size(); ++r) {
      const AttentionRowCache& a = l.attn[r];
      const std::string q = p + "row" + std::to_string(r) + ".";
      auto vec = [](const std::vector<float>& v) { return Tensor::from_floats(v, {int64_t(v.size())}); };
      tensors.push_back({q + "k", vec(a.k)});
      tensors.push_back({q + "v", vec(a.v)});
      tensors.push_back({q + "conv", vec(a.conv)});
      tensors.push_back({q + "length", int64_tensor({a.length})});
    }
  }
  tensors.push_back({"positions", int64_tensor(positions_)});
  write_safetensors(path, tensors, {{"mamba3_cache", shape_signature().dump()}});
}

ModelCache ModelCache::load(const std::string& path, const ModelConfig& config) {
  auto f = SafetensorsFile::open(path);
  ModelCache c;
  c.config_ = config;
  auto it = f.metadata().find("mamba3_cache");
  MAMBA3_CHECK(it != f.metadata().end(), "{}: not a mamba3 cache file (no 'mamba3_cache' metadata)", path);
  MAMBA3_CHECK(nlohmann::json::parse(it->second) == c.shape_signature(),
               "{}: the cache was saved for a model of another configuration", path);
  c.positions_ = int64_values(f.get("positions"), path + ": positions");
  c.batch_ = int64_t(c.positions_.size());
  auto copy_vec = [&](const std::string& name) {
    Tensor t = f.get(name).to(DType::F32);
    return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
  };
  const Mamba3Config& m = config.ssm;
  for (int64_t i = 0; i < config.n_layer; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LayerCache l;
    if (!config.is_attention_layer(i)) {
      Mamba3State ref = Mamba3State::zeros(m, c.batch_);
      l.mamba = {f.get(p + "angle_state").to(DType::F32), f.get(p + "ssm_state").to(DType::F32),
                 f.get(p + "k_state").to(DType::F32), f.get(p + "v_state").to(DType::F32)};
      check_shape(l.mamba.ssm, ref.ssm.shape(), path + ": " + p + "ssm_state");
      check_shape(l.mamba.angle, ref.angle.shape(), path + ": " + p + "angle_state");
      check_shape(l.mamba.k, ref.k.shape(), path + ": " + p + "k_state");
      check_shape(l.mamba.v, ref.v.shape(), path + ": " + p + "v_state");
    } else {
      for (int64_t r = 0; r < c.batch_; ++r) {
        const std::string q = p + "row" + std::to_string(r) + ".";
        AttentionRowCache a;
        a.k = copy_vec(q + "k"), a.v = copy_vec(q + "v"), a.conv = copy_vec(q + "conv");
        const auto len = int64_values(f.get(q + "length"), path + ": " + q + "length");
        MAMBA3_CHECK(len.size() == 1 && len[0] >= 0, "{}: {}length is not one non-negative count", path, q);
        a.length = len[0];
        const size_t per_token = size_t(config.attn.kv_heads() * config.attn.head_dim);
        MAMBA3_CHECK(a.k.size() == size_t(a.length) * per_token && a.v.size() == a.k.size(),
                     "{}: {}k/v do not hold {} tokens", path, q, a.length);
        l.attn.push_back(std::move(a));
      }
    }
    c.layers_.push_back(std::move(l));
  }
  return c;
}

}  // namespace mamba3
