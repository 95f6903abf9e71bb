#include "train/perplexity.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mamba3 {

double PerplexityResult::perplexity() const { return std::exp(nll); }

PerplexityResult evaluate_perplexity(const LanguageModel& model, std::span<const int64_t> tokens, int64_t window) {
  MAMBA3_CHECK(window >= 2, "evaluate_perplexity: window must hold at least 2 ids (got {})", window);
  const int64_t n = int64_t(tokens.size());
  MAMBA3_CHECK(n >= 2, "evaluate_perplexity: need at least 2 token ids (got {})", n);
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
    for (int64_t t = 0; t + 1 < len; ++t) {
      const float* row = z + t * v;
      const int64_t target = tokens[size_t(begin + t + 1)];
      MAMBA3_CHECK(target >= 0 && target < v, "evaluate_perplexity: id {} at position {} is outside the vocabulary "
                   "({} logits)", target, begin + t + 1, v);
      double m = row[0];
      for (int64_t j = 1; j < v; ++j) m = std::max(m, double(row[j]));
      double s = 0;
      for (int64_t j = 0; j < v; ++j) s += std::exp(double(row[j]) - m);
      total += m + std::log(s) - double(row[target]);
    }
    r.predicted += len - 1;
    ++r.windows;
  }
  r.nll = total / double(r.predicted);
  return r;
}

}  // namespace mamba3
