#pragma once
// Persisted cuBLASLt algorithm choices for the bf16 training products (a tuning cache with a fixed answer).
// cublasGemmEx's default algorithm loses 15–22 % to one of cuBLASLt's ranked candidates on some 125M product shapes
// (H200, MAMBA3_TRAIN_PROFILE=gemm), but choosing by timing in every process would change the results from run to
// run. A table fixes the choice: `mamba3 bench --device cuda --train --tune-gemm FILE` times the candidates once and
// writes the winners; with MAMBA3_TRAIN_GEMM_ALGOS=FILE every TrainGemm runs those shapes with those algorithms (the
// same bits in every run with the same file, device and cuBLAS), other shapes with cublasGemmEx's default.
// A cublasLtMatmulAlgo_t may be stored as bytes and reused with the same cuBLAS version (cuBLASLt's documentation),
// so the file records the device name and the cuBLASLt version and refuses to load elsewhere.
#include <cublasLt.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/device_buffer.h"
#include "cuda/train/train_gemm_profile.h"

namespace mamba3::cuda {

class Context;

// A product's identity for the table: flags, sizes and strides.
using GemmKey = std::tuple<bool, bool, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
inline GemmKey gemm_key(const GemmCall& c) {
  return {c.ta, c.tb, c.bf16_out, c.accumulate, c.m, c.n, c.k, c.lda, c.ldb, c.ldc};
}

struct TunedAlgo {
  cublasLtMatmulAlgo_t algo{};
  double default_us = 0, tuned_us = 0;  // what the tuning measured (for the reader of the file)
};

class GemmAlgoTable {
 public:
  // Empty, for this process's device and cuBLASLt version.
  GemmAlgoTable();
  // Reads a file written by save(); throws Error naming the file and the field when it is missing, malformed, or for
  // another device or cuBLASLt version.
  static GemmAlgoTable load(const std::string& path);
  // Writes atomically (temporary file, then rename).
  void save(const std::string& path) const;

  const TunedAlgo* find(const GemmCall& c) const;
  void set(const GemmCall& c, const TunedAlgo& a) { entries_[gemm_key(c)] = {c, a}; }
  size_t size() const { return entries_.size(); }
  const std::string& source() const { return source_; }  // the file it came from ("" when built in memory)

 private:
  std::string device_, source_;
  size_t version_ = 0;
  std::map<GemmKey, std::pair<GemmCall, TunedAlgo>> entries_;
};

// The table new TrainGemms take: the file MAMBA3_TRAIN_GEMM_ALGOS names (loaded on first use; an unreadable file is
// an Error), or the one last given to set_process_gemm_algos; null when neither.
std::shared_ptr<const GemmAlgoTable> process_gemm_algos();
void set_process_gemm_algos(std::shared_ptr<const GemmAlgoTable> table);

// The operand alignment (bytes) the stored algorithms are chosen for; products whose A, B or C is not this aligned
// run on cublasGemmEx's default.
constexpr unsigned kLtAlignment = 16;

// cuBLASLt's first `count` ranked algorithms for a product in TrainGemm's convention (bf16 operands, f32 accumulation,
// f32 or bf16 C), with a workspace of up to `workspace_bytes`, for operands aligned to kLtAlignment bytes.
std::vector<cublasLtMatmulAlgo_t> lt_candidates(cublasLtHandle_t lt, const GemmCall& c, int count,
                                                size_t workspace_bytes);

// Runs a table's products through cuBLASLt: each shape's descriptors made once and its algorithm checked once (one
// that cuBLASLt refuses here is an Error naming the shape and the table's file), the workspace grown to the largest
// need. One per TrainGemm (the same stream ordering rules).
class LtRunner {
 public:
  explicit LtRunner(std::shared_ptr<const GemmAlgoTable> table);
  ~LtRunner();
  LtRunner(const LtRunner&) = delete;
  LtRunner& operator=(const LtRunner&) = delete;

  // C = α·op(A)·op(B) + β·C in TrainGemm's row-major convention (A, B bf16; C f32, or bf16 when c.bf16_out) when the
  // table has the shape and the operands are kLtAlignment-aligned: true; false (nothing run) otherwise.
  bool run(const Context& ctx, const GemmCall& c, float alpha, float beta, const void* A, const void* B, void* C);
  int64_t calls() const { return calls_; }  // products run here so far (tests)

 private:
  struct Plan;
  std::shared_ptr<const GemmAlgoTable> table_;
  cublasLtHandle_t lt_ = nullptr;
  std::map<GemmKey, std::unique_ptr<Plan>> plans_;  // null: a shape the table lacks
  DeviceBuffer workspace_;
  int64_t calls_ = 0;
};

}  // namespace mamba3::cuda
