#pragma once
// Everything a batch of sequences carries between calls: per layer the Mamba-3 decode state (constant size) or
// the attention KV cache (growing), and each row's position. Copy it to fork a prompt into several continuations;
// save and load it to resume later (the constant-size state is Mamba's practical advantage).
#include <string>
#include <vector>

#include "model/attention_layer.h"
#include "model/mamba3_mixer.h"
#include "model/model_config.h"

namespace mamba3 {

struct LayerCache {
  Mamba3State mamba;                   // Mamba-3 layers: (B, …) tensors
  std::vector<AttentionRowCache> attn;  // attention layers: one per row
};

class ModelCache {
 public:
  ModelCache() = default;
  ModelCache(const ModelConfig& config, std::vector<LayerCache> layers, int64_t batch);

  int64_t batch() const { return batch_; }
  int64_t position(int64_t row) const { return positions_.at(size_t(row)); }
  void advance(int64_t row, int64_t tokens) { positions_.at(size_t(row)) += tokens; }
  LayerCache& layer(int64_t i) { return layers_.at(size_t(i)); }
  const LayerCache& layer(int64_t i) const { return layers_.at(size_t(i)); }

  ModelCache clone() const;
  // A cache of `n` rows, each a copy of row `row` of this one (fork a prompt into n continuations).
  ModelCache fork(int64_t row, int64_t n) const;
  size_t nbytes() const;

  // Rows joining and leaving a running batch (continuous batching). append: the rows of `other` (a cache of the same
  // model) go after this cache's rows; storage grows geometrically, so the rows already here are not copied again
  // on every join (amortised O(rows appended)). remove_row: the last row moves into `row`'s place (O(one row), no
  // reallocation); the batch may become empty. Views of the state tensors taken before either call are invalid.
  void append(const ModelCache& other);
  void remove_row(int64_t row);
  // Rows the storage holds before append must reallocate (>= batch()); reserve makes room for `rows` up front.
  int64_t capacity() const { return storage_.empty() ? batch_ : capacity_; }
  void reserve(int64_t rows);

  // Atomic write of every state tensor to a safetensors file (with the model config in its metadata); load checks
  // that the file belongs to a model of the same shape.
  void save(const std::string& path) const;
  static ModelCache load(const std::string& path, const ModelConfig& config);

 private:
  nlohmann::json shape_signature() const;
  void grow_storage(int64_t rows);  // makes storage_ hold at least `rows` rows (keeps the current ones)
  void refresh_views();             // layers_[i].mamba = rows [0, batch_) of storage_[i]
  ModelConfig config_;
  std::vector<LayerCache> layers_;
  std::vector<int64_t> positions_;
  int64_t batch_ = 0;
  // Mamba-3 layers' state with spare rows (empty until append/remove_row first need it; then layers_[i].mamba are
  // views of its first batch_ rows). Copies made by clone/fork/load are tight and have none.
  std::vector<Mamba3State> storage_;
  int64_t capacity_ = 0;
};

}  // namespace mamba3
