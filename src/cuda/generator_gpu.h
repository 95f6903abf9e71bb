#pragma once
// Generation on the GPU (`mamba3 generate --device cuda`): prefill on the GPU, then decode steps with sampling on the GPU (one captured graph
// per step), so only the chosen ids cross to the host.
#include <string>
#include <vector>

#include "infer/generator.h"

namespace mamba3::cuda {

// `batch` continuations of one prompt. The random stream of row r is (seed, r) of the GPU sampler (a counter-based
// generator), not the CPU's mt19937: the same seed gives different samples on the two devices (greedy is identical).
std::vector<std::vector<int64_t>> generate_gpu(const std::string& model_dir, const std::string& precision,
                                                const std::vector<int64_t>& prompt, int64_t batch,
                                                const GenerateOptions& options, const TokenCallback& on_token,
                                                GenerateStats* stats, const std::string& state_precision = "f32");

}  // namespace mamba3::cuda
