#include "io/weights.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "io/torch_checkpoint.h"

namespace mamba3 {

namespace fs = std::filesystem;

const Tensor& Weights::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("{}: no tensor named '{}'", source_, name);
  return it->second;
}

void Weights::add(const std::string& name, Tensor tensor) {
  MAMBA3_CHECK(tensors_.emplace(name, std::move(tensor)).second, "{}: tensor '{}' appears twice", source_, name);
  names_.push_back(name);
}

Weights load_sharded_safetensors(const std::string& index_path) {
  std::ifstream in(index_path, std::ios::binary);
  MAMBA3_CHECK(in, "{}: cannot open", index_path);
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::ordered_json index;
  try {
    index = nlohmann::ordered_json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", index_path, e.what());
  }
  MAMBA3_CHECK(index.is_object(), "{}: the index is not a JSON object", index_path);
  auto map = index.find("weight_map");
  MAMBA3_CHECK(map != index.end() && map->is_object(), "{}: missing or non-object field 'weight_map'", index_path);
  MAMBA3_CHECK(!map->empty(), "{}: 'weight_map' names no tensors", index_path);

  const fs::path dir = fs::path(index_path).parent_path();
  std::map<std::string, SafetensorsFile> shards;
  Weights out;
  out.set_source(index_path);
  for (auto it = map->begin(); it != map->end(); ++it) {
    MAMBA3_CHECK(it->is_string(), "{}: weight_map entry '{}' is not a file name", index_path, it.key());
    const std::string shard = it->get<std::string>();
    // Shards live beside the index; a path that climbs out of the folder is refused.
    fs::path rel(shard);
    bool climbs = rel.empty() || rel.is_absolute();
    for (const auto& part : rel) climbs = climbs || part == "..";
    MAMBA3_CHECK(!climbs, "{}: tensor '{}': shard '{}' is not a file name inside the model folder", index_path,
                 it.key(), shard);
    auto found = shards.find(shard);
    if (found == shards.end()) {
      const fs::path shard_path = dir / rel;
      std::error_code ec;
      MAMBA3_CHECK(fs::is_regular_file(shard_path, ec), "{}: shard '{}' (holding tensor '{}') does not exist",
                   index_path, shard_path.string(), it.key());
      found = shards.emplace(shard, SafetensorsFile::open(shard_path.string())).first;
    }
    const SafetensorsFile& file = found->second;
    MAMBA3_CHECK(file.has(it.key()), "{}: tensor '{}' is assigned to shard '{}', which does not hold it", index_path,
                 it.key(), file.path());
    out.add(it.key(), file.get(it.key()));
  }
  return out;
}

Weights load_weights(const std::string& model_dir) {
  const fs::path dir(model_dir);
  std::error_code ec;
  MAMBA3_CHECK(fs::is_directory(dir, ec), "{}: not a directory", model_dir);

  if (fs::path p = dir / "model.safetensors"; fs::exists(p, ec)) {
    SafetensorsFile file = SafetensorsFile::open(p.string());
    Weights out;
    out.set_source(p.string());
    for (const auto& name : file.names()) out.add(name, file.get(name));
    return out;
  }
  if (fs::path p = dir / "model.safetensors.index.json"; fs::exists(p, ec)) return load_sharded_safetensors(p.string());
  if (fs::path p = dir / "pytorch_model.bin"; fs::exists(p, ec)) {
    Weights out;
    out.set_source(p.string());
    for (auto& [name, tensor] : read_torch_checkpoint(p.string())) out.add(name, std::move(tensor));
    return out;
  }
  fail("{}: no model weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
       model_dir);
}

}  // namespace mamba3
