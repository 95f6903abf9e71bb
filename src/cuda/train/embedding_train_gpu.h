#pragma once
// Backward of the embedding gather (out[r] = table[ids[r]]): dtable[id] += Σ_{r: ids[r] = id} dy[r], deterministic.
// Tokens repeat, so a plain scatter would need float atomics (order-dependent sums). Instead the host groups the rows
// by id once per batch (it has the ids anyway; a counting sort): a CSR of the rows of each distinct id, ids
// ascending, rows ascending.
// The kernel adds each id's rows into its table row in ascending row order — exactly the sequential CPU scatter-add.
#include <cstdint>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/device_buffer.h"
#include "cuda/pinned_buffer.h"

namespace mamba3::cuda {

struct EmbeddingGradPlan {
  int64_t rows = 0;    // rows of dy
  int64_t unique = 0;  // distinct ids
  // One int32 upload at fixed offsets for a given number of rows (so that a captured graph's copy and kernel stay
  // valid from batch to batch): unique | ids (ascending; `rows` slots, the first `unique` used) | offsets into
  // row_list (rows + 1 slots, the first unique + 1 used) | row_list (rows). The kernel reads `unique` from the device.
  DeviceBuffer packed;
  PinnedBuffer host_packed;  // the host side of `packed` (the upload's source)

  // From the batch's token ids on the host (each ≥ 0; rows < 2³¹). Uploads and waits for the copy, so the plan is
  // ready for any stream once it returns.
  static EmbeddingGradPlan build(const int32_t* host_ids, int64_t rows);
  // prepare() then upload(s): the host sort into host_packed, then the copy ordered on `s` (after the kernels that
  // read the previous plan; the device buffer only grows) — the cheap way to keep one plan per training workspace.
  // The host buffer must not be prepared again before the copy has run (a training step waits for its loss).
  void rebuild(cudaStream_t s, const int32_t* host_ids, int64_t rows);
  void prepare(const int32_t* host_ids, int64_t rows);
  void upload(cudaStream_t s);

  const int32_t* ids() const { return packed.as<int32_t>() + 1; }
  const int32_t* offsets() const { return ids() + rows; }
  const int32_t* row_list() const { return offsets() + rows + 1; }
  size_t packed_ints() const { return size_t(3 * rows + 2); }

 private:
  std::vector<int32_t> counts_;  // prepare's counting sort, per id
};

// dy (plan.rows, D) f32; dtable (V, D) f32 is added to (V > every id of the plan).
void embedding_backward_gpu(cudaStream_t s, const EmbeddingGradPlan& plan, const float* dy, int64_t D,
                            float* dtable);

}  // namespace mamba3::cuda
