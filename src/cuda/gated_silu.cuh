#pragma once
// The GatedMLP activation of one (value, gate) pair, y · silu(g): one expression shared by the activation kernel
// (basic_kernels.cu) and the matrix-vector kernel's fused epilogue (gemv_small_m.cu), so both give the same bits.
namespace mamba3::cuda {

__device__ __forceinline__ float gated_silu_value(float y, float g) { return y * (g / (1.0f + expf(-g))); }

}  // namespace mamba3::cuda
