#pragma once
// MAMBA3_TRAIN_PROFILE=gemm: where a training step's matrix-product time goes, per product shape. TrainGemm records
// device time (events around each cuBLAS call) while a window is open; the report lists every shape's calls per
// step, µs per call and TFLOP/s, and times the same shape through cuBLASLt's ranked algorithms on scratch operands
// (after an L2 flush, like the step sees them) to show what another algorithm would give. A diagnostic: the events
// between launches cost a few µs each, so a profiled step runs slower than an unprofiled one.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

namespace mamba3::cuda {

class Context;
class GemmAlgoTable;

struct GemmCall {
  bool ta = false, tb = false, bf16_out = false, accumulate = false;  // accumulate: β ≠ 0
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
};

namespace gemm_profile {

// MAMBA3_TRAIN_PROFILE is "gemm" (read once).
bool enabled();
// Open the window (clears what was recorded); TrainGemm records only while it is open. force: open it whatever
// MAMBA3_TRAIN_PROFILE says (tuning records the shapes of a step).
void begin(bool force = false);
bool recording();
// Around one cuBLAS call on `stream` (call only while recording()).
void before(cudaStream_t stream);
void after(cudaStream_t stream, const GemmCall& call);
// Close the window, synchronise the device, print the per-shape table (per step: divided by `steps`) and each shape's
// cuBLASLt alternatives (timed on ctx's stream) to stderr.
void report(const Context& ctx, int64_t steps);
// Close the window and, for every product shape recorded in it, time cublasGemmEx's default and cuBLASLt's first
// `candidates` ranked algorithms (scratch operands, after an L2 flush); a candidate faster than the default by more
// than `min_gain` (a fraction) enters `table`. Prints one line per shape to `log` (null: quiet). Returns the number
// of shapes taken.
int64_t tune(const Context& ctx, GemmAlgoTable& table, int candidates, double min_gain, std::FILE* log);

}  // namespace gemm_profile
}  // namespace mamba3::cuda
