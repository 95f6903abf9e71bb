#pragma once
// Model weights from a checkpoint folder, whichever of the three layouts official checkpoints use:
//   1. model.safetensors
//   2. model.safetensors.index.json  (sharded safetensors: {"weight_map": {tensor name: shard file}})
//   3. pytorch_model.bin             (torch.save zip archive; see io/torch_checkpoint.h)
// The first one present wins. Tensors are zero-copy views that keep their mapped files alive.
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mamba3 {

class Weights {
 public:
  // The file the weights came from (the .safetensors, the index, or the .bin).
  const std::string& source() const { return source_; }
  const std::vector<std::string>& names() const { return names_; }  // in file order
  size_t size() const { return tensors_.size(); }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  // Throws naming the source file when the tensor is absent.
  const Tensor& get(const std::string& name) const;
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }

  // Adds a tensor (used by the loaders); throws on a duplicate name.
  void add(const std::string& name, Tensor tensor);
  void set_source(std::string source) { source_ = std::move(source); }

 private:
  std::string source_;
  std::vector<std::string> names_;
  std::map<std::string, Tensor> tensors_;
};

// Throws mamba3::Error naming the folder when it holds none of the three layouts, or naming the file at fault.
Weights load_weights(const std::string& model_dir);

// The sharded layout alone: reads the index, checks every shard exists and holds every tensor assigned to it.
Weights load_sharded_safetensors(const std::string& index_path);

}  // namespace mamba3
