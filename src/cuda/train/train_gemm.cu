#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "cuda/pdl.h"
#include "cuda/train/fused_gemm.h"
#include "cuda/train/train_gemm.h"
#include "cuda/train/train_gemm_algos.h"
#include "cuda/train/train_gemm_profile.h"

namespace mamba3::cuda {

TrainGemm::TrainGemm(Precision precision) : precision_(precision) { set_algo_table(process_gemm_algos()); }

TrainGemm::~TrainGemm() = default;

void TrainGemm::set_algo_table(std::shared_ptr<const GemmAlgoTable> table) {
  lt_ = table ? std::make_unique<LtRunner>(std::move(table)) : nullptr;
}

int64_t TrainGemm::tuned_calls() const { return lt_ ? lt_->calls() : 0; }

namespace {

__global__ void f32_to_bf16_2d_kernel(const float* __restrict__ src, int64_t rows, int64_t cols, int64_t ld,
                                      __nv_bfloat16* __restrict__ dst) {
  pdl_wait();
  const int64_t total = rows * cols;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[i] = __float2bfloat16_rn(src[r * ld + c]);
  }
}

// Packed rows (ld = cols), 16-byte aligned source and 8-byte aligned destination: 4 elements per step, one float4
// load and one 8-byte store, no index division (the 2-D kernel's 64-bit division per element made every product's
// operand rounding cost instructions as well as bytes). The same rounding of each element.
__global__ void f32_to_bf16_packed4_kernel(const float4* __restrict__ src, int64_t quads, uint2* __restrict__ dst) {
  pdl_wait();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < quads; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = src[i];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    dst[i] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
}

}  // namespace

void f32_to_bf16_2d(cudaStream_t s, const float* src, int64_t rows, int64_t cols, int64_t ld, uint16_t* dst) {
  const int64_t total = rows * cols;
  if (total == 0) return;
  const int threads = 256;
  if ((ld == cols || rows == 1) && total % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
    const int64_t quads = total / 4;
    const int64_t blocks = std::min<int64_t>((quads + threads - 1) / threads, 65536);
    launch_train(f32_to_bf16_packed4_kernel, unsigned(blocks), threads, 0, s, reinterpret_cast<const float4*>(src),
                 quads, reinterpret_cast<uint2*>(dst));
    MAMBA3_LAUNCH_CHECK();
    return;
  }
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65536);
  launch_train(f32_to_bf16_2d_kernel, unsigned(blocks), threads, 0, s, src, rows, cols, ld,
               reinterpret_cast<__nv_bfloat16*>(dst));
  MAMBA3_LAUNCH_CHECK();
}

void TrainGemm::run(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  MAMBA3_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "TrainGemm: sizes {}×{}×{} exceed cuBLAS's int",
               m, n, k);
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major X with stride ld is the
  // column-major Xᵀ with the same ld: so B goes first, with B's own transpose flag.
  const cublasOperation_t opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (precision_ == Precision::F32) {
    MAMBA3_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), opb, opa, int(n), int(m), int(k), &alpha, B, CUDA_R_32F, int(ldb),
                                     A, CUDA_R_32F, int(lda), &beta, C, CUDA_R_32F, int(ldc),
                                     CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
    return;
  }
  // Stored shapes of A and B (rows × cols of the row-major storage), packed into bf16 scratch.
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
  const bool held = A == held_ && a_rows == held_rows_ && a_cols == held_cols_ && lda == held_ld_;
  if (!held) {
    a16_.reserve(size_t(a_rows * a_cols) * 2);
    f32_to_bf16_2d(ctx.stream(), A, a_rows, a_cols, lda, a16_.as<uint16_t>());
  }
  b16_.reserve(size_t(b_rows * b_cols) * 2);
  f32_to_bf16_2d(ctx.stream(), B, b_rows, b_cols, ldb, b16_.as<uint16_t>());
  run_bf16(ctx, ta, tb, m, n, k, alpha, held ? held_bits_ : a16_.as<uint16_t>(),
           std::max<int64_t>(a_cols, 1), b16_.as<uint16_t>(), std::max<int64_t>(b_cols, 1), beta, C, ldc);
}

