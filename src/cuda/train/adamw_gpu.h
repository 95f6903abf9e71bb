#pragma once
// AdamW on flat f32 device buffers, the update of train/optimizer.cpp element for element (float64 inside, the
// moments and weights stored f32), with the pieces of its gradient handling: the global-norm reduction for
// clipping, scaling, and accumulation across micro-batches.
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/device_buffer.h"

namespace mamba3::cuda {

// One optimizer step for one tensor. weight_decay is the config's decay for tensors where uses_weight_decay(name)
// holds, 0 otherwise; t ≥ 1 is the step count after the increment (for the bias corrections).
struct AdamWStepParams {
  double lr = 0;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0;
  int64_t t = 1;
};

// Grow-only partial sums of sum_of_squares_gpu; reuse one per stream.
struct ReduceScratch {
  DeviceBuffer partial;
};

// Σ g² in float64, deterministic (fixed grid of per-block partials, then one block adding them in a fixed order);
// synchronises the stream to return the value.
double sum_of_squares_gpu(cudaStream_t s, const float* g, int64_t n, ReduceScratch& scratch);

// g ← g·factor (the clipping scale max_norm / (norm + 1e-6)).
void scale_gpu(cudaStream_t s, float* g, int64_t n, float factor);

// sum ← sum + scale·g (gradient accumulation, computed in float64 as accumulate_grads does).
void scaled_add_gpu(cudaStream_t s, float* sum, const float* g, int64_t n, float scale);

//   p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  p ← p − lr·(m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)
void adamw_update_gpu(cudaStream_t s, float* p, const float* g, float* m, float* v, int64_t n,
                      const AdamWStepParams& a);

// The same update over many tensors laid out in one flat buffer (GpuParamStore: each tensor starting on a granule
// boundary, zero gaps), in one launch instead of one per tensor (146 launches at 125M, the small ones latency-bound):
// decay_granules[i / kAdamWGranule] (device, one byte per granule) says whether element i's tensor takes
// a.weight_decay (else none); the gradient is read as g·grad_factor, an f32 product — the bits of scale_gpu(g,
// grad_factor) followed by the plain update, without its pass over the gradients (clipping folded in).
// p16 (optional, n bf16 values): the new weights rounded to bf16 (nearest even) in the same pass, the bits that
// f32_to_bf16_2d gives for p afterwards: GpuParamStore's bf16 mirror, kept current without a pass of its own.
constexpr int64_t kAdamWGranule = 64;  // floats: GpuParamStore's 256-byte tensor alignment
void adamw_update_flat_gpu(cudaStream_t s, float* p, const float* g, float* m, float* v, int64_t n,
                           const uint8_t* decay_granules, const AdamWStepParams& a, float grad_factor = 1.0f,
                           uint16_t* p16 = nullptr);

}  // namespace mamba3::cuda
