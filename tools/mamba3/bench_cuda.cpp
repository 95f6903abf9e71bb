#include "bench_cuda.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>

#include "cuda/cuda_check.h"
#include "cuda/cuda_model.h"
#include "cuda/device_buffer.h"
#include "cuda/gemm_tuner.h"
#include "cuda/gemv_small_m.h"
#include "cuda/l2_prefetch.h"
#include "cuda/stream_gemm.h"
#include "model/init_weights.h"

namespace mamba3::cli {

namespace {

using cuda::CudaModel;
using cuda::GpuCache;

// The paper's 1.5B class (spec §13.3): d_model 2048, 24 blocks of Mamba-3 + GatedMLP, d_state 128, headdim 64,
// expand 2, Llama-3 vocabulary, tied embeddings. MIMO rank 4 shrinks the MLP to keep the parameter count.
ModelConfig cuda_preset(const std::string& name) {
  const bool mimo = name == "1.5b-mimo";
  MAMBA3_CHECK(name == "1.5b" || mimo, "--preset: unknown preset '{}' (known on cuda: 1.5b, 1.5b-mimo)", name);
  nlohmann::json ssm = {{"layer", "Mamba3"}, {"d_state", 128}, {"headdim", 64}, {"expand", 2}};
  if (mimo) ssm["is_mimo"] = true, ssm["mimo_rank"] = 4;
  nlohmann::json j = {{"d_model", 2048}, {"n_layer", 24}, {"vocab_size", 128256}, {"d_intermediate", mimo ? 3824 : 4096},
                      {"ssm_cfg", ssm}, {"tie_embeddings", true}};
  return ModelConfig::from_json(j, "preset " + name);
}

// Median milliseconds of `n` calls of f, each timed with events on stream s.
template <typename F>
double median_event_ms(cudaStream_t s, int64_t n, F&& f) {
  cudaEvent_t e0, e1;
  MAMBA3_CUDA_CHECK(cudaEventCreate(&e0));
  MAMBA3_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int64_t i = 0; i < n; ++i) {
    MAMBA3_CUDA_CHECK(cudaEventRecord(e0, s));
    f();
    MAMBA3_CUDA_CHECK(cudaEventRecord(e1, s));
    MAMBA3_CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    MAMBA3_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(ms.begin(), ms.end());
  return double(ms[ms.size() / 2]);
}

// Device-to-device copy bandwidth, counting bytes read plus bytes written (the ceiling the decode step is held to).
double measure_copy_bandwidth() {
  const size_t bytes = size_t(1) << 30;
  cuda::DeviceBuffer a(bytes), b(bytes);
  MAMBA3_CUDA_CHECK(cudaMemset(a.raw(), 1, bytes));
  auto copy = [&] { MAMBA3_CUDA_CHECK(cudaMemcpy(b.raw(), a.raw(), bytes, cudaMemcpyDeviceToDevice)); };
  copy(), copy();  // warm-up
  return 2.0 * double(bytes) / (median_event_ms(nullptr, 10, copy) * 1e-3);
}

// Median milliseconds of `n` graph-replayed decode steps.
double median_step_ms(const CudaModel& m, GpuCache& cache, int64_t n) {
  return median_event_ms(m.context().stream(), n, [&] { m.step_device(cache); });
}

// Dense bf16 matrix-product throughput (cuBLAS, f32 accumulation) on 8192³, median of 10: the ceiling of prefill.
double measure_gemm_flops() {
  const int n = 8192;
  cuda::Context ctx;
  cuda::DeviceBuffer a(size_t(n) * n * 2), b(size_t(n) * n * 2), c(size_t(n) * n * 4);
  MAMBA3_CUDA_CHECK(cudaMemset(a.raw(), 0, a.bytes()));
  MAMBA3_CUDA_CHECK(cudaMemset(b.raw(), 0, b.bytes()));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  const float one = 1.0f, zero = 0.0f;
  auto gemm = [&] {
    MAMBA3_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a.raw(), CUDA_R_16BF, n,
                                     b.raw(), CUDA_R_16BF, n, &zero, c.raw(), CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT));
  };
  gemm();  // warm-up
  const double ms = median_event_ms(ctx.stream(), 10, gemm);
  return 2.0 * double(n) * n * n / (ms * 1e-3);
}

// Matrix-product FLOPs per prompt token of a prefill: 2 per weight of every projection (in_proj, out_proj, fc1, fc2,
// attention), the embedding and the lm_head left out (the lm_head runs on each prompt's last token only).
double prefill_flops_per_token(const TensorMap& w) {
  double weights = 0;
  for (const auto& [name, t] : w)
    if (t.ndim() == 2 && name.find("embedding") == std::string::npos && name.find("lm_head") == std::string::npos)
      weights += double(t.numel());
  return 2.0 * weights;
}

