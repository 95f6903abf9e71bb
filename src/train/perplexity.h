#pragma once
// Perplexity of a language model on held-out token ids: the number behind a model's documented validation figure
// (`mamba3 eval`, models/default/README.md) and the same windows as the trainer's validation.
#include <cstdint>
#include <span>

#include "model/language_model.h"

namespace mamba3 {

struct PerplexityResult {
  int64_t tokens = 0;     // ids given
  int64_t windows = 0;    // windows scored
  int64_t predicted = 0;  // targets scored (each window's ids after its first)
  double nll = 0;         // mean negative log-likelihood per predicted token, natural log
  double perplexity() const;
};

// Cuts `tokens` into consecutive non-overlapping windows of `window` ids (the trainer's validation windows are
// seq_len + 1 ids); a shorter last window is scored too when it has at least 2 ids. Each window starts from a fresh
// state, and every position but the last predicts the next id with a softmax over all V_pad logits (as the training
// loss does). Sums are taken in double, in window order: the result does not depend on the thread count beyond
// what the model's own kernels do. Throws when window < 2, fewer than 2 ids are given, or an id is outside the
// vocabulary.
PerplexityResult evaluate_perplexity(const LanguageModel& model, std::span<const int64_t> tokens, int64_t window);

// The same windows and sums, scored through decode steps: each window from a fresh state, one token per step, as
// generation runs (equal to evaluate_perplexity up to rounding). bf16_state: after every step each Mamba-3 layer's
// ssm state (the P × N matrices) is rounded to bf16, nearest even, while the arithmetic stays f32 — what a bf16
// state cache stores — so that what that storage costs a model can be measured on any machine.
PerplexityResult evaluate_perplexity_decode(const LanguageModel& model, std::span<const int64_t> tokens,
                                            int64_t window, bool bf16_state = false);

}  // namespace mamba3
