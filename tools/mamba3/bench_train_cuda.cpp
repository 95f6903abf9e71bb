#include "bench_train_cuda.h"

#include <chrono>
#include <filesystem>
#include <memory>
#include <cstdio>
#include <random>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "cuda/cuda_context.h"
#include "cuda/train/train_engine_gpu.h"
#include "cuda/train/train_gemm_algos.h"
#include "cuda/train/train_gemm_profile.h"
#include "model/init_weights.h"
#include "model/model_config.h"
#include "train/optimizer.h"

namespace mamba3::cli {

namespace {

// The 125M class of the paper's scaling runs, in the 1.5B preset's shape: Mamba-3 blocks with a GatedMLP of twice
// d_model, d_state 128, headdim 64, expand 2, tied embeddings (GPT-NeoX vocabulary). MIMO rank 4 trims the MLP to
// keep the parameter count, as the 1.5B MIMO preset does.
ModelConfig train_preset(const std::string& name) {
  const bool mimo = name == "125m-mimo";
  MAMBA3_CHECK(name == "125m" || mimo, "--preset: unknown training preset '{}' (known: 125m, 125m-mimo)", name);
  nlohmann::json ssm = {{"layer", "Mamba3"}, {"d_state", 128}, {"headdim", 64}, {"expand", 2}};
  if (mimo) ssm["is_mimo"] = true, ssm["mimo_rank"] = 4;
  nlohmann::json j = {{"d_model", 768},        {"n_layer", 12}, {"vocab_size", 50277},
                      {"d_intermediate", mimo ? 1408 : 1536}, {"ssm_cfg", ssm}, {"tie_embeddings", true}};
  return ModelConfig::from_json(j, "preset " + name);
}

// Matrix-product FLOPs per token of one training step: 6 per weight of every product (2 forward, 4 backward) —
// in_proj, out_proj, fc1, fc2 and the lm_head. The chunked scan's FLOPs are left out (so the MFU is conservative).
double train_flops_per_token(const ModelConfig& c) {
  const Mamba3Config& s = c.ssm;
  double w = double(c.vocab_padded()) * double(c.d_model);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    if (c.is_attention_layer(i)) continue;  // (the presets have none)
    w += double(s.d_in_proj()) * double(c.d_model) + double(c.d_model) * double(s.d_inner());
    if (c.d_intermediate > 0) w += 3.0 * double(c.d_ff()) * double(c.d_model);
  }
  return 6.0 * w;
}

// The state recurrence's FLOPs per token of one training step, for an MFU that counts the sequence mixing as PaLM's
// counts attention's products: per head and token the forward's update h ← α·h + Σ_r (two rank-1 terms per rank) is
// (1 + 4R)·N·P and its output (R readouts) 2R·N·P, so (1 + 6R)·N·d_inner per layer (7·N·d_inner for SISO, independent
// of how the chunked form computes it); the backward taken as twice the forward, as for the products.
double scan_flops_per_token(const ModelConfig& c) {
  const Mamba3Config& s = c.ssm;
  const double R = double(s.rank());
  double f = 0;
  for (int64_t i = 0; i < c.n_layer; ++i)
    if (!c.is_attention_layer(i)) f += (1.0 + 6.0 * R) * double(s.d_state) * double(s.d_inner());
  return 3.0 * f;
}

double parameter_count(const TensorMap& p) {
  double n = 0;
  for (const auto& [name, t] : p) n += double(t.numel());
  return n;
}

void bench_one(const std::string& label, const ModelConfig& c, const CudaTrainBenchArgs& a, double peak) {
  TensorMap params = init_weights(c, 1, InitStreams::Parallel);  // timing only
  AdamW opt({0.9, 0.95, 1e-8, 0.1}, params);
  auto engine = cuda::cuda_train_engine(c, params, opt, cuda::parse_precision(a.precision));
  const int64_t B = a.batch, L = a.seq_len, micro = a.accum;
  std::mt19937 rng(3);
  std::vector<int64_t> tokens(size_t(micro * B * (L + 1)));
  for (auto& t : tokens) t = int64_t(rng() % uint32_t(c.vocab_size));
  auto step = [&] {  // one optimizer step: `micro` micro-batches' gradients, then clipping and AdamW
    double loss = 0;
    for (int64_t i = 0; i < micro; ++i)
      loss += engine->accumulate(tokens.data() + i * B * (L + 1), B, L, 1.0 / double(micro)) / double(micro);
    engine->clip(1.0);
    engine->update(1e-4);
    return loss;
  };
  for (int i = 0; i < 2; ++i) step();
  if (!a.tune_gemm.empty()) {
    // One step's product shapes, tuned into the table; then a new engine (its products take the table when made).
    cuda::gemm_profile::begin(true);
    step();
    cuda::Context ctx;
    cuda::GemmAlgoTable table =
        std::filesystem::exists(a.tune_gemm) ? cuda::GemmAlgoTable::load(a.tune_gemm) : cuda::GemmAlgoTable();
    std::printf("  tuning the bf16 products of %s into %s:\n", label.c_str(), a.tune_gemm.c_str());
    const int64_t taken = cuda::gemm_profile::tune(ctx, table, 16, 0.03, stdout);
    table.save(a.tune_gemm);
    std::printf("  %lld shapes taken (%zu in the table)\n", static_cast<long long>(taken), table.size());
    cuda::set_process_gemm_algos(std::make_shared<const cuda::GemmAlgoTable>(std::move(table)));
    engine.reset();
    engine = cuda::cuda_train_engine(c, params, opt, cuda::parse_precision(a.precision));
    for (int i = 0; i < 2; ++i) step();
  }
  const auto t0 = std::chrono::steady_clock::now();
  double loss = 0;
  for (int64_t i = 0; i < a.steps; ++i) loss = step();  // the loss read synchronises each step
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / double(a.steps);
  if (cuda::gemm_profile::enabled()) {  // one more step, its products timed one by one (MAMBA3_TRAIN_PROFILE=gemm)
    cuda::gemm_profile::begin();
    step();
    cuda::Context ctx;
    cuda::gemm_profile::report(ctx, 1);
  }
  const double tok_s = double(micro * B * L) / s, tflops = train_flops_per_token(c) * tok_s / 1e12;
  // The step's buffers stay allocated between steps, so what is in use after them is about the run's peak.
  const double gib = double(cuda::device_memory_in_use()) / double(1ull << 30);
  const std::string shape = micro > 1 ? fmt::format("{}×{}×{}", micro, B, L) : fmt::format("{}×{}", B, L);
  const double with_scan = (train_flops_per_token(c) + scan_flops_per_token(c)) * tok_s / 1e12;
  std::printf("  %-28s %8.1fM %12s %10.1f %10.0f %9.1f %6.1f%% %8.1f%% %8.1f   (loss %.6f)\n", label.c_str(),
              parameter_count(params) / 1e6, shape.c_str(), s * 1e3, tok_s, tflops, 100.0 * tflops / peak,
              100.0 * with_scan / peak, gib, loss);
  std::fflush(stdout);
}

}  // namespace