std::vector<int64_t> random_ids(std::mt19937& rng, int64_t n, int64_t vocab) {
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = int64_t(rng() % uint32_t(vocab));
  return ids;
}

void bench_one(const std::string& name, const ModelConfig& c, const CudaBenchArgs& a, double copy_bw,
               double gemm_flops) {
  const auto t0 = std::chrono::steady_clock::now();
  const TensorMap w = init_weights(c, 1, InitStreams::Parallel);  // timing only: values need not match training's
  CudaModel m(c, w, name, cuda::parse_precision(a.precision));
  m.set_state_precision(cuda::parse_precision(a.state_precision));
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double prefill_floor = gemm_flops / prefill_flops_per_token(w);  // tokens/s if only the products counted
  const double wbytes = double(m.parameter_bytes()), sbytes = double(m.state_bytes_per_sequence());
  const int64_t V = c.vocab_padded();
  std::printf(
      "\n%s: %s weights %.2f GB on the device, decode state %.1f MB per sequence (%s ssm, %.1f MB moved per "
      "step at batch 1: state writes every %d steps where deferred, every %d at batch 128), built in %.0f s\n",
      name.c_str(), a.precision.c_str(), wbytes / 1e9, sbytes / 1e6, a.state_precision.c_str(),
      m.decode_state_traffic_per_sequence() / 1e6, m.state_writes_every(), m.state_writes_every(128), load_s);
  std::mt19937 rng(7);

  std::printf("  %-10s %10s %12s %12s %10s %10s\n", "decode", "ms/step", "tokens/s", "MB moved", "GB/s",
              "of copy");
  for (int64_t B : a.batches) {
    GpuCache cache = m.new_cache(B, 64);
    m.prefill(random_ids(rng, B * 16, c.vocab_size), B, 16, cache);
    const std::vector<int32_t> ids(static_cast<size_t>(B), 1);
    MAMBA3_CUDA_CHECK(cudaMemcpy(cache.device_ids(), ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
    for (int i = 0; i < 3; ++i) m.step_device(cache);  // eager, capture, first replay
    m.context().sync();
    const double ms = median_step_ms(m, cache, a.steps);
    // Bytes of one step: every weight once (the lm_head reads the whole embedding), each state read and written
    // (the ssm states of deferring heads written every few steps: CudaModel::set_state_writes_every), the logits.
    const double bytes = wbytes + m.decode_state_traffic_per_sequence(B) * double(B) + 4.0 * double(B * V);
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    std::printf("  b%-9ld %10.3f %12.0f %12.0f %10.0f %9.0f%%\n", long(B), ms, double(B) / (ms * 1e-3), bytes / 1e6,
                gbs, 100.0 * gbs * 1e9 / copy_bw);
  }

  if (a.lengths.empty()) return;
  const int64_t B = a.long_batch;
  std::printf("  prefill n + decode n at batch %ld; prefill floor %.0f tokens/s (%.2f GFLOP per token in the projections "
              "at the measured GEMM rate)\n  %-8s %10s %14s %9s %12s %12s %12s\n",
              long(B), prefill_floor, prefill_flops_per_token(w) / 1e9, "n", "total s", "prefill tok/s",
              "of floor", "prefill s", "decode s", "ms/step");
  for (int64_t n : a.lengths) {
    GpuCache cache = m.new_cache(B, 64);
    const std::vector<int64_t> prompt = random_ids(rng, B * n, c.vocab_size);
    {  // untimed warm-up with the same shapes: each matrix-product shape is tuned on its first call (gemm_tuner.h)
      GpuCache warm = m.new_cache(B, 64);
      m.prefill(prompt, B, n, warm);
      m.step_device(warm);
    }
    m.context().sync();
    auto p0 = std::chrono::steady_clock::now();
    m.prefill(prompt, B, n, cache);
    const double prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count();
    // The decode steps start from a fixed token (as in the table above), not from the prompt's greedy choice.
    const std::vector<int32_t> first(static_cast<size_t>(B), 1);
    MAMBA3_CUDA_CHECK(cudaMemcpy(cache.device_ids(), first.data(), first.size() * 4, cudaMemcpyHostToDevice));
    const int64_t timed = a.max_decode_steps > 0 ? std::min(n, a.max_decode_steps) : n;
    auto d0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < timed; ++i) m.step_device(cache);
    m.context().sync();
    double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - d0).count();
    const double per_step = decode_s / double(timed);
    decode_s = per_step * double(n);
    std::printf("  %-8ld %10.2f %14.0f %8.0f%% %12.2f %12.2f %12.3f%s\n", long(n), prefill_s + decode_s,
                double(B * n) / prefill_s, 100.0 * double(B * n) / prefill_s / prefill_floor, prefill_s, decode_s,
                per_step * 1e3,
                timed < n ? "  (decode extrapolated)" : "");
  }
}

