#include "cuda/generator_gpu.h"

#include <algorithm>
#include <chrono>

#include "cuda/cuda_model.h"
#include "cuda/sampling_gpu.h"

namespace mamba3::cuda {

std::vector<std::vector<int64_t>> generate_gpu(const std::string& model_dir, const std::string& precision,
                                                const std::vector<int64_t>& prompt, int64_t batch,
                                                const GenerateOptions& options, const TokenCallback& on_token,
                                                GenerateStats* stats, const std::string& state_precision) {
  using clock = std::chrono::steady_clock;
  const Precision state = parse_precision(state_precision);  // checked before the model loads
  CudaModel model = CudaModel::load(model_dir, parse_precision(precision));
  model.set_state_precision(state);
  const ModelConfig& c = model.config();
  const int64_t L = int64_t(prompt.size()), n = options.max_new_tokens;
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(batch));
  if (n == 0) return out;
  GpuCache cache = model.new_cache(batch, L + n + 1);
  GpuSampler sampler(options.sampling, c.vocab_size, c.vocab_padded(), batch);
  for (int64_t r = 0; r < batch; ++r) sampler.start_row(model.context(), r, prompt.data(), L);

  const auto t0 = clock::now();
  std::vector<int64_t> prompts;
  for (int64_t r = 0; r < batch; ++r) prompts.insert(prompts.end(), prompt.begin(), prompt.end());
  Tensor logits = model.prefill(prompts, batch, L, cache);
  cache.upload_logits(logits);
  sampler.sample(model.context(), cache.device_logits(), cache.device_ids());
  model.context().sync();
  const auto t1 = clock::now();

  std::vector<int32_t> ids(static_cast<size_t>(batch));
  std::vector<bool> done(static_cast<size_t>(batch), false);
  int64_t generated = 0, active = batch;
  for (int64_t step = 0; step < n && active > 0; ++step) {
    MAMBA3_CUDA_CHECK(cudaMemcpyAsync(ids.data(), cache.device_ids(), ids.size() * 4, cudaMemcpyDeviceToHost,
                                      model.context().stream()));
    model.context().sync();
    for (int64_t r = 0; r < batch; ++r) {
      if (done[size_t(r)]) continue;
      const int64_t id = ids[size_t(r)];
      out[size_t(r)].push_back(id);
      ++generated;
      const bool stop = std::find(options.stop_ids.begin(), options.stop_ids.end(), id) != options.stop_ids.end();
      const bool keep = on_token ? on_token(r, id) : true;
      if (stop || !keep || int64_t(out[size_t(r)].size()) >= n) done[size_t(r)] = true, --active;
    }
    // The next step feeds the ids just sampled (already in device_ids) and samples the following ones.
    if (active > 0 && step + 1 < n) model.step_device(cache, &sampler);
  }
  model.context().sync();
  if (stats) {
    stats->prompt_tokens = L * batch;
    stats->generated_tokens = generated;
    stats->prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
    stats->decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  }
  return out;
}

}  // namespace mamba3::cuda