void run_cuda_train_bench(const CudaTrainBenchArgs& a) {
  const cuda::DeviceInfo dev = cuda::device_info();
  MAMBA3_CHECK(dev.available, "--device cuda: no usable CUDA device ({})", dev.why_not);
  MAMBA3_CHECK(a.batch >= 1 && a.seq_len >= 1 && a.steps >= 1 && a.accum >= 1,
               "--train-batch, --seq-len, --steps and --accum must be ≥ 1");
  double peak = a.peak_tflops;
  if (peak <= 0) {
    const bool hopper = dev.name.find("H100") != std::string::npos || dev.name.find("H200") != std::string::npos;
    peak = hopper ? 989.0 : 0.0;
    MAMBA3_CHECK(peak > 0, "--peak-tflops: unknown dense bf16 peak for '{}'; pass it", dev.name);
  }
  std::printf(
      "mamba3 bench --train: %s, %s, peak %.0f TFLOP/s (dense bf16); one step = forward + backward + clip + "
      "AdamW; FLOPs = 6 × matrix weights per token (scan excluded: TFLOP/s, MFU); MFU+scan adds the state "
      "recurrence's 3 × (1 + 6R)·N·d_inner per layer\n",
      dev.name.c_str(), a.precision.c_str(), peak);
  std::printf("  %-28s %9s %12s %10s %10s %9s %7s %9s %8s\n", "model", "params", "[accum×]batch×len", "ms/step",
              "tokens/s", "TFLOP/s", "MFU", "MFU+scan", "GiB");
  if (!a.config.empty()) {
    bench_one(a.config, ModelConfig::load(a.config), a, peak);
    return;
  }
  for (const auto& p : a.presets) bench_one("Mamba-3 " + p + " (random init)", train_preset(p), a, peak);
}

}  // namespace mamba3::cli
