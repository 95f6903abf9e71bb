#pragma once
// `mamba3 bench --device cuda --train`: training throughput (tokens/s) and model FLOPs utilisation of a
// random-initialised model on the GPU, one full optimizer step at a time (forward, backward, clipping, AdamW).
#include <cstdint>
#include <string>
#include <vector>

namespace mamba3::cli {

struct CudaTrainBenchArgs {
  std::vector<std::string> presets{"125m", "125m-mimo"};  // or a config.json path via `config`
  std::string config;
  std::string precision = "bf16";
  int64_t batch = 8, seq_len = 2048;
  int64_t accum = 1;       // micro-batches of batch × seq_len per optimizer step (gradient accumulation)
  int64_t steps = 5;       // timed optimizer steps (after 2 warm-up steps)
  double peak_tflops = 0;  // 0: the device's dense bf16 peak from its name (H100/H200 SXM: 989)
  // Non-empty: before timing, tune the step's bf16 product shapes into this GEMM algorithm table (created, or
  // extended when it exists) and time the step with it (train_gemm_algos.h; MAMBA3_TRAIN_GEMM_ALGOS uses it later).
  std::string tune_gemm;
};

void run_cuda_train_bench(const CudaTrainBenchArgs& a);

}  // namespace mamba3::cli
