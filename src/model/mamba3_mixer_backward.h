#pragma once
// Training backward of the Mamba-3 mixer layer on CPU: gradients of every parameter (by official name) and of the
// input, through the chunked form (ops/mamba3_scan_backward.h). The float64 oracle is ops/mamba3_reference_backward.h.
#include "core/tensor.h"
#include "model/mamba3_mixer.h"

namespace mamba3 {

struct Mamba3MixerGradients {
  TensorMap params;  // F32, one per parameter of the layer, by official name (relative to the layer)
  Tensor u;          // (B, L, d_model)
  Mamba3State init;  // gradient of the initial state (same shapes as the state)
};

// Gradients of sum(mixer.prefill(u, init) ⊙ dout): u, dout (B, L, d_model) F32, L ≥ 1; init null = zero state.
// The final state's upstream gradient is zero. zx_raw (optional): the in_proj output that prefill(u, …, &zx_raw)
// kept, (B·L, d_in) F32 — the same bits the backward would compute, so it skips that product.
Mamba3MixerGradients mamba3_mixer_backward(const Mamba3Mixer& mixer, const Tensor& u, const Tensor& dout,
                                           const Mamba3State* init = nullptr, const Tensor* zx_raw = nullptr);

}  // namespace mamba3
