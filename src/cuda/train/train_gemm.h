#pragma once
// Matrix products of GPU training, row-major like the CPU code they mirror: C = α·op(A)·op(B) + β·C with every
// operand f32 in memory (master weights, activations and gradients are f32).
//   Precision::F32  — cuBLAS in pedantic f32 (no TF32): the exact mode, compared against the CPU in tests.
//   Precision::BF16 — mixed precision: A and B are rounded to bf16 (nearest even) into scratch first, the product
//                     runs on tensor cores with f32 accumulation and writes f32 (the official training convention).
#include <cstdint>
#include <memory>

#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"

namespace mamba3::cuda {

class GemmAlgoTable;
class LtRunner;

// One per stream of work: owns the bf16 scratch (grow-only). Calls are ordered on ctx's stream, so reusing the
// scratch from one call to the next is safe.
class TrainGemm {
 public:
  // Takes the process's GEMM algorithm table (process_gemm_algos(): MAMBA3_TRAIN_GEMM_ALGOS) when there is one.
  explicit TrainGemm(Precision precision = Precision::F32);
  ~TrainGemm();
  TrainGemm(const TrainGemm&) = delete;
  TrainGemm& operator=(const TrainGemm&) = delete;
  Precision precision() const { return precision_; }
  void set_precision(Precision p) { precision_ = p; }
  // The bf16 products whose shapes the table holds run through cuBLASLt with its algorithms (train_gemm_algos.h);
  // null: cublasGemmEx's default for every shape. The f32 mode never uses it.
  void set_algo_table(std::shared_ptr<const GemmAlgoTable> table);
  // bf16 products run with a table's algorithm so far (tests).
  int64_t tuned_calls() const;

  // op(A) is (m × k): A is stored (m × k) with row stride lda, or (k × m) when ta. op(B) is (k × n): B is (k × n)
  // with stride ldb, or (n × k) when tb. C (m × n), stride ldc. β = 0 overwrites C (which may hold NaN).
  void run(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
  // The bf16 mode's product on operands already rounded to bf16 (f32_to_bf16_2d), with the same shapes and flags as
  // run: for callers that reuse a converted operand across products (the lm_head's weight over its row blocks). run
  // in the bf16 mode is this after converting both operands, so the two give the same bits.
  void run_bf16(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* A,
                int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc);
  // run_bf16 with a bf16 result: C (m × n, stride ldc, bf16 bits) = α·op(A)·op(B), accumulated in f32 and rounded
  // once (β is 0: C is overwritten). For products whose only consumer reads bf16 anyway — the lm_head's logits, which
  // the softmax upcasts and overwrites with their bf16 gradient, as under PyTorch autocast: half the bytes of f32.
  void run_bf16_out(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                    const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, uint16_t* C, int64_t ldc);

  // The bf16 mode's product where either operand may come already rounded (A16 / B16, bf16 bits with the stored
  // shape of A / B and row stride lda / ldb; null: round the f32 A / B as run does): for producers that write the
  // bf16 operand themselves, and for the weights' bf16 mirror (GpuParamStore). The same bits as run on the f32
  // values. In Precision::F32 the bf16 copies are ignored and this is run on A and B (which must then be given), so
  // callers pass their copies whatever the mode.
  void run_mixed(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
                 const uint16_t* A16, int64_t lda, const float* B, const uint16_t* B16, int64_t ldb, float beta,
                 float* C, int64_t ldc);
  // run_mixed with a bf16 result (run_bf16_out: β = 0, rounded once); the bf16 mode only.
  void run_mixed_bf16_out(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                          const float* A, const uint16_t* A16, int64_t lda, const float* B, const uint16_t* B16,
                          int64_t ldb, uint16_t* C, int64_t ldc);

  // While a HeldA lives, run() takes its bf16 rounding of A (stored rows × cols, row stride lda) for every product
  // whose A has this pointer and stored shape, instead of rounding A again: for the two products that read one
  // gradient (dx = dy·W and dW += dyᵀ·x). A must not change meanwhile. Nothing is held in the f32 mode.
  class HeldA {
   public:
    HeldA(TrainGemm& gemm, const Context& ctx, const float* A, int64_t rows, int64_t cols, int64_t lda);
    // With A16 (rows × cols bf16 bits, packed: A's rounding written by A's producer) held instead of rounding A;
    // null A16: the constructor above.
    HeldA(TrainGemm& gemm, const Context& ctx, const float* A, const uint16_t* A16, int64_t rows, int64_t cols,
          int64_t lda);
    ~HeldA() { gemm_.held_ = nullptr; }
    HeldA(const HeldA&) = delete;
    HeldA& operator=(const HeldA&) = delete;

   private:
    TrainGemm& gemm_;
  };

 private:
  // The bf16 operands of a mixed product: A16 / B16 where given, else the held A or A / B rounded into scratch (their
  // strides then the packed ones).
  void rounded_operands(const Context& ctx, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* A,
                        const uint16_t*& A16, int64_t& lda, const float* B, const uint16_t*& B16, int64_t& ldb);
  Precision precision_;
  std::unique_ptr<LtRunner> lt_;  // null: no table
  DeviceBuffer a16_, b16_, held16_;
  const float* held_ = nullptr;  // the HeldA's operand (null: none)
  const uint16_t* held_bits_ = nullptr;  // its rounding: held16_ or the producer's copy
  int64_t held_rows_ = 0, held_cols_ = 0, held_ld_ = 0;
};

// dst (rows × cols, packed, bf16 bits) = src (rows × cols, row stride ld) rounded to nearest even.
void f32_to_bf16_2d(cudaStream_t s, const float* src, int64_t rows, int64_t cols, int64_t ld, uint16_t* dst);

}  // namespace mamba3::cuda
