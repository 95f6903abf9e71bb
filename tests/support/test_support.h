#pragma once
// Shared test helpers: golden-data discovery, error metrics, random tensors.
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mamba3::test {

// MAMBA3_GOLDEN_DIR, or ../shared/golden beside the project root.
std::filesystem::path golden_dir();
// Files or folders directly in the golden dir whose names start with `prefix` (sorted). Empty if none.
std::vector<std::filesystem::path> golden_cases(const std::string& prefix);
// The golden mixer cases: golden_cases("mixer_") that are .safetensors files.
std::vector<std::filesystem::path> golden_mixer_files();

// ||out - ref|| / ||ref|| over all elements (both read as float64). NaN anywhere yields NaN (so checks fail).
double rel_l2(const Tensor& out, const Tensor& ref);
// The same for angles: the difference is taken modulo 2π (into (-π, π]) and the norm of ref wrapped into [0, 2π).
double rel_l2_angles(const Tensor& out, const Tensor& ref);
// max|out - ref| / max|ref|.
double rel_max(const Tensor& out, const Tensor& ref);

// f32 tensor with values drawn uniformly from [lo, hi).
Tensor random_tensor(std::mt19937& rng, Shape shape, float lo = -1.0f, float hi = 1.0f);

}  // namespace mamba3::test
