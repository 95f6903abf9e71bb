#include "cuda/sampling_gpu.h"

#include <limits>

#include "infer/sampler.h"

namespace mamba3::cuda {

GpuSampler::GpuSampler(const SamplingParams& params, int64_t vocab_size, int64_t n_logits, int64_t batch) {
  params.validate();
  MAMBA3_CHECK(vocab_size > 0 && vocab_size <= std::numeric_limits<int32_t>::max(),
               "GpuSampler: vocab_size must lie in [1, 2^31), got {}", vocab_size);
  MAMBA3_CHECK(n_logits >= vocab_size && n_logits <= std::numeric_limits<int32_t>::max(),
               "GpuSampler: n_logits {} must lie in [vocab_size {}, 2^31)", n_logits, vocab_size);
  MAMBA3_CHECK(batch > 0 && batch <= 65535, "GpuSampler: batch must lie in [1, 65535], got {}", batch);
  detail::SamplerKernelArgs& a = args_;
  a.temperature = params.temperature;
  a.top_k = params.top_k;
  a.top_p = params.top_p;
  a.min_p = params.min_p;
  a.penalty = params.repetition_penalty;
  a.seed = params.seed;
  a.vocab = vocab_size;
  a.n_logits = n_logits;
  a.batch = batch;
  a.words = (n_logits + 31) / 32;
  int bits = 0;  // ⌈log2 vocab⌉: vocab weights of at most 2^s each sum to at most 2^62
  while ((int64_t(1) << bits) < vocab_size) ++bits;
  a.mass_shift = 62 - bits;

  seen_.resize(size_t(batch * a.words) * sizeof(uint32_t));
  counters_.resize(size_t(batch) * sizeof(uint64_t));
  MAMBA3_CUDA_CHECK(cudaMemset(seen_.raw(), 0, seen_.bytes()));
  MAMBA3_CUDA_CHECK(cudaMemset(counters_.raw(), 0, counters_.bytes()));
  // cudaMemset runs on the legacy stream, which a non-blocking Context stream does not wait for.
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  a.seen = seen_.as<uint32_t>();
  a.counters = counters_.as<uint64_t>();
}

void GpuSampler::sample(const Context& ctx, const float* logits, int32_t* ids) const {
  detail::SamplerKernelArgs a = args_;
  a.logits = logits;
  a.ids = ids;
  detail::sampler_sample(ctx.stream(), a);
}

void GpuSampler::start_row(const Context& ctx, int64_t row, const int64_t* prompt, int64_t count) const {
  MAMBA3_CHECK(row >= 0 && row < args_.batch, "GpuSampler::start_row: row {} outside the batch of {}", row,
               args_.batch);
  MAMBA3_CHECK(count >= 0 && (count == 0 || prompt != nullptr), "GpuSampler::start_row: bad prompt ({} ids)", count);
  for (int64_t j = 0; j < count; ++j)
    MAMBA3_CHECK(prompt[j] >= 0 && prompt[j] < args_.n_logits,
                 "GpuSampler::start_row: prompt holds id {}, outside [0, {})", prompt[j], args_.n_logits);
  const size_t bytes = size_t(count) * sizeof(int64_t);
  if (bytes > prompt_.bytes()) {
    ctx.sync();  // an earlier start_row may still read the old staging buffer
    prompt_.reserve(bytes);
  }
  if (bytes > 0)
    MAMBA3_CUDA_CHECK(cudaMemcpyAsync(prompt_.raw(), prompt, bytes, cudaMemcpyHostToDevice, ctx.stream()));
  detail::sampler_start_row(ctx.stream(), args_, row, prompt_.as<int64_t>(), count);
}

}  // namespace mamba3::cuda
