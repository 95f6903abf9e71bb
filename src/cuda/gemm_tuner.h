#pragma once
// Per-shape autotuned bf16 matrix products: y (M, N) f32 = x (M, K) · Wᵀ with f32 accumulation, through the
// cuBLASLt algorithm that was fastest when the shape was first seen. cuBLAS's own heuristic picks narrow tiles
// without split-K for decode-sized M (H200, 1.5B b128: out_proj/fc2 N 2048 K 4096 at 11.5 µs against a 4 µs memory
// floor), so on its first call a shape times the heuristic's candidates and split-K variants of the best of them
// against cublasGemmEx's default and keeps the winner. Opt-in (MAMBA3_GEMM_TUNE=1; 0 by default): on an H200 it won
// 3–13 % per product in isolation (cold L2) but ≤ 1 % of a whole decode step or prefill (1.5B b128: decode 5.179 vs
// 5.187 ms, prefill 512 92.1–93.0k vs 91.8–91.9k tokens/s), while each new shape costs 10–40 ms of timing and the
// winner may differ between processes. MAMBA3_GEMM_TUNE_LOG=1 prints each shape's default and winning times.
#include <cublasLt.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "cuda/cuda_check.h"

namespace mamba3::cuda {

class Context;

// One product: W (N, K) bf16 with packed rows; x (M, K) bf16, rows ldx elements apart; y (M, N) f32, rows ldy apart.
struct GemmShape {
  int64_t n = 0, k = 0, m = 0, ldx = 0, ldy = 0;
};

// MAMBA3_GEMM_TUNE (0 default | 1), read once.
bool gemm_tune_enabled();

// y = x · Wᵀ (beta = 0: y's previous contents are never read; columns N..ldy of each row are left untouched) through
// ctx's tuner when tuning is on, else cublasGemmEx's default algorithm.
void gemm_bf16(const Context& ctx, const void* w, const void* x, float* y, const GemmShape& s);

// The plan cache of one Context (its stream, handles and cuBLAS workspace). A shape's first call outside a graph
// capture times the candidates on the stream (synchronizing it; ≲ 20 ms of GPU time per shape), writing into y
// (beta = 0, and the winner recomputes y last, so the caller sees only the winner's result). A first call during a
// capture cannot time anything: it runs cublasGemmEx's default and pins the shape to it, so the captured graph and
// later eager calls keep computing bit-identical results. Not thread-safe (one per Context, like the stream).
class GemmTuner {
 public:
  GemmTuner(cudaStream_t stream, cublasHandle_t cublas, cublasLtHandle_t lt, void* workspace, size_t workspace_bytes,
            size_t l2_bytes);
  ~GemmTuner();
  GemmTuner(const GemmTuner&) = delete;
  GemmTuner& operator=(const GemmTuner&) = delete;

  // y = x · Wᵀ with the shape's plan, tuning it first if it has none (see above).
  void matmul(const void* w, const void* x, float* y, const GemmShape& s);

  // What a call with this shape and these pointers' alignment runs now.
  enum class Choice {
    Untuned,  // never called
    Default,  // cublasGemmEx's default: tuning found nothing faster, or the first call came during a capture
    Tuned,    // a cuBLASLt algorithm chosen by timing
  };
  Choice choice(const void* w, const void* x, const float* y, const GemmShape& s) const;
  int64_t tunings() const { return tunings_; }  // shapes timed so far

 private:
  // The shape plus the operands' alignment class (an algorithm chosen for aligned pointers may not run on others).
  struct Key {
    int64_t n, k, m, ldx, ldy;
    uint32_t align_w, align_x, align_y;
    bool operator<(const Key& o) const {
      return std::tie(n, k, m, ldx, ldy, align_w, align_x, align_y) <
             std::tie(o.n, o.k, o.m, o.ldx, o.ldy, o.align_w, o.align_x, o.align_y);
    }
  };
  struct Plan;

  static Key key_of(const void* w, const void* x, const float* y, const GemmShape& s);
  std::unique_ptr<Plan> tune(const Key& key, const void* w, const void* x, float* y, const GemmShape& s);
  void run(const Plan& plan, const void* w, const void* x, float* y, const GemmShape& s) const;

  cudaStream_t stream_;
  cublasHandle_t cublas_;
  cublasLtHandle_t lt_;
  void* workspace_;
  size_t workspace_bytes_, l2_bytes_;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  int64_t tunings_ = 0;
};

}  // namespace mamba3::cuda
