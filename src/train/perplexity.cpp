#include "train/perplexity.h"

#include <algorithm>
#include <cmath>

#include "core/dtype.h"
#include "core/error.h"

namespace mamba3 {

double PerplexityResult::perplexity() const { return std::exp(nll); }

namespace {

void check_arguments(int64_t window, int64_t n) {
  MAMBA3_CHECK(window >= 2, "evaluate_perplexity: window must hold at least 2 ids (got {})", window);
  MAMBA3_CHECK(n >= 2, "evaluate_perplexity: need at least 2 token ids (got {})", n);
}

// −log softmax(row)[target] over v logits, in double.
double token_nll(const float* row, int64_t v, int64_t target, int64_t position) {
  MAMBA3_CHECK(target >= 0 && target < v, "evaluate_perplexity: id {} at position {} is outside the vocabulary "
               "({} logits)", target, position, v);
  double m = row[0];
  for (int64_t j = 1; j < v; ++j) m = std::max(m, double(row[j]));
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(double(row[j]) - m);
  return m + std::log(s) - double(row[target]);
}

void round_ssm_to_bf16(const LanguageModel& model, ModelCache& cache) {
  for (int64_t i = 0; i < model.config().n_layer; ++i) {
    Tensor& ssm = cache.layer(i).mamba.ssm;
    if (!ssm.defined()) continue;  // an attention layer
    float* x = ssm.data<float>();
    const int64_t n = ssm.numel();
    for (int64_t j = 0; j < n; ++j) x[j] = bf16_to_f32(f32_to_bf16(x[j]));
  }
}

}  // namespace

PerplexityResult evaluate_perplexity(const LanguageModel& model, std::span<const int64_t> tokens, int64_t window) {
  const int64_t n = int64_t(tokens.size());
  check_arguments(window, n);
  PerplexityResult r;
  r.tokens = n;
  double total = 0;
  for (int64_t begin = 0; n - begin >= 2; begin += window) {
    const int64_t len = std::min(window, n - begin);
    ModelCache cache = model.new_cache(1);
    // The last id is only a target: feed ids [begin, begin + len - 1), score ids [begin + 1, begin + len).
    const auto inputs = tokens.subspan(size_t(begin), size_t(len - 1));
    const Tensor logits = model.prefill(inputs, cache, 0, /*all_logits=*/true);  // (len - 1, V_pad)
    const int64_t v = logits.dim(1);
    const float* z = logits.data<float>();
    for (int64_t t = 0; t + 1 < len; ++t) total += token_nll(z + t * v, v, tokens[size_t(begin + t + 1)], begin + t + 1);
    r.predicted += len - 1;
    ++r.windows;
  }
  r.nll = total / double(r.predicted);
  return r;
}

PerplexityResult evaluate_perplexity_decode(const LanguageModel& model, std::span<const int64_t> tokens,
                                            int64_t window, bool bf16_state) {
  const int64_t n = int64_t(tokens.size());
  check_arguments(window, n);
  const int64_t v = model.config().vocab_padded();
  PerplexityResult r;
  r.tokens = n;
  double total = 0;
  Tensor logits = Tensor::empty(DType::F32, {1, v});
  for (int64_t begin = 0; n - begin >= 2; begin += window) {
    const int64_t len = std::min(window, n - begin);
    ModelCache cache = model.new_cache(1);
    for (int64_t t = 0; t + 1 < len; ++t) {
      const int64_t id = tokens[size_t(begin + t)];
      MAMBA3_CHECK(id >= 0 && id < v, "evaluate_perplexity: id {} at position {} is outside the vocabulary ({} logits)",
                   id, begin + t, v);
      model.step(std::span<const int64_t>(&id, 1), cache, logits);
      if (bf16_state) round_ssm_to_bf16(model, cache);
      total += token_nll(logits.data<float>(), v, tokens[size_t(begin + t + 1)], begin + t + 1);
    }
    r.predicted += len - 1;
    ++r.windows;
  }
  r.nll = total / double(r.predicted);
  return r;
}

}  // namespace mamba3
