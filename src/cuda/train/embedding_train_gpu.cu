#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "cuda/pdl.h"
#include "cuda/train/block_reduce.cuh"
#include "cuda/train/embedding_train_gpu.h"

namespace mamba3::cuda {
namespace {

// Block (u, c): distinct id u, columns [c·blockDim, (c+1)·blockDim). Each thread walks the id's rows in order.
// Cost: reads rows·D floats of dy and unique·D of the table, writes unique·D.
__global__ void embedding_backward_kernel(const int32_t* ids, const int32_t* offsets, const int32_t* row_list,
                                          int64_t unique, const float* dy, int64_t D, float* dtable) {
  pdl_wait();
  const int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  for (int64_t u = blockIdx.x; u < unique; u += gridDim.x) {
    float* t = dtable + int64_t(ids[u]) * D + j;
    float acc = *t;
    for (int32_t k = offsets[u]; k < offsets[u + 1]; ++k) acc += dy[int64_t(row_list[k]) * D + j];
    *t = acc;
  }
}

// The same sums with a warp per distinct id where rows are whole float4s (D % 4 == 0, 16-byte aligned): lanes take
// float4 columns, and per pass the table's value and the id's first kRowsAhead rows are requested together before
// the adds (still in row order: the same bits). The block-per-id form waited on a chain of dependent loads per id
// (ids, offsets, rows, then dy) with 24 warps per block: 83 µs at the 125M step's 16k rows, ~10 µs of bytes.
constexpr int kRowsAhead = 4;
__device__ __forceinline__ void add4(float4& a, const float4& b) { a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w; }
__global__ void embedding_backward_vec4_kernel(const int32_t* ids, const int32_t* offsets, const int32_t* row_list,
                                               int64_t unique, const float4* dy, int64_t D4, float4* dtable) {
  pdl_wait();
  const int lane = int(threadIdx.x % 32);
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t u = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; u < unique; u += warps) {
    const int32_t k0 = offsets[u], k1 = offsets[u + 1];
    float4* t = dtable + int64_t(ids[u]) * D4;
    int32_t rows[kRowsAhead];
#pragma unroll
    for (int r = 0; r < kRowsAhead; ++r) rows[r] = k0 + r < k1 ? row_list[k0 + r] : 0;
    for (int64_t c = lane; c < D4; c += 32) {
      float4 acc = t[c], w[kRowsAhead];
#pragma unroll
      for (int r = 0; r < kRowsAhead; ++r)
        w[r] = k0 + r < k1 ? dy[int64_t(rows[r]) * D4 + c] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int r = 0; r < kRowsAhead; ++r)
        if (k0 + r < k1) add4(acc, w[r]);
      for (int32_t k = k0 + kRowsAhead; k < k1; ++k) add4(acc, dy[int64_t(row_list[k]) * D4 + c]);
      t[c] = acc;
    }
  }
}

}  // namespace

void EmbeddingGradPlan::rebuild(cudaStream_t s, const int32_t* host_ids, int64_t n) {
  MAMBA3_CHECK(n >= 0 && n < INT32_MAX / 2, "EmbeddingGradPlan: {} rows (at most (2³¹ − 1) / 2)", n);
  // A counting sort by id, rows ascending within an id (which fixes the summation order): O(rows + largest id), tens
  // of µs at 16k tokens where the comparison sort took ~1 ms of host time.
  int32_t top = -1;
  for (int64_t k = 0; k < n; ++k) {
    MAMBA3_CHECK(host_ids[k] >= 0, "EmbeddingGradPlan: token id {} at row {} is negative", host_ids[k], k);
    top = std::max(top, host_ids[k]);
  }
  counts_.assign(size_t(top) + 1, 0);
  for (int64_t k = 0; k < n; ++k) ++counts_[size_t(host_ids[k])];
  int64_t u = 0;
  for (const int32_t cnt : counts_) u += cnt > 0;
  rows = n;
  unique = u;
  const size_t bytes = size_t(2 * u + 1 + n) * sizeof(int32_t);
  host_packed.reserve(bytes);
  int32_t *ids = host_packed.as<int32_t>(), *offsets = ids + u, *row_list = offsets + u + 1;
  int64_t j = 0, start = 0;
  for (int32_t id = 0; id <= top; ++id) {  // counts_ become each id's next slot in row_list
    const int32_t cnt = counts_[size_t(id)];
    if (cnt == 0) continue;
    ids[j] = id;
    offsets[j++] = int32_t(start);
    counts_[size_t(id)] = int32_t(start);
    start += cnt;
  }
  offsets[u] = int32_t(n);
  for (int64_t k = 0; k < n; ++k) row_list[counts_[size_t(host_ids[k])]++] = int32_t(k);
  if (bytes > packed.bytes()) {
    MAMBA3_CUDA_CHECK(cudaStreamSynchronize(s));  // kernels may still read the buffer about to be freed
    packed.resize(bytes);
  }
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(packed.raw(), host_packed.raw(), bytes, cudaMemcpyHostToDevice, s));
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
  if (D % 4 == 0 && train_detail::aligned16(dy) && train_detail::aligned16(dtable)) {
    constexpr int kThreads = 256;
    const int64_t blocks = std::min<int64_t>((plan.unique + kThreads / 32 - 1) / (kThreads / 32), 1 << 20);
    launch_train(embedding_backward_vec4_kernel, unsigned(blocks), kThreads, 0, s, plan.ids(), plan.offsets(),
                 plan.row_list(), plan.unique, reinterpret_cast<const float4*>(dy), D / 4,
                 reinterpret_cast<float4*>(dtable));
    MAMBA3_LAUNCH_CHECK();
    return;
  }
  const int threads = train_detail::threads_for(D);
  const int64_t col_blocks = (D + threads - 1) / threads;
  MAMBA3_CHECK(col_blocks <= 65535, "embedding_backward_gpu: D {} too wide", D);
  const dim3 grid(unsigned(std::min<int64_t>(plan.unique, 1 << 20)), unsigned(col_blocks));
  launch_train(embedding_backward_kernel, grid, threads, 0, s, plan.ids(), plan.offsets(), plan.row_list(), plan.unique,
               dy, D, dtable);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda
