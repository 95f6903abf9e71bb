#pragma once
// Training checkpoints in the official layout, plus what resuming needs. A checkpoint directory holds:
//   config.json                 ModelConfig::save (the official MambaConfig fields)
//   model.safetensors           the parameters under their official names, f32. With tied embeddings only
//                               backbone.embedding.weight is stored (as Hugging Face–style exports do);
//                               LanguageModel::load accepts that. Metadata: format "pt", mamba3_step.
//   trainer_state.safetensors   AdamW moments (exp_avg.<name>, exp_avg_sq.<name>) with metadata: format
//                               "mamba3-trainer-state", version, step (optimizer steps done), optimizer_steps,
//                               and options (the training options as JSON, seed included: the data sampler and
//                               everything else random is a pure function of seed and step, so step + seed is the
//                               whole RNG state).
// Each file is written atomically. model.safetensors and trainer_state.safetensors both carry the step; a pair
// that disagrees (a crash between the two renames) is refused on load rather than resumed inexactly.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "model/model_config.h"
#include "train/optimizer.h"

namespace mamba3 {

struct Checkpoint {
  ModelConfig config;
  TensorMap params;  // owned f32 copies, writable
  TensorMap optimizer_tensors;
  int64_t step = 0;
  int64_t optimizer_steps = 0;
  nlohmann::json options;  // as saved
};

void save_checkpoint(const std::string& dir, const ModelConfig& config, const TensorMap& params,
                     const AdamW& optimizer, int64_t step, const nlohmann::json& options);
// Reads a checkpoint written by save_checkpoint; errors name the file at fault.
Checkpoint load_checkpoint(const std::string& dir);
bool has_checkpoint(const std::string& dir);

// The parameters as model.safetensors stores them (tied lm_head.weight left out).
NamedTensors checkpoint_tensors(const ModelConfig& config, const TensorMap& params);

// Creates `dir` if needed and proves it writable by writing and removing a probe file; throws a clear error
// ("output directory X is not writable: …") otherwise. Meant to run before any training starts.
void prepare_output_dir(const std::string& dir);

}  // namespace mamba3
