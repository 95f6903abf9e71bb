#pragma once
// Fresh weights for a ModelConfig following the official initialisation (spec §1.3 and §9.7): embedding N(0, 0.02²),
// Linear layers U(±1/√fan_in), out_proj and fc2 re-drawn and divided by √n_layer, dt_bias = softplus⁻¹ of a
// log-uniform Δ in [dt_min, dt_max], biases ones, mimo_x and mimo_o 1/R, norms ones. Seeded: same seed, same model.
#include <cstdint>

#include "core/tensor.h"
#include "model/model_config.h"

namespace mamba3 {

// How the random tensors are drawn. Sequential: one generator stream in parameter order (the reference; training
// and tasks use it, so their documented seeds reproduce). Parallel: the same distributions, each block of 2^20
// values of each tensor from its own generator, filled by all threads (benchmarks: a 1.5B model's sequential init
// took most of a GPU benchmark's setup). Both are deterministic for a seed; they give different values.
enum class InitStreams { Sequential, Parallel };

TensorMap init_weights(const ModelConfig& config, uint64_t seed, InitStreams streams = InitStreams::Sequential);

}  // namespace mamba3
