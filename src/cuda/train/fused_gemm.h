#pragma once
// bf16 training products on Hopper's TMA and wgmma with element-wise work in their epilogues (train/fused_gemm.cu,
// compiled for sm_90a only): the GatedMLP's activation and its backward, which otherwise run as separate kernels
// over the fc1 output (reading and writing ≈ 15 bytes per d_ff column and row, at the memory's speed) because
// cuBLASLt has no gated epilogue.
//
// Every product is D = A·Bᵀ with A (M, K) and B (Nb, K) bf16, both rows K-contiguous (16-byte aligned rows, K a
// multiple of 8), f32 accumulation, one block per SM (persistent): a producer warpgroup issuing the operands' bulk
// tensor copies into a ring of stages, two consumer warpgroups — cooperative (both on one 128 × 256 tile) or
// ping-pong (each on its own 128 × 128 tile, one's epilogue under the other's products).
#include <cuda_runtime.h>

#include <cstdint>

namespace mamba3::cuda {

// Whether the device can run these products (compute capability 9.0).
bool fused_gemm_device_supported();
// Whether the GatedMLP takes them: a supported device and MAMBA3_TRAIN_FUSED_GEMM (read once; "1" | "0", default
// kFusedGemmDefault). The callers fall back to cuBLAS and the element-wise kernels otherwise.
bool fused_gemm_enabled();
// Whether TrainGemm's bf16-result products of the form A·Bᵀ (the forward projections: in_proj, out_proj, fc1 and fc2
// outside the gated form, the lm_head's logits) take fused_gemm_plain instead of cuBLAS: a supported device and
// MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1 (read once; off by default: for measurement against cuBLAS).
bool fused_gemm_plain_enabled();

// kMulticast: the cooperative tiles in clusters of two blocks along M that share B's boxes (each block copies one into
// both blocks' shared memory), a third less traffic out of L2 per block.
enum class FusedGemmSchedule { kDefault, kCooperative, kPingPong, kMulticast };
// The schedule kDefault stands for: MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE (read once; "cooperative" | "pingpong" |
// "multicast", default cooperative).
FusedGemmSchedule fused_gemm_default_schedule();

// The shapes the kernels take: 16-byte aligned matrices with rows a multiple of 8 elements apart, K ≥ 1, K % 8 == 0.
// The gated forms need d_ff % 128 == 0 (forward) or % 256 == 0 (backward); the plain form N % 8 == 0.
bool fused_gemm_plain_supported(const void* A, int64_t lda, const void* B, int64_t ldb, int64_t N, int64_t K,
                                const void* D, int64_t ldd);
bool fused_gemm_gated_forward_supported(const void* x, int64_t ldx, const void* w1, int64_t K, int64_t d_ff,
                                        const void* h, const void* o);
bool fused_gemm_gated_backward_supported(const void* dy, int64_t ldy, const void* w2t, int64_t K, int64_t d_ff,
                                         const void* h, const void* dh);

// D (M, N) bf16 = A·Bᵀ rounded once (B (N, K)). For tests and measurement against cuBLAS.
void fused_gemm_plain(cudaStream_t s, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t M,
                      int64_t N, int64_t K, uint16_t* D, int64_t ldd,
                      FusedGemmSchedule schedule = FusedGemmSchedule::kDefault);

// For measurement only: the plain product's mainloop with nothing stored (N a multiple of 256).
void fused_gemm_mainloop_only(cudaStream_t s, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t M,
                              int64_t N, int64_t K, FusedGemmSchedule schedule = FusedGemmSchedule::kDefault);
// The two-block clusters the multicast schedule launches (the device's most at once for the kernel, or
// MAMBA3_TRAIN_FUSED_GEMM_CLUSTERS where set: for measurement).
int fused_gemm_multicast_clusters();

// fc1 with the activation: h (M, 2·d_ff) bf16 = x·w1ᵀ rounded once, [a, g] = h's halves, and o (M, d_ff) bf16 =
// a ⊙ silu(g) from those rounded values (gated_silu_forward_gpu's expression: the same bits as the product followed
// by that kernel, up to the product's summation order). x (M, K) rows ldx apart, w1 (2·d_ff, K).
void fused_gemm_gated_forward(cudaStream_t s, const uint16_t* x, int64_t ldx, const uint16_t* w1, int64_t M, int64_t K,
                              int64_t d_ff, uint16_t* h, uint16_t* o,
                              FusedGemmSchedule schedule = FusedGemmSchedule::kDefault);

// The activation's backward in the do product: do = dy·w2 rounded once to bf16 (w2t = w2ᵀ, (d_ff, K) with K = D),
// then dh (M, 2·d_ff) bf16 = [da, dg] from do and h's [a, g] (gated_silu_backward_bf16_gpu's expressions).
void fused_gemm_gated_backward(cudaStream_t s, const uint16_t* dy, int64_t ldy, const uint16_t* w2t, int64_t M,
                               int64_t K, int64_t d_ff, const uint16_t* h, uint16_t* dh,
                               FusedGemmSchedule schedule = FusedGemmSchedule::kDefault);

}  // namespace mamba3::cuda
