// `mamba3 bench`: speed of a randomly initialised Mamba-3 language model on this CPU (no checkpoint needed):
// prefill tokens/s and decode tokens/s per batch size, against the memory floor of decoding
// (bytes of weights + 2 × bytes of decode state per step, over the measured read bandwidth).
#include <algorithm>
#include <cstdio>
#include <random>

#include <nlohmann/json.hpp>

#include "commands.h"
#ifdef MAMBA3_HAVE_CUDA
#include "bench_cuda.h"
#ifdef MAMBA3_HAVE_CUDA_TRAIN
#include "bench_train_cuda.h"
#endif
#endif
#include "core/parallel.h"
#include "model/init_weights.h"
#include "model/language_model.h"
#include "ops/machine.h"

namespace mamba3::cli {

namespace {

ModelConfig preset(const std::string& name) {
  // 130M / 370M classes of the Mamba papers: GPT-NeoX vocabulary, no MLP, d_state 128, headdim 64, expand 2.
  const int64_t d_model = name == "130m" ? 768 : name == "370m" ? 1024 : 0;
  const int64_t layers = name == "130m" ? 24 : 48;
  MAMBA3_CHECK(d_model, "--preset: unknown preset '{}' (known: 130m, 370m)", name);
  nlohmann::json j = {{"d_model", d_model}, {"n_layer", layers}, {"vocab_size", 50277},
                      {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 128}, {"headdim", 64}}}};
  return ModelConfig::from_json(j, "preset " + name);
}

struct BenchArgs {
  std::vector<std::string> presets{"130m", "370m"};
  std::string config;
  std::vector<int64_t> batches{1, 8};
  int64_t prompt = 512, steps = 32;
  int threads = 0;
};

void bench_model(const std::string& name, const ModelConfig& c, const BenchArgs& a, double bandwidth) {
  LanguageModel m(c, init_weights(c, 1, InitStreams::Parallel), name);
  const double weight_bytes = double(m.parameter_count()) * 4;
  std::printf("\n%s: %.1fM parameters (%.0f MB f32), decode state %.2f MB per sequence\n", name.c_str(),
              double(m.parameter_count()) / 1e6, weight_bytes / 1e6, double(m.state_bytes_per_sequence()) / 1e6);
  std::mt19937 rng(7);
  std::vector<int64_t> prompt(size_t(a.prompt));
  for (auto& id : prompt) id = int64_t(rng() % uint32_t(c.vocab_size));
  {
    double s = median_seconds(3, [&] {
      ModelCache cache = m.new_cache(1);
      m.prefill(prompt, cache, 0);
    });
    std::printf("  %-22s %10.1f tokens/s   (%ld tokens in %.3f s)\n", "prefill b1", double(a.prompt) / s,
                long(a.prompt), s);
  }
  std::printf("  %-22s %10s %12s %12s %9s\n", "decode", "tokens/s", "ms/step", "floor ms", "of floor");
  for (int64_t B : a.batches) {
    ModelCache cache = m.new_cache(B);
    std::vector<int64_t> ids(static_cast<size_t>(B), 1);
    for (int64_t b = 0; b < B; ++b) m.prefill(std::vector<int64_t>(prompt.begin(), prompt.begin() + 8), cache, b);
    Tensor logits = Tensor::empty(DType::F32, {B, c.vocab_padded()});
    double s = median_seconds(int(a.steps), [&] { m.step(ids, cache, logits); });
    const double floor_s = (weight_bytes + 2.0 * double(m.state_bytes_per_sequence()) * double(B)) / bandwidth;
    char label[32];
    std::snprintf(label, sizeof label, "decode b%ld", long(B));
    std::printf("  %-22s %10.1f %12.3f %12.3f %8.0f%%\n", label, double(B) / s, s * 1e3, floor_s * 1e3,
                100.0 * floor_s / s);
  }
}

}  // namespace