// The decode step's matrix products alone (bf16 weights, f32 outputs), per kernel: cuBLAS (cublasGemmEx's default
// algorithm), the matrix-vector kernel (up to 8 rows) and the stream GEMM. Each timed call reads a different copy of
// the weights, enough copies that the L2 holds none of them when it comes round again (as in a decode step, where
// every weight is read once). Two more cuBLAS columns bound what requesting weights into L2 ahead of a product
// (weight_prefetch.h) can give: "warm", every call on the same copy (in L2 when it fits), and "+pf", each call's
// next copy requested (l2_prefetch) on a side stream as the call is queued, the decode step's product lead.
void bench_products(const std::string& name, const ModelConfig& c, const CudaBenchArgs& a, double copy_bw) {
  struct Product {
    const char* what;
    int64_t n, k;
  };
  const int64_t D = c.d_model;
  const std::vector<Product> products = {{"in_proj", c.ssm.d_in_proj(), D},
                                         {"out_proj", D, c.ssm.d_inner()},
                                         {"fc1", 2 * c.d_ff(), D},
                                         {"fc2", D, c.d_ff()},
                                         {"lm_head", c.vocab_padded(), D}};
  cuda::Context ctx;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  auto random_bf16 = [&](size_t count) {
    std::vector<uint16_t> v(count);
    for (auto& e : v) {
      const float f = uni(rng);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      e = uint16_t(bits >> 16);
    }
    return v;
  };
  const int64_t max_m = *std::max_element(a.batches.begin(), a.batches.end());
  std::printf(
      "\n%s: the decode step's matrix products, µs per call in a graph (weights read once, cold L2); GB/s "
      "of weight bytes; %% of the copy bandwidth\n  %-9s %6s %8s %8s %6s %10s %8s %8s %10s %10s %8s %8s\n",
      name.c_str(), "product", "N", "K", "M", "MB", "cuBLAS", "warm", "+pf", "gemv", "stream", "GB/s", "of copy");
  cudaStream_t side = nullptr;
  MAMBA3_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> events;
  for (const Product& p : products) {
    if (p.n == 0 || p.k == 0) continue;  // a config without that product (no MLP)
    const size_t wbytes = size_t(p.n * p.k) * 2;
    const size_t copies = std::max<size_t>(2, (3 * ctx.info().l2_bytes + wbytes - 1) / wbytes);
    cuda::DeviceBuffer w(wbytes * copies), x(size_t(max_m * p.k) * 2), y(size_t(max_m * p.n) * 4);
    const std::vector<uint16_t> host = random_bf16(size_t(p.n * p.k)), xs = random_bf16(size_t(max_m * p.k));
    w.upload(host.data(), wbytes);
    for (size_t i = 1; i < copies; ++i)
      MAMBA3_CUDA_CHECK(cudaMemcpy(static_cast<char*>(w.raw()) + i * wbytes, w.raw(), wbytes, cudaMemcpyDeviceToDevice));
    x.upload(xs.data(), xs.size() * 2);
    auto weights = [&](size_t i) { return static_cast<const char*>(w.raw()) + (i % copies) * wbytes; };
    while (events.size() < copies + 1) {
      cudaEvent_t e = nullptr;
      MAMBA3_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      events.push_back(e);
    }
    for (int64_t m : a.batches) {
      // Per call, from a graph of `copies` calls replayed (as the decode step runs them: no launch gaps, no host
      // work between kernels); median of 20 replays.
      // copy(i): the weights call i reads; prefetch: call i's next copy requested on the side stream first.
      auto time_us = [&](auto&& call, auto&& copy, bool prefetch) {
        for (size_t i = 0; i < copies; ++i) call(copy(i));  // warm-up (and any first-call setup)
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        MAMBA3_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
        for (size_t i = 0; i < copies; ++i) {
          if (prefetch) {
            MAMBA3_CUDA_CHECK(cudaEventRecord(events[i], ctx.stream()));
            MAMBA3_CUDA_CHECK(cudaStreamWaitEvent(side, events[i], 0));
            cuda::l2_prefetch(side, copy(i + 1), wbytes);
          }
          call(copy(i));
        }
        if (prefetch) {  // the capture must join the side branch
          MAMBA3_CUDA_CHECK(cudaEventRecord(events[copies], side));
          MAMBA3_CUDA_CHECK(cudaStreamWaitEvent(ctx.stream(), events[copies], 0));
        }
        MAMBA3_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
        MAMBA3_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        MAMBA3_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream()));
        const double ms = median_event_ms(ctx.stream(), 20, [&] { MAMBA3_CUDA_CHECK(cudaGraphLaunch(exec, ctx.stream())); });
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        return 1e3 * ms / double(copies);
      };
      const auto gemm = [&](const void* wp) {
        cuda::gemm_bf16(ctx, wp, x.raw(), y.as<float>(), cuda::GemmShape{p.n, p.k, m, p.k, p.n});
      };
      const auto same = [&](size_t) { return weights(0); };
      const double cublas = time_us(gemm, weights, false), warm = time_us(gemm, same, false);
      const double ahead = time_us(gemm, weights, true);
      double gemv = 0, stream = 0;
      if (m <= cuda::kGemvMaxRows)
        gemv = time_us(
            [&](const void* wp) {
              cuda::gemv_small_m(ctx.stream(), wp, p.n, p.k, x.raw(), m, p.k, y.as<float>(), p.n);
            },
            weights, false);
      if (cuda::stream_gemm_supported(ctx, m, p.n, p.k, p.k, w.raw(), x.raw()))
        stream =
            time_us([&](const void* wp) { cuda::stream_gemm(ctx, wp, p.n, p.k, x.raw(), m, p.k, y.as<float>(), p.n); },
                    weights, false);
      double best = cublas;
      if (gemv > 0) best = std::min(best, gemv);
      if (stream > 0) best = std::min(best, stream);
      const double gbs = double(wbytes) / (best * 1e-6) / 1e9;
      auto cell = [](double us) { return us > 0 ? fmt::format("{:.1f}", us) : std::string("-"); };
      std::printf("  %-9s %6ld %8ld %8ld %6.1f %10s %8s %8s %10s %10s %8.0f %7.0f%%\n", p.what, long(p.n), long(p.k),
                  long(m), double(wbytes) / 1e6, cell(cublas).c_str(), cell(warm).c_str(), cell(ahead).c_str(),
                  cell(gemv).c_str(), cell(stream).c_str(), gbs, 100.0 * gbs * 1e9 / copy_bw);
      if (stream > 0 && m > cuda::kStreamGemmNarrowMaxRows) {
        const cuda::StreamGemmWideGrid g = cuda::stream_gemm_wide_grid(ctx, p.n, p.k);
        std::printf("  %-9s stream GEMM grid: tiles of %d weight rows, %d blocks per tile\n", "", g.tile_rows,
                    g.split);
      }
    }
  }
  for (cudaEvent_t e : events) cudaEventDestroy(e);
  cudaStreamDestroy(side);
}

}  // namespace

