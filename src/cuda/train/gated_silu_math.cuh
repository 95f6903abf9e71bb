#pragma once
// The GatedMLP activation's f32 expressions in training, shared by the element-wise kernels
// (gated_mlp_train_gpu.cu) and the fused products' epilogues (fused_gemm.cu), so that both give the same bits.
// σ(g) = 1/(1 + e^−g) and silu(g) = g·σ(g) with the CPU's formula (ops/mamba3_common.h).
namespace mamba3::cuda::gated_silu {

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + expf(-g)); }

// o = a ⊙ silu(g).
__device__ __forceinline__ float forward(float a, float g) { return a * (g * sigmoid_f(g)); }

// [da, dg] = [do·silu(g), do·a·σ(g)·(1 + g·(1 − σ(g)))].
__device__ __forceinline__ void backward(float d_o, float a, float g, float& da, float& dg) {
  const float sg = sigmoid_f(g);
  da = d_o * g * sg;
  dg = d_o * a * sg * (1.0f + g * (1.0f - sg));
}

}  // namespace mamba3::cuda::gated_silu
