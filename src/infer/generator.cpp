#include "infer/generator.h"

#include <algorithm>
#include <chrono>

namespace mamba3 {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The decode loop shared by both entry points: `first_logits` (B, V_pad) are the logits after each row's prompt.
std::vector<std::vector<int64_t>> decode(const LanguageModel& model, ModelCache& cache,
                                         const std::vector<std::vector<int64_t>>& prompts, const Tensor& first_logits,
                                         const GenerateOptions& opt, const TokenCallback& on_token,
                                         GenerateStats& stats) {
  const int64_t B = cache.batch(), V = model.config().vocab_padded();
  std::vector<Sampler> samplers;
  std::vector<std::vector<int64_t>> history(static_cast<size_t>(B)), out(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    SamplingParams p = opt.sampling;
    p.seed = opt.sampling.seed + uint64_t(b);
    samplers.emplace_back(p, model.config().vocab_size);
    history[size_t(b)] = prompts[size_t(std::min<int64_t>(b, int64_t(prompts.size()) - 1))];
    history[size_t(b)].reserve(history[size_t(b)].size() + size_t(std::max<int64_t>(opt.max_new_tokens, 0)));
    out[size_t(b)].reserve(size_t(std::max<int64_t>(opt.max_new_tokens, 0)));
  }
  std::vector<char> done(size_t(B), opt.max_new_tokens <= 0);
  std::vector<int64_t> last(size_t(B), 0);
  Tensor logits = first_logits;
  const auto start = Clock::now();
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    if (step > 0) model.step(last, cache, logits);
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      if (done[size_t(b)]) continue;
      const int64_t id = samplers[size_t(b)].sample(logits.data<float>() + b * V, V, history[size_t(b)]);
      last[size_t(b)] = id;
      history[size_t(b)].push_back(id);
      out[size_t(b)].push_back(id);
      ++stats.generated_tokens;
      const bool keep = on_token ? on_token(b, id) : true;
      const bool stop = std::find(opt.stop_ids.begin(), opt.stop_ids.end(), id) != opt.stop_ids.end();
      if (!keep || stop || int64_t(out[size_t(b)].size()) >= opt.max_new_tokens) done[size_t(b)] = 1;
      any = any || !done[size_t(b)];
    }
    if (!any) break;
  }
  stats.decode_seconds += seconds_since(start);
  return out;
}

}  // namespace

std::vector<std::vector<int64_t>> generate(const LanguageModel& model, const std::vector<std::vector<int64_t>>& prompts,
                                           const GenerateOptions& options, const TokenCallback& on_token,
                                           GenerateStats* stats) {
  MAMBA3_CHECK(!prompts.empty(), "generate: no prompt given");
  options.sampling.validate();
  GenerateStats local;
  GenerateStats& st = stats ? *stats : local;
  const int64_t B = int64_t(prompts.size()), V = model.config().vocab_padded();
  ModelCache cache = model.new_cache(B);
  Tensor first = Tensor::empty(DType::F32, {B, V});
  const auto start = Clock::now();
  for (int64_t b = 0; b < B; ++b) {
    Tensor l = model.prefill(prompts[size_t(b)], cache, b);
    std::copy_n(l.data<float>(), V, first.data<float>() + b * V);
    st.prompt_tokens += int64_t(prompts[size_t(b)].size());
  }
  st.prefill_seconds += seconds_since(start);
  return decode(model, cache, prompts, first, options, on_token, st);
}

std::vector<std::vector<int64_t>> generate_n(const LanguageModel& model, const std::vector<int64_t>& prompt, int64_t n,
                                             const GenerateOptions& options, const TokenCallback& on_token,
                                             GenerateStats* stats) {
  MAMBA3_CHECK(n >= 1, "generate: the number of continuations must be at least 1, got {}", n);
  options.sampling.validate();
  GenerateStats local;
  GenerateStats& st = stats ? *stats : local;
  const int64_t V = model.config().vocab_padded();
  ModelCache one = model.new_cache(1);
  const auto start = Clock::now();
  Tensor l = model.prefill(prompt, one, 0);
  st.prompt_tokens += int64_t(prompt.size());
  st.prefill_seconds += seconds_since(start);
  ModelCache cache = one.fork(0, n);
  Tensor first = Tensor::empty(DType::F32, {n, V});
  for (int64_t b = 0; b < n; ++b) std::copy_n(l.data<float>(), V, first.data<float>() + b * V);
  return decode(model, cache, {prompt}, first, options, on_token, st);
}

}  // namespace mamba3
