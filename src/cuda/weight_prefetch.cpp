#include "cuda/weight_prefetch.h"

#include <algorithm>
#include <string>

#include "cuda/cuda_check.h"
#include "cuda/env_switch.h"
#include "cuda/l2_prefetch.h"

namespace mamba3::cuda {

WeightPrefetchOptions weight_prefetch_from_env() {
  static const WeightPrefetchOptions o = [] {
    WeightPrefetchOptions w;
    const std::string m = env_choice("MAMBA3_DECODE_PREFETCH", {"0", "kernel", "product"});
    w.mode = m == "kernel" ? WeightPrefetch::Kernel : m == "product" ? WeightPrefetch::Product : WeightPrefetch::Off;
    w.max_bytes = size_t(env_integer("MAMBA3_DECODE_PREFETCH_MB", 0, 0, 1 << 20)) << 20;
    w.min_rows = env_integer("MAMBA3_DECODE_PREFETCH_MIN_ROWS", w.min_rows, 1, int64_t(1) << 30);
    w.evict_last = env_choice("MAMBA3_DECODE_PREFETCH_POLICY", {"normal", "last"}) == "last";
    return w;
  }();
  return o;
}

WeightPrefetcher::~WeightPrefetcher() {
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  if (side_) cudaStreamDestroy(side_);
}

cudaEvent_t WeightPrefetcher::next_event() {
  if (used_ == events_.size()) {
    cudaEvent_t e = nullptr;
    MAMBA3_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    events_.push_back(e);
  }
  return events_[used_++];
}

void WeightPrefetcher::set_options(const WeightPrefetchOptions& o) {
  options_ = o;
  if (o.mode != WeightPrefetch::Off) create_side_stream();  // here, not inside a later step's graph capture
}

void WeightPrefetcher::create_side_stream() {
  if (!side_) {
    // The greatest priority: the hardware hands out a higher-priority kernel's blocks before the pending blocks of
    // the step's kernels (a state kernel has thousands), so a request does not wait for the kernel it should run
    // beside to drain.
    int least = 0, greatest = 0;
    MAMBA3_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    MAMBA3_CUDA_CHECK(cudaStreamCreateWithPriority(&side_, cudaStreamNonBlocking, greatest));
    int device = 0, l2 = 0;
    MAMBA3_CUDA_CHECK(cudaGetDevice(&device));
    MAMBA3_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    l2_bytes_ = size_t(l2);
  }
}

void WeightPrefetcher::begin() {
  create_side_stream();
  used_ = 0;
  requests_ = 0;
}

void WeightPrefetcher::request(cudaStream_t main, const GpuMatrix& w) {
  const size_t cap = options_.max_bytes ? options_.max_bytes : l2_bytes_ / 2;
  const size_t bytes = std::min(w.weight.bytes(), cap);
  if (bytes == 0) return;
  // The side stream issues the requests once the kernels queued on main so far have finished: beside the kernel
  // queued next on main, not earlier (when the lines could be evicted again before their product reads them).
  cudaEvent_t e = next_event();
  MAMBA3_CUDA_CHECK(cudaEventRecord(e, main));
  MAMBA3_CUDA_CHECK(cudaStreamWaitEvent(side_, e, 0));
  l2_prefetch(side_, w.weight.raw(), bytes, options_.evict_last);
  ++requests_;
}

void WeightPrefetcher::end(cudaStream_t main) {
  if (requests_ == 0) return;
  cudaEvent_t e = next_event();
  MAMBA3_CUDA_CHECK(cudaEventRecord(e, side_));
  MAMBA3_CUDA_CHECK(cudaStreamWaitEvent(main, e, 0));
}

}  // namespace mamba3::cuda
