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
  // One int32 upload: ids (unique, ascending) | offsets (unique + 1) into row_list | row_list (rows).
  DeviceBuffer packed;
  PinnedBuffer host_packed;  // the host side of `packed` (the upload's source; page-locked, so the copy is async)

  // From the batch's token ids on the host (each ≥ 0; rows < 2³⁰). Uploads and waits for the copy, so the plan is
  // ready for any stream once it returns.
  static EmbeddingGradPlan build(const int32_t* host_ids, int64_t rows);
  // The same into this plan, without a host wait: the upload is ordered on `s` (after the kernels that read the
  // previous plan), and the device buffer only grows — the cheap way to keep one plan per training workspace.
  // The host must not rebuild it again before that copy has run (a training step waits for its loss at its end).
  void rebuild(cudaStream_t s, const int32_t* host_ids, int64_t rows);

  const int32_t* ids() const { return packed.as<int32_t>(); }
  const int32_t* offsets() const { return ids() + unique; }
  const int32_t* row_list() const { return offsets() + unique + 1; }

 private:
  std::vector<int32_t> counts_;  // rebuild's counting sort, per id
};

// dy (plan.rows, D) f32; dtable (V, D) f32 is added to (V > every id of the plan).
void embedding_backward_gpu(cudaStream_t s, const EmbeddingGradPlan& plan, const float* dy, int64_t D,
                            float* dtable);

}  // namespace mamba3::cuda
