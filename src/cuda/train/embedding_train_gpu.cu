#include <algorithm>
#include <climits>
#include <numeric>
#include <vector>

#include "cuda/train/block_reduce.cuh"
#include "cuda/train/embedding_train_gpu.h"

namespace mamba3::cuda {
namespace {

// Block (u, c): distinct id u, columns [c·blockDim, (c+1)·blockDim). Each thread walks the id's rows in order.
// Cost: reads rows·D floats of dy and unique·D of the table, writes unique·D.
__global__ void embedding_backward_kernel(const int32_t* ids, const int32_t* offsets, const int32_t* row_list,
                                          int64_t unique, const float* dy, int64_t D, float* dtable) {
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  for (int64_t u = blockIdx.x; u < unique; u += gridDim.x) {
    float* t = dtable + int64_t(ids[u]) * D + j;
    float acc = *t;
    for (int32_t k = offsets[u]; k < offsets[u + 1]; ++k) acc += dy[int64_t(row_list[k]) * D + j];
    *t = acc;
  }
}

}  // namespace

void EmbeddingGradPlan::rebuild(cudaStream_t s, const int32_t* host_ids, int64_t n) {
  MAMBA3_CHECK(n >= 0 && n < INT32_MAX, "EmbeddingGradPlan: {} rows (at most 2³¹ − 1)", n);
  std::vector<int32_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  // Stable: rows of one id stay ascending, which fixes the summation order.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return host_ids[a] < host_ids[b]; });
  std::vector<int32_t> ids, offsets;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t id = host_ids[order[size_t(k)]];
    MAMBA3_CHECK(id >= 0, "EmbeddingGradPlan: token id {} at row {} is negative", id, order[size_t(k)]);
    if (ids.empty() || ids.back() != id) {
      ids.push_back(id);
      offsets.push_back(int32_t(k));
    }
  }
  offsets.push_back(int32_t(n));
  rows = n;
  unique = int64_t(ids.size());
  host_packed.clear();
  host_packed.insert(host_packed.end(), ids.begin(), ids.end());
  host_packed.insert(host_packed.end(), offsets.begin(), offsets.end());
  host_packed.insert(host_packed.end(), order.begin(), order.end());
  const size_t bytes = host_packed.size() * sizeof(int32_t);
  if (bytes > packed.bytes()) {
    MAMBA3_CUDA_CHECK(cudaStreamSynchronize(s));  // kernels may still read the buffer about to be freed
    packed.resize(bytes);
  }
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(packed.raw(), host_packed.data(), bytes, cudaMemcpyHostToDevice, s));
}

EmbeddingGradPlan EmbeddingGradPlan::build(const int32_t* host_ids, int64_t rows) {
  EmbeddingGradPlan plan;
  plan.rebuild(cudaStreamLegacy, host_ids, rows);
  MAMBA3_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  return plan;
}

void embedding_backward_gpu(cudaStream_t s, const EmbeddingGradPlan& plan, const float* dy, int64_t D,
                            float* dtable) {
  if (plan.unique == 0 || D <= 0) return;
  const int threads = train_detail::threads_for(D);
  const int64_t col_blocks = (D + threads - 1) / threads;
  MAMBA3_CHECK(col_blocks <= 65535, "embedding_backward_gpu: D {} too wide", D);
  const dim3 grid(unsigned(std::min<int64_t>(plan.unique, 1 << 20)), unsigned(col_blocks));
  embedding_backward_kernel<<<grid, threads, 0, s>>>(plan.ids(), plan.offsets(), plan.row_list(), plan.unique, dy,
                                                     D, dtable);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
