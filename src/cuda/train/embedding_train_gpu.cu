#include <algorithm>
#include <climits>
#include <vector>

#include "cuda/train/block_reduce.cuh"
#include "cuda/train/embedding_train_gpu.h"

namespace mamba3::cuda {
namespace {

// Block (u, c): distinct id u, columns [c·blockDim, (c+1)·blockDim). Each thread walks the id's rows in order.
// `unique` comes from the plan's device copy (the grid is sized by rows, which bound it).
// Cost: reads rows·D floats of dy and unique·D of the table, writes unique·D.
__global__ void embedding_backward_kernel(const int32_t* packed, const int32_t* ids, const int32_t* offsets,
                                          const int32_t* row_list, const float* dy, int64_t D, float* dtable) {
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  const int64_t unique = packed[0];
  for (int64_t u = blockIdx.x; u < unique; u += gridDim.x) {
    float* t = dtable + int64_t(ids[u]) * D + j;
    float acc = *t;
    for (int32_t k = offsets[u]; k < offsets[u + 1]; ++k) acc += dy[int64_t(row_list[k]) * D + j];
    *t = acc;
  }
}

}  // namespace

void EmbeddingGradPlan::prepare(const int32_t* host_ids, int64_t n) {
  MAMBA3_CHECK(n >= 0 && n < INT32_MAX / 3, "EmbeddingGradPlan: {} rows (at most (2³¹ − 1) / 3)", n);
  // A counting sort by id (rows ascending within an id, which fixes the summation order): O(rows + largest id), a
  // few tens of µs at 16k tokens where the comparison sort took ~1 ms — host time a step graph cannot hide.
  int32_t top = -1;
  for (int64_t k = 0; k < n; ++k) {
    MAMBA3_CHECK(host_ids[k] >= 0, "EmbeddingGradPlan: token id {} at row {} is negative", host_ids[k], k);
    top = std::max(top, host_ids[k]);
  }
  rows = n;
  host_packed.reserve(packed_ints() * sizeof(int32_t));
  int32_t* out = host_packed.as<int32_t>();
  int32_t *ids_out = out + 1, *offsets_out = ids_out + n, *rows_out = offsets_out + n + 1;
  counts_.assign(size_t(top) + 1, 0);
  for (int64_t k = 0; k < n; ++k) ++counts_[size_t(host_ids[k])];
  int64_t u = 0, start = 0;
  for (int32_t id = 0; id <= top; ++id) {  // counts become each id's first slot in row_list
    const int32_t cnt = counts_[size_t(id)];
    if (cnt == 0) continue;
    ids_out[u] = id;
    offsets_out[u] = int32_t(start);
    ++u;
    counts_[size_t(id)] = int32_t(start);
    start += cnt;
  }
  for (int64_t k = 0; k < n; ++k) rows_out[counts_[size_t(host_ids[k])]++] = int32_t(k);
  for (int64_t i = u; i <= n; ++i) offsets_out[i] = int32_t(n);  // the end, then unused slots with defined bytes
  for (int64_t i = u; i < n; ++i) ids_out[i] = 0;
  unique = u;
  out[0] = int32_t(u);
}

void EmbeddingGradPlan::upload(cudaStream_t s) {
  const size_t bytes = packed_ints() * sizeof(int32_t);
  if (bytes > packed.bytes()) {
    MAMBA3_CUDA_CHECK(cudaStreamSynchronize(s));  // kernels may still read the buffer about to be freed
    packed.resize(bytes);
  }
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(packed.raw(), host_packed.raw(), bytes, cudaMemcpyHostToDevice, s));
}

void EmbeddingGradPlan::rebuild(cudaStream_t s, const int32_t* host_ids, int64_t n) {
  prepare(host_ids, n);
  upload(s);
}

EmbeddingGradPlan EmbeddingGradPlan::build(const int32_t* host_ids, int64_t rows) {
  EmbeddingGradPlan plan;
  plan.rebuild(cudaStreamLegacy, host_ids, rows);
  MAMBA3_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
  return plan;
}

void embedding_backward_gpu(cudaStream_t s, const EmbeddingGradPlan& plan, const float* dy, int64_t D,
                            float* dtable) {
  if (plan.rows == 0 || D <= 0) return;
  const int threads = train_detail::threads_for(D);
  const int64_t col_blocks = (D + threads - 1) / threads;
  MAMBA3_CHECK(col_blocks <= 65535, "embedding_backward_gpu: D {} too wide", D);
  // Blocks for every row (at least one per distinct id up to 2²⁰), whatever this batch's `unique`: the launch is the
  // same for every batch of plan.rows rows (a captured step replays it with the next batch's plan).
  const dim3 grid(unsigned(std::min<int64_t>(plan.rows, 1 << 20)), unsigned(col_blocks));
  embedding_backward_kernel<<<grid, threads, 0, s>>>(plan.packed.as<int32_t>(), plan.ids(), plan.offsets(),
                                                     plan.row_list(), dy, D, dtable);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
