#pragma once
// Generation: prefill each prompt into its row of one cache, then decode all rows together, one token per row per
// step, sampling each row with its own seeded sampler (row r uses seed + r, so a row's text does not depend on
// what else is in the batch). A callback sees every token as it is produced.
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "infer/sampler.h"
#include "model/language_model.h"

namespace mamba3 {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingParams sampling;
  std::vector<int64_t> stop_ids;  // a row ends after producing one of these (it is included in the output)
};

struct GenerateStats {
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
};

// on_token(row, id) is called for every generated token, in order; return false to stop that row.
using TokenCallback = std::function<bool(int64_t row, int64_t id)>;

// Different prompts, one row each. Returns the generated ids per row.
std::vector<std::vector<int64_t>> generate(const LanguageModel& model, const std::vector<std::vector<int64_t>>& prompts,
                                           const GenerateOptions& options, const TokenCallback& on_token = {},
                                           GenerateStats* stats = nullptr);

// One prompt, n continuations: the prompt is prefilled once and its cache forked into n rows.
std::vector<std::vector<int64_t>> generate_n(const LanguageModel& model, const std::vector<int64_t>& prompt, int64_t n,
                                             const GenerateOptions& options, const TokenCallback& on_token = {},
                                             GenerateStats* stats = nullptr);

}  // namespace mamba3
