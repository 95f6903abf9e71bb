#include "cuda/sampling_gpu.h"

#include <cmath>
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

GpuSampler GpuSampler::per_row(int64_t vocab_size, int64_t n_logits, int64_t batch) {
  SamplingParams greedy;
  greedy.temperature = 0.0f;
  GpuSampler s(greedy, vocab_size, n_logits, batch);  // checks the sizes
  s.host_params_.assign(size_t(batch), detail::SamplerRowParams{});
  s.host_active_.assign(size_t(batch), uint8_t(1));
  s.row_params_.resize(s.host_params_.size() * sizeof(detail::SamplerRowParams));
  s.row_params_.upload(s.host_params_.data(), s.row_params_.bytes());
  s.active_.resize(s.host_active_.size());
  s.active_.upload(s.host_active_.data(), s.active_.bytes());
  s.counts_.resize(size_t(batch) * size_t(n_logits) * sizeof(int32_t));
  MAMBA3_CUDA_CHECK(cudaMemset(s.counts_.raw(), 0, s.counts_.bytes()));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());  // as in the constructor: the legacy stream's work is done
  s.args_.params = s.row_params_.as<detail::SamplerRowParams>();
  s.args_.counts = s.counts_.as<int32_t>();
  s.args_.active = s.active_.as<uint8_t>();
  return s;
}

void GpuSampler::sample(const Context& ctx, const float* logits, int32_t* ids) const {
  detail::SamplerKernelArgs a = args_;
  a.logits = logits;
  a.ids = ids;
  detail::sampler_sample(ctx.stream(), a);
}

void GpuSampler::sample_rows(const Context& ctx, const float* logits, const int64_t* rows, int64_t count,
                             int32_t* ids) const {
  MAMBA3_CHECK(count >= 0 && count <= args_.batch, "GpuSampler::sample_rows: {} rows for a batch of {}", count,
               args_.batch);
  if (count == 0) return;
  MAMBA3_CHECK(rows != nullptr, "GpuSampler::sample_rows: rows is null ({} rows)", count);
  std::vector<uint8_t> taken(size_t(args_.batch), uint8_t(0));
  for (int64_t b = 0; b < count; ++b) {
    MAMBA3_CHECK(rows[b] >= 0 && rows[b] < args_.batch, "GpuSampler::sample_rows: row {} outside the batch of {}",
                 rows[b], args_.batch);
    MAMBA3_CHECK(!taken[size_t(rows[b])], "GpuSampler::sample_rows: row {} listed twice", rows[b]);
    taken[size_t(rows[b])] = 1;
  }
  const size_t bytes = size_t(count) * sizeof(int64_t);
  if (bytes > rows_.bytes()) {
    ctx.sync();  // an earlier sample_rows may still read the old buffer
    rows_.reserve(bytes);
  }
  // From pageable memory: CUDA stages `rows` before returning, so the caller may reuse it at once.
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(rows_.raw(), rows, bytes, cudaMemcpyHostToDevice, ctx.stream()));
  detail::SamplerKernelArgs a = args_;
  a.logits = logits;
  a.ids = ids;
  a.active = nullptr;
  a.rows = rows_.as<int64_t>();
  a.n_rows = count;
  detail::sampler_sample(ctx.stream(), a);
}

void GpuSampler::restart_row(const Context& ctx, int64_t row, const int64_t* prompt, int64_t count) const {
  const size_t bytes = size_t(count) * sizeof(int64_t);
  if (bytes > prompt_.bytes()) {
    ctx.sync();  // an earlier start_row may still read the old staging buffer
    prompt_.reserve(bytes);
  }
  if (bytes > 0)
    MAMBA3_CUDA_CHECK(cudaMemcpyAsync(prompt_.raw(), prompt, bytes, cudaMemcpyHostToDevice, ctx.stream()));
  detail::sampler_start_row(ctx.stream(), args_, row, prompt_.as<int64_t>(), count);
}

namespace {

void check_row_and_prompt(const char* who, int64_t row, int64_t batch, const int64_t* prompt, int64_t count,
                          int64_t n_logits) {
  MAMBA3_CHECK(row >= 0 && row < batch, "GpuSampler::{}: row {} outside the batch of {}", who, row, batch);
  MAMBA3_CHECK(count >= 0 && (count == 0 || prompt != nullptr), "GpuSampler::{}: bad prompt ({} ids)", who, count);
  for (int64_t j = 0; j < count; ++j)
    MAMBA3_CHECK(prompt[j] >= 0 && prompt[j] < n_logits, "GpuSampler::{}: prompt holds id {}, outside [0, {})", who,
                 prompt[j], n_logits);
}

}  // namespace

void GpuSampler::start_row(const Context& ctx, int64_t row, const int64_t* prompt, int64_t count) const {
  check_row_and_prompt("start_row", row, args_.batch, prompt, count, args_.n_logits);
  restart_row(ctx, row, prompt, count);
}

void GpuSampler::set_row(const Context& ctx, int64_t row, const SamplingParams& p, float presence_penalty,
                         float frequency_penalty, const int64_t* prompt, int64_t count) {
  MAMBA3_CHECK(per_row_mode(), "GpuSampler::set_row: only in per-row mode (GpuSampler::per_row); use start_row");
  p.validate();
  MAMBA3_CHECK(std::isfinite(presence_penalty), "GpuSampler::set_row: presence_penalty must be finite, got {}",
               presence_penalty);
  MAMBA3_CHECK(std::isfinite(frequency_penalty), "GpuSampler::set_row: frequency_penalty must be finite, got {}",
               frequency_penalty);
  check_row_and_prompt("set_row", row, args_.batch, prompt, count, args_.n_logits);
  detail::SamplerRowParams& h = host_params_[size_t(row)];
  h.temperature = p.temperature;
  h.top_p = p.top_p;
  h.min_p = p.min_p;
  h.penalty = p.repetition_penalty;
  h.presence = presence_penalty;
  h.frequency = frequency_penalty;
  h.top_k = p.top_k;
  h.seed = p.seed;
  // The entry stays alive (and, being pageable, is staged by CUDA before the call returns).
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(row_params_.as<detail::SamplerRowParams>() + row, &h, sizeof(h),
                                    cudaMemcpyHostToDevice, ctx.stream()));
  restart_row(ctx, row, prompt, count);
}

void GpuSampler::set_active(const Context& ctx, const uint8_t* active) {
  MAMBA3_CHECK(per_row_mode(), "GpuSampler::set_active: only in per-row mode (GpuSampler::per_row)");
  MAMBA3_CHECK(active != nullptr, "GpuSampler::set_active: active is null");
  for (size_t b = 0; b < host_active_.size(); ++b) host_active_[b] = active[b] != 0;
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(active_.raw(), host_active_.data(), host_active_.size(), cudaMemcpyHostToDevice,
                                    ctx.stream()));
}

}  // namespace mamba3::cuda