void TrainGemm::run_mixed(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                          const float* A, const uint16_t* A16, int64_t lda, const float* B, const uint16_t* B16,
                          int64_t ldb, float beta, float* C, int64_t ldc) {
  if (precision_ == Precision::F32) {
    MAMBA3_CHECK(A && B, "TrainGemm::run_mixed: the f32 mode needs the f32 operands");
    run(ctx, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (m == 0 || n == 0) return;
  rounded_operands(ctx, ta, tb, m, n, k, A, A16, lda, B, B16, ldb);
  run_bf16(ctx, ta, tb, m, n, k, alpha, A16, lda, B16, ldb, beta, C, ldc);
}

void TrainGemm::run_mixed_bf16_out(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                                   const float* A, const uint16_t* A16, int64_t lda, const float* B,
                                   const uint16_t* B16, int64_t ldb, uint16_t* C, int64_t ldc) {
  MAMBA3_CHECK(precision_ == Precision::BF16, "TrainGemm::run_mixed_bf16_out is for the bf16 mode");
  if (m == 0 || n == 0) return;
  rounded_operands(ctx, ta, tb, m, n, k, A, A16, lda, B, B16, ldb);
  run_bf16_out(ctx, ta, tb, m, n, k, alpha, A16, lda, B16, ldb, C, ldc);
}

void TrainGemm::rounded_operands(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                                 const float* A, const uint16_t*& A16, int64_t& lda, const float* B,
                                 const uint16_t*& B16, int64_t& ldb) {
  const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
  if (!A16) {
    if (A == held_ && a_rows == held_rows_ && a_cols == held_cols_ && lda == held_ld_) {
      A16 = held_bits_;
    } else {
      a16_.reserve(size_t(a_rows * a_cols) * 2);
      f32_to_bf16_2d(ctx.stream(), A, a_rows, a_cols, lda, a16_.as<uint16_t>());
      A16 = a16_.as<uint16_t>();
    }
    lda = std::max<int64_t>(a_cols, 1);
  }
  if (!B16) {
    b16_.reserve(size_t(b_rows * b_cols) * 2);
    f32_to_bf16_2d(ctx.stream(), B, b_rows, b_cols, ldb, b16_.as<uint16_t>());
    B16 = b16_.as<uint16_t>();
    ldb = std::max<int64_t>(b_cols, 1);
  }
}

TrainGemm::HeldA::HeldA(TrainGemm& gemm, const Context& ctx, const float* A, int64_t rows, int64_t cols, int64_t lda)
    : gemm_(gemm) {
  gemm.held_ = nullptr;
  if (gemm.precision_ != Precision::BF16 || rows * cols == 0) return;
  gemm.held16_.reserve(size_t(rows * cols) * 2);
  f32_to_bf16_2d(ctx.stream(), A, rows, cols, lda, gemm.held16_.as<uint16_t>());
  gemm.held_ = A, gemm.held_bits_ = gemm.held16_.as<uint16_t>();
  gemm.held_rows_ = rows, gemm.held_cols_ = cols, gemm.held_ld_ = lda;
}

TrainGemm::HeldA::HeldA(TrainGemm& gemm, const Context& ctx, const float* A, const uint16_t* A16, int64_t rows,
                        int64_t cols, int64_t lda)
    : HeldA(gemm, ctx, A16 ? nullptr : A, rows, A16 ? 0 : cols, lda) {
  if (!A16 || gemm.precision_ != Precision::BF16 || rows * cols == 0) return;
  gemm.held_ = A, gemm.held_bits_ = A16;
  gemm.held_rows_ = rows, gemm.held_cols_ = cols, gemm.held_ld_ = lda;
}

void TrainGemm::run_bf16(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                         const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
                         int64_t ldc) {
  if (m == 0 || n == 0) return;
  MAMBA3_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && lda <= INT32_MAX && ldb <= INT32_MAX,
               "TrainGemm: sizes {}×{}×{} exceed cuBLAS's int", m, n, k);
  const cublasOperation_t opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  const GemmCall call{ta, tb, false, beta != 0.0f, m, n, k, lda, ldb, ldc};
  const bool profiled = gemm_profile::recording();
  if (profiled) gemm_profile::before(ctx.stream());
  if (!lt_ || !lt_->run(ctx, call, alpha, beta, A, B, C))
    MAMBA3_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), opb, opa, int(n), int(m), int(k), &alpha, B, CUDA_R_16BF, int(ldb),
                                     A, CUDA_R_16BF, int(lda), &beta, C, CUDA_R_32F, int(ldc), CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT));
  if (profiled) gemm_profile::after(ctx.stream(), call);
}

void TrainGemm::run_bf16_out(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                             const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, uint16_t* C,
                             int64_t ldc) {
  if (m == 0 || n == 0) return;
  MAMBA3_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX && lda <= INT32_MAX && ldb <= INT32_MAX &&
                   ldc <= INT32_MAX,
               "TrainGemm: sizes {}×{}×{} exceed cuBLAS's int", m, n, k);
  // The same column-major swap as run; only C's type differs (f32 accumulation, rounded to bf16 on the way out).
  const cublasOperation_t opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  const float beta = 0.0f;
  const GemmCall call{ta, tb, true, false, m, n, k, lda, ldb, ldc};
  const bool profiled = gemm_profile::recording();
  if (profiled) gemm_profile::before(ctx.stream());
  // (MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1: C = A·Bᵀ on the fused products' TMA + wgmma kernel, where its shapes fit)
  if (!ta && tb && alpha == 1.0f && fused_gemm_plain_enabled() &&
      fused_gemm_plain_supported(A, lda, B, ldb, n, k, C, ldc))
    fused_gemm_plain(ctx.stream(), A, lda, B, ldb, m, n, k, C, ldc);
  else if (!lt_ || !lt_->run(ctx, call, alpha, beta, A, B, C))
    MAMBA3_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), opb, opa, int(n), int(m), int(k), &alpha, B, CUDA_R_16BF, int(ldb),
                                     A, CUDA_R_16BF, int(lda), &beta, C, CUDA_R_16BF, int(ldc), CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT));
  if (profiled) gemm_profile::after(ctx.stream(), call);
}

}  // namespace mamba3::cuda
