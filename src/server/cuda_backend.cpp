#include "server/cuda_backend.h"

#include <algorithm>

#include "cuda/cuda_check.h"

namespace mamba3::server {

CudaBackend::CudaBackend(const cuda::CudaModel& model, int64_t slots, int64_t capacity)
    : model_(model), slots_(slots), capacity_(capacity),
      cache_(model.new_cache(slots, capacity)),
      sampler_(cuda::GpuSampler::per_row(model.config().vocab_size, model.config().vocab_padded(), slots)),
      pool_(std::make_shared<GpuCachePool>()) {
  MAMBA3_CHECK(slots >= 1 && capacity >= 1, "cuda server: slots {} and capacity {} must be at least 1", slots, capacity);
  for (int64_t i = 0; i < model.config().n_layer; ++i) has_attention_ |= model.config().is_attention_layer(i);
  first_logits_ = cuda::DeviceBuffer(size_t(model.config().vocab_padded()) * sizeof(float));
  active_.assign(size_t(slots), 0);
  seq_of_.assign(size_t(slots), -1);
  for (int64_t s = slots - 1; s >= 0; --s) free_.push_back(s);
  ids_.assign(size_t(slots), 0);
  // Idle slots still run through the embedding: their ids must be valid tokens.
  MAMBA3_CUDA_CHECK(cudaMemset(cache_.device_ids(), 0, size_t(slots) * sizeof(int32_t)));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  model_.set_active(cache_, active_);
}

CudaBackend::~CudaBackend() = default;

CudaPromptState::~CudaPromptState() {
  if (auto pool = pool_.lock(); pool && pool->spare.size() < pool->max_spare) pool->spare.push_back(std::move(cache));
}

std::unique_ptr<CudaPromptState> CudaBackend::take_state() {
  if (!pool_->spare.empty()) {
    cuda::GpuCache c = std::move(pool_->spare.back());
    pool_->spare.pop_back();
    return std::make_unique<CudaPromptState>(std::move(c), row_bytes_, pool_);
  }
  cuda::GpuCache c = model_.new_cache(1, capacity_);
  row_bytes_ = model_.row_bytes(c);
  return std::make_unique<CudaPromptState>(std::move(c), row_bytes_, pool_);
}

std::unique_ptr<PromptState> CudaBackend::new_prompt_state() {
  auto s = take_state();
  model_.reset_row(s->cache, 0);
  return s;
}

std::unique_ptr<PromptState> CudaBackend::copy(const PromptState& state) {
  const auto& from = dynamic_cast<const CudaPromptState&>(state);
  auto to = take_state();
  model_.copy_row(from.cache, 0, to->cache, 0);
  return to;
}

void CudaBackend::prefill(std::span<const int64_t> ids, PromptState& state, std::vector<float>& logits) {
  Tensor lg = model_.prefill(ids, 1, int64_t(ids.size()), dynamic_cast<CudaPromptState&>(state).cache);
  logits.assign(lg.data<float>(), lg.data<float>() + lg.numel());
}

void CudaBackend::prefill_batch(std::span<const std::span<const int64_t>> segments,
                                std::span<PromptState* const> states, std::span<std::vector<float>* const> logits) {
  const int64_t n = int64_t(segments.size());
  if (n == 1) return prefill(segments[0], *states[0], *logits[0]);
  if (n == 0) return;
  const int64_t len = int64_t(segments[0].size());
  batch_ids_.clear();
  for (const auto& seg : segments) {
    MAMBA3_CHECK(int64_t(seg.size()) == len, "cuda server: batched prefill segments of {} and {} tokens", len,
                 seg.size());
    batch_ids_.insert(batch_ids_.end(), seg.begin(), seg.end());
  }
  if (!batch_cache_ || batch_cache_->batch() < n)
    batch_cache_ = std::make_unique<cuda::GpuCache>(model_.new_cache(n, capacity_));
  for (int64_t i = 0; i < n; ++i)
    model_.copy_row(dynamic_cast<CudaPromptState&>(*states[size_t(i)]).cache, 0, *batch_cache_, i);
  const Tensor lg = model_.prefill(batch_ids_, n, len, *batch_cache_, 0);  // (n, V_pad)
  const int64_t Vp = lg.dim(1);
  for (int64_t i = 0; i < n; ++i) {
    model_.copy_row(*batch_cache_, i, dynamic_cast<CudaPromptState&>(*states[size_t(i)]).cache, 0);
    logits[size_t(i)]->assign(lg.data<float>() + i * Vp, lg.data<float>() + (i + 1) * Vp);
  }
}

int64_t CudaBackend::join(int64_t seq, const PromptState& state, std::span<const float> logits,
                          std::span<const int64_t> prompt, const SequenceSampling& sampling) {
  MAMBA3_CHECK(!slot_of_.count(seq), "engine: sequence {} joined twice", seq);
  MAMBA3_CHECK(!free_.empty(), "cuda server: all {} decode slots are taken", slots_);
  MAMBA3_CHECK(int64_t(logits.size()) == model_.config().vocab_padded(), "cuda server: {} first logits, expected {}",
               logits.size(), model_.config().vocab_padded());
  const cuda::Context& ctx = model_.context();
  const int64_t slot = free_.back();
  model_.copy_row(dynamic_cast<const CudaPromptState&>(state).cache, 0, cache_, slot);
  sampler_.set_row(ctx, slot, sampling.params, sampling.presence_penalty, sampling.frequency_penalty, prompt.data(),
                   int64_t(prompt.size()));
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(first_logits_.raw(), logits.data(), logits.size() * sizeof(float),
                                    cudaMemcpyHostToDevice, ctx.stream()));
  sampler_.sample_rows(ctx, first_logits_.as<float>(), &slot, 1, cache_.device_ids());
  int32_t id = 0;
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(&id, cache_.device_ids() + slot, sizeof(int32_t), cudaMemcpyDeviceToHost,
                                    ctx.stream()));
  ctx.sync();  // also keeps `logits` (host memory) alive until its upload is done
  free_.pop_back();
  seq_of_[size_t(slot)] = seq;
  slot_of_[seq] = slot;
  active_[size_t(slot)] = 1;
  return id;
}

void CudaBackend::leave(int64_t seq) {
  auto it = slot_of_.find(seq);
  if (it == slot_of_.end()) return;
  const int64_t slot = it->second;
  slot_of_.erase(it);
  seq_of_[size_t(slot)] = -1;
  active_[size_t(slot)] = 0;
  free_.push_back(slot);
  // Lowest free slot on top: live sequences stay packed at the front (nothing depends on it; easier to read).
  std::sort(free_.begin(), free_.end(), std::greater<>());
}

void CudaBackend::step(std::vector<std::pair<int64_t, int64_t>>& out) {
  out.clear();
  if (slot_of_.empty()) return;
  const cuda::Context& ctx = model_.context();
  model_.set_active(cache_, active_);
  sampler_.set_active(ctx, active_.data());
  model_.step_device(cache_, &sampler_);
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(ids_.data(), cache_.device_ids(), ids_.size() * sizeof(int32_t),
                                    cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.sync();
  for (int64_t s = 0; s < slots_; ++s)
    if (seq_of_[size_t(s)] >= 0) out.emplace_back(seq_of_[size_t(s)], int64_t(ids_[size_t(s)]));
}

}  // namespace mamba3::server
