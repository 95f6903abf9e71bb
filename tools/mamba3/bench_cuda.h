#pragma once
// `mamba3 bench --device cuda`: decode-step latency and prefill+decode runs of a random-initialised model on the GPU.
#include <cstdint>
#include <string>
#include <vector>

namespace mamba3::cli {

struct CudaBenchArgs {
  std::vector<std::string> presets{"1.5b"};  // 1.5b, 1.5b-mimo, or a config.json path via `config`
  std::string config;
  std::string precision = "bf16";
  std::string state_precision = "f32";  // of the Mamba-3 ssm state
  std::vector<int64_t> batches{1, 16, 128};
  std::vector<int64_t> lengths{512, 1024, 4096, 16384};  // prefill n then decode n, at batch `long_batch`
  int64_t long_batch = 128;
  int64_t steps = 50;            // decode steps timed per batch size
  int64_t max_decode_steps = 0;  // > 0: time at most this many decode steps of a prefill+decode run, extrapolate
  bool products = false;         // time the decode step's matrix products alone, per kernel, instead
};

void run_cuda_bench(const CudaBenchArgs& a);

}  // namespace mamba3::cli