void register_bench(CLI::App& app) {
  static BenchArgs a;
  static std::string device = "cpu";
#ifdef MAMBA3_HAVE_CUDA
  static CudaBenchArgs ca;
#endif
#ifdef MAMBA3_HAVE_CUDA_TRAIN
  static CudaTrainBenchArgs ta;
  static bool train = false;
#endif
  auto* cmd = app.add_subcommand("bench", "Measure prefill and decode speed of a random-initialised model");
  cmd->add_option("--preset", a.presets, "model classes to measure: 130m, 370m")->capture_default_str();
  cmd->add_option("--config", a.config, "measure the model of this config.json instead of the presets");
  cmd->add_option("--batch", a.batches, "decode batch sizes (space- or comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--prompt", a.prompt, "prefill length")->capture_default_str();
  cmd->add_option("--steps", a.steps, "decode steps timed (median); with --train: optimizer steps timed (default 5)")
      ->capture_default_str();
  cmd->add_option("--threads", a.threads, "CPU threads (default: all cores)");
  cmd->add_option("--device", device, "cpu, or cuda (presets 1.5b, 1.5b-mimo)")->capture_default_str();
#ifdef MAMBA3_HAVE_CUDA
  cmd->add_option("--precision", ca.precision, "cuda: weights and matrix inputs, bf16 or f32")->capture_default_str();
  cmd->add_option("--state-precision", ca.state_precision, "cuda: the Mamba-3 ssm state, f32 or bf16")
      ->capture_default_str();
  cmd->add_option("--lengths", ca.lengths, "cuda: prefill n + decode n runs (empty: skip)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--long-batch", ca.long_batch, "cuda: batch of the prefill+decode runs")->capture_default_str();
  cmd->add_flag("--products", ca.products,
                "cuda: time the decode step's matrix products alone (cuBLAS, matrix-vector kernel, stream GEMM)");
  cmd->add_option("--max-decode-steps", ca.max_decode_steps,
                  "cuda: time at most this many decode steps per run and extrapolate (0: all)");
#endif
#ifdef MAMBA3_HAVE_CUDA_TRAIN
  cmd->add_flag("--train", train, "cuda: training throughput and MFU (presets 125m, 125m-mimo) instead of inference");
  cmd->add_option("--seq-len", ta.seq_len, "cuda --train: tokens per sequence")->capture_default_str();
  cmd->add_option("--train-batch", ta.batch, "cuda --train: sequences per micro-batch")->capture_default_str();
  cmd->add_option("--accum", ta.accum, "cuda --train: micro-batches per optimizer step (gradient accumulation)")
      ->capture_default_str();
  cmd->add_option("--peak-tflops", ta.peak_tflops, "cuda --train: the device's dense bf16 peak (0: by name)");
  cmd->add_option("--tune-gemm", ta.tune_gemm,
                  "cuda --train: choose cuBLASLt algorithms for the step's products by timing, write them to this "
                  "table (extended if it exists; use it later with MAMBA3_TRAIN_GEMM_ALGOS=FILE) and time with them");
#endif
  cmd->callback([cmd] {
    if (device == "cuda") {
#ifdef MAMBA3_HAVE_CUDA_TRAIN
      if (train) {
        ta.config = a.config;
        if (cmd->count("--steps") > 0) ta.steps = a.steps;  // (else the training default, not the decode one)
        ta.precision = ca.precision;
        if (a.presets != std::vector<std::string>{"130m", "370m"}) ta.presets = a.presets;
        run_cuda_train_bench(ta);
        return;
      }
#endif
#ifdef MAMBA3_HAVE_CUDA
      ca.config = a.config;
      if (a.presets != std::vector<std::string>{"130m", "370m"}) ca.presets = a.presets;
      if (a.batches != std::vector<int64_t>{1, 8}) ca.batches = a.batches;
      ca.steps = std::max<int64_t>(a.steps, 20);
      run_cuda_bench(ca);
      return;
#else
      fail("--device cuda: this build has no CUDA backend (configure with -DMAMBA3_CUDA=ON on a machine with nvcc)");
#endif
    }
    MAMBA3_CHECK(device == "cpu", "--device: '{}' is not one of cpu, cuda", device);
    if (a.threads > 0) set_threads(a.threads);
    MAMBA3_CHECK(a.prompt >= 1 && a.steps >= 1, "--prompt and --steps must be at least 1");
    for (int64_t b : a.batches) MAMBA3_CHECK(b >= 1, "--batch: sizes must be at least 1, got {}", b);
    const double bw = measure_read_bandwidth();
    std::printf("mamba3 bench: %d threads, measured read bandwidth %.1f GB/s\n", max_threads(), bw / 1e9);
    if (!a.config.empty()) {
      bench_model(a.config, ModelConfig::load(a.config), a, bw);
    } else {
      for (const auto& p : a.presets) bench_model("Mamba-3 " + p + " (random init)", preset(p), a, bw);
    }
  });
}

}  // namespace mamba3::cli
