#pragma once
// A decode step's weights requested into L2 ahead of their matrix products (l2_prefetch.h), on a side stream so that
// the requests never wait in the step's own stream order. At batch ≥ 65 the products run on cuBLAS, whose kernels
// start their weight stream only when they start; here the stream of the next product begins while the kernel
// before it (an add+norm, the Mamba-3 state kernel, or the previous product) still runs.
// MAMBA3_DECODE_PREFETCH: "0" (default) | "kernel" | "product" (docs/kernels/mamba3_cuda.md, "Weights requested into
// L2 ahead of their product"); MAMBA3_DECODE_PREFETCH_MB: the most bytes requested per product (default: half the
// device's L2); MAMBA3_DECODE_PREFETCH_MIN_ROWS: the smallest batch that requests (default 65);
// MAMBA3_DECODE_PREFETCH_POLICY: normal (default) | last (the lines at L2's evict-last priority).
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/gpu_matrix.h"

namespace mamba3::cuda {

// When a product's weights are requested. Kernel: as the kernel right before the product is queued (in_proj during
// the add+norm, out_proj during the state kernel, fc1 during the add+norm, fc2 during fc1). Product: as the product
// before it is queued (fc1 during out_proj, the next layer's in_proj during fc2; out_proj still during the state
// kernel, the first in_proj during the first add+norm).
enum class WeightPrefetch { Off, Kernel, Product };

struct WeightPrefetchOptions {
  WeightPrefetch mode = WeightPrefetch::Off;
  size_t max_bytes = 0;   // per product; 0: half the device's L2
  int64_t min_rows = 65;  // decode batches below this do not request
  bool evict_last = false;  // the requested lines at L2's evict-last priority (l2_prefetch)
};
// The options from the environment (read once per process).
WeightPrefetchOptions weight_prefetch_from_env();

class WeightPrefetcher {
 public:
  WeightPrefetcher() = default;
  ~WeightPrefetcher();
  WeightPrefetcher(const WeightPrefetcher&) = delete;
  WeightPrefetcher& operator=(const WeightPrefetcher&) = delete;

  // Creates the side stream when o requests (outside any capture: a step captured later only uses it).
  void set_options(const WeightPrefetchOptions& o);
  const WeightPrefetchOptions& options() const { return options_; }
  // Whether a decode step of `rows` rows requests weights.
  bool active(int64_t rows) const { return options_.mode != WeightPrefetch::Off && rows >= options_.min_rows; }

  // A step's requests: begin(), request() at each point, then end() after the step's last kernel, which joins the
  // side stream back into main (a captured graph must join every side branch). `main` is the step's stream.
  void begin();
  void request(cudaStream_t main, const GpuMatrix& w);
  void end(cudaStream_t main);
  // Requests queued since the last begin() (tests: the schedule must issue them).
  size_t requests() const { return requests_; }

 private:
  cudaEvent_t next_event();
  void create_side_stream();
  WeightPrefetchOptions options_;
  cudaStream_t side_ = nullptr;
  std::vector<cudaEvent_t> events_;
  size_t used_ = 0;         // events used in this step
  size_t l2_bytes_ = 0;     // the device's, read on first use
  size_t requests_ = 0;     // in this step; end() joins the side stream when there were any
};

}  // namespace mamba3::cuda
