#include "train/checkpoint.h"

#include <cstdio>
#include <filesystem>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/safetensors.h"

namespace mamba3 {

namespace fs = std::filesystem;

namespace {
constexpr const char* kStateFormat = "mamba3-trainer-state";
constexpr const char* kStateVersion = "1";

int64_t metadata_int(const SafetensorsFile& f, const std::string& key) {
  auto it = f.metadata().find(key);
  MAMBA3_CHECK(it != f.metadata().end(), "{}: metadata '{}' is missing", f.path(), key);
  try {
    size_t used = 0;
    const long long v = std::stoll(it->second, &used);
    MAMBA3_CHECK(used == it->second.size(), "bad");
    return v;
  } catch (const std::exception&) {
    fail("{}: metadata '{}' = '{}' is not an integer", f.path(), key, it->second);
  }
}
}  // namespace

NamedTensors checkpoint_tensors(const ModelConfig& config, const TensorMap& params) {
  NamedTensors out;
  for (const auto& [name, t] : params) {
    if (config.tie_embeddings && name == "lm_head.weight") continue;  // the embedding's twin
    out.emplace_back(name, t);
  }
  return out;
}

void save_checkpoint(const std::string& dir, const ModelConfig& config, const TensorMap& params,
                     const AdamW& optimizer, int64_t step, const nlohmann::json& options) {
  fs::create_directories(dir);
  config.save((fs::path(dir) / "config.json").string());
  write_safetensors((fs::path(dir) / "model.safetensors").string(), checkpoint_tensors(config, params),
                    {{"format", "pt"}, {"mamba3_step", std::to_string(step)}});
  write_safetensors((fs::path(dir) / "trainer_state.safetensors").string(), optimizer.state_tensors(),
                    {{"format", kStateFormat},
                     {"version", kStateVersion},
                     {"step", std::to_string(step)},
                     {"optimizer_steps", std::to_string(optimizer.steps())},
                     {"options", options.dump()}});
}

bool has_checkpoint(const std::string& dir) {
  return fs::exists(fs::path(dir) / "trainer_state.safetensors") && fs::exists(fs::path(dir) / "model.safetensors");
}

Checkpoint load_checkpoint(const std::string& dir) {
  MAMBA3_CHECK(has_checkpoint(dir), "{}: no checkpoint to resume from (model.safetensors and "
               "trainer_state.safetensors are written by `mamba3 train`)", dir);
  Checkpoint c;
  c.config = ModelConfig::load((fs::path(dir) / "config.json").string());
  const SafetensorsFile model = SafetensorsFile::open((fs::path(dir) / "model.safetensors").string());
  const SafetensorsFile state = SafetensorsFile::open((fs::path(dir) / "trainer_state.safetensors").string());
  auto fmt_it = state.metadata().find("format");
  MAMBA3_CHECK(fmt_it != state.metadata().end() && fmt_it->second == kStateFormat,
               "{}: not a mamba3 trainer state (metadata format '{}')", state.path(), kStateFormat);
  auto ver_it = state.metadata().find("version");
  MAMBA3_CHECK(ver_it != state.metadata().end() && ver_it->second == kStateVersion,
               "{}: trainer state version is not {}", state.path(), kStateVersion);
  c.step = metadata_int(state, "step");
  c.optimizer_steps = metadata_int(state, "optimizer_steps");
  const int64_t model_step = metadata_int(model, "mamba3_step");
  MAMBA3_CHECK(model_step == c.step,
               "{}: model.safetensors is at step {} but trainer_state.safetensors at step {} (the run was "
               "interrupted while saving); cannot resume exactly",
               dir, model_step, c.step);
  try {
    c.options = nlohmann::json::parse(state.metadata().at("options"));
  } catch (const std::exception& e) {
    fail("{}: metadata 'options' is not valid JSON: {}", state.path(), e.what());
  }
  for (const auto& [name, t] : model.tensors()) c.params[name] = t.to(DType::F32);
  for (const auto& [name, t] : state.tensors()) c.optimizer_tensors[name] = t;
  return c;
}

void prepare_output_dir(const std::string& dir) {
  MAMBA3_CHECK(!dir.empty(), "no output directory given");
  std::error_code ec;
  fs::create_directories(dir, ec);
  MAMBA3_CHECK(!ec && fs::is_directory(dir), "output directory {} cannot be created: {}", dir,
               ec ? ec.message() : std::string("a file of that name exists"));
  const std::string probe = (fs::path(dir) / ".write_probe").string();
  try {
    AtomicFile f(probe);
    f.write("ok");
    f.commit();
  } catch (const Error& e) {
    fail("output directory {} is not writable: {}", dir, e.what());
  }
  std::remove(probe.c_str());
}

}  // namespace mamba3