void run_cuda_bench(const CudaBenchArgs& a) {
  const cuda::DeviceInfo info = cuda::device_info();
  MAMBA3_CHECK(info.available, "--device cuda: no usable CUDA device ({})", info.why_not);
  const double bw = measure_copy_bandwidth();
  const double gemm = measure_gemm_flops();
  std::printf("mamba3 bench --device cuda: %s, %d SMs, %.0f GB; device-to-device copy %.0f GB/s (read + write); bf16 "
              "GEMM %.0f TFLOP/s (8192³)\n",
              info.name.c_str(), info.sm_count, double(info.memory_bytes) / 1e9, bw / 1e9, gemm / 1e12);
  if (const cuda::WeightPrefetchOptions pf = cuda::weight_prefetch_from_env(); pf.mode != cuda::WeightPrefetch::Off)
    std::printf(
        "decode weights requested into L2 %s ahead (MAMBA3_DECODE_PREFETCH), from %ld rows, %s per product, "
        "%s lines\n",
        pf.mode == cuda::WeightPrefetch::Kernel ? "one kernel" : "one product", long(pf.min_rows),
        pf.max_bytes ? fmt::format("≤ {} MB", pf.max_bytes >> 20).c_str() : "≤ half the L2",
        pf.evict_last ? "evict-last" : "evict-normal");
  if (a.products) {
    if (!a.config.empty()) return bench_products(a.config, ModelConfig::load(a.config), a, bw);
    for (const auto& p : a.presets) bench_products("Mamba-3 " + p, cuda_preset(p), a, bw);
    return;
  }
  if (!a.config.empty()) {
    bench_one(a.config, ModelConfig::load(a.config), a, bw, gemm);
  } else {
    for (const auto& p : a.presets) bench_one("Mamba-3 " + p + " (random init)", cuda_preset(p), a, bw, gemm);
  }
}

}  // namespace mamba3::cli
