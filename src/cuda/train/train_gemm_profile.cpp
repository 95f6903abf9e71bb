#include "cuda/train/train_gemm_profile.h"

#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/train_gemm_algos.h"

namespace mamba3::cuda::gemm_profile {

namespace {

struct Recorded {
  GemmCall call;
  cudaEvent_t start, stop;
};

struct State {
  bool open = false;
  cudaEvent_t pending = nullptr;
  std::vector<Recorded> calls;
  std::vector<cudaEvent_t> spare;  // events of closed windows, reused

  cudaEvent_t event() {
    if (!spare.empty()) {
      cudaEvent_t e = spare.back();
      spare.pop_back();
      return e;
    }
    cudaEvent_t e;
    MAMBA3_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
};

State& state() {
  static State s;
  return s;
}

using Key = std::tuple<bool, bool, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
Key key_of(const GemmCall& c) {
  return {c.ta, c.tb, c.bf16_out, c.accumulate, c.m, c.n, c.k, c.lda, c.ldb, c.ldc};
}

std::string describe(const GemmCall& c) {
  return fmt::format("{}{}×{} · {}{}×{} {} {}", c.ta ? "Aᵀ" : "A ", c.m, c.k, c.tb ? "Bᵀ" : "B ", c.k, c.n,
                     c.accumulate ? "+=" : "→", c.bf16_out ? "bf16" : "f32");
}

// One shape on scratch operands: cublasGemmEx's default (what TrainGemm runs) and cuBLASLt's ranked candidates,
// the median of 5 launches, each after an L2 flush.
class ShapeTimer {
 public:
  ShapeTimer(const Context& ctx, const GemmCall& c) : ctx_(ctx), c_(c) {
    const int64_t a_rows = c.ta ? c.k : c.m, b_rows = c.tb ? c.n : c.k;
    a_.reserve(size_t(a_rows * c.lda) * 2);
    b_.reserve(size_t(b_rows * c.ldb) * 2);
    c_buf_.reserve(size_t(c.m * c.ldc) * (c.bf16_out ? 2 : 4));
    // Small finite values everywhere (0x3c3c: bf16 0.0115; as f32 about 0.0115 too).
    MAMBA3_CUDA_CHECK(cudaMemsetAsync(a_.raw(), 0x3c, a_.bytes(), ctx.stream()));
    MAMBA3_CUDA_CHECK(cudaMemsetAsync(b_.raw(), 0x3c, b_.bytes(), ctx.stream()));
    MAMBA3_CUDA_CHECK(cudaMemsetAsync(c_buf_.raw(), 0, c_buf_.bytes(), ctx.stream()));
    const size_t l2 = ctx.info().l2_bytes ? ctx.info().l2_bytes : size_t(64) << 20;
    flush_.reserve(2 * l2);
    for (auto& e : events_) MAMBA3_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~ShapeTimer() {
    for (auto& e : events_) cudaEventDestroy(e);
  }
  ShapeTimer(const ShapeTimer&) = delete;
  ShapeTimer& operator=(const ShapeTimer&) = delete;

  double default_us() {
    return median_us([&] {
      const float alpha = 1.0f, beta = c_.accumulate ? 1.0f : 0.0f;
      return cublasGemmEx(ctx_.cublas(), op(c_.tb), op(c_.ta), int(c_.n), int(c_.m), int(c_.k), &alpha, b_.raw(),
                          CUDA_R_16BF, int(c_.ldb), a_.raw(), CUDA_R_16BF, int(c_.lda), &beta, c_buf_.raw(),
                          c_.bf16_out ? CUDA_R_16BF : CUDA_R_32F, int(c_.ldc), CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
    });
  }

  // The fastest of cuBLASLt's first `count` ranked candidates: its time in µs and the algorithm (time 1e30 when
  // none runs).
  std::pair<double, cublasLtMatmulAlgo_t> best_lt(int count) {
    cublasLtHandle_t lt = nullptr;
    std::pair<double, cublasLtMatmulAlgo_t> best{1e30, cublasLtMatmulAlgo_t{}};
    if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) return best;
    {
      GemmAlgoTable table;
      // Candidates needing up to 64 MB of workspace (each runner allocates what its algorithm asks for).
      for (const cublasLtMatmulAlgo_t& algo : lt_candidates(lt, c_, count, size_t(64) << 20)) {
        TunedAlgo tuned;
        tuned.algo = algo;
        table.set(c_, tuned);
        LtRunner runner(std::make_shared<const GemmAlgoTable>(table));
        const double us = median_us([&] {
          const float alpha = 1.0f, beta = c_.accumulate ? 1.0f : 0.0f;
          try {
            return runner.run(ctx_, c_, alpha, beta, a_.raw(), b_.raw(), c_buf_.raw());
          } catch (const Error&) {
            return false;  // an algorithm the check refuses: not a candidate
          }
        });
        if (us < best.first) best = {us, algo};
      }
    }
    MAMBA3_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream()));
    cublasLtDestroy(lt);
    return best;
  }

 private:
  static cublasOperation_t op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

  template <typename Launch>
  double median_us(Launch&& launch) {
    constexpr int kReps = 5;
    const cudaStream_t s = ctx_.stream();
    if (!launch()) return 1e30;
    float ms[kReps];
    for (int r = 0; r < kReps; ++r) {
      MAMBA3_CUDA_CHECK(cudaMemsetAsync(flush_.raw(), r, flush_.bytes(), s));
      MAMBA3_CUDA_CHECK(cudaEventRecord(events_[0], s));
      if (!launch()) return 1e30;
      MAMBA3_CUDA_CHECK(cudaEventRecord(events_[1], s));
      MAMBA3_CUDA_CHECK(cudaEventSynchronize(events_[1]));
      MAMBA3_CUDA_CHECK(cudaEventElapsedTime(&ms[r], events_[0], events_[1]));
    }
    std::sort(ms, ms + kReps);
    return 1000.0 * double(ms[kReps / 2]);
  }

  const Context& ctx_;
  GemmCall c_;
  DeviceBuffer a_, b_, c_buf_, flush_;
  cudaEvent_t events_[2];
};

}  // namespace

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MAMBA3_TRAIN_PROFILE");
    return v != nullptr && std::strcmp(v, "gemm") == 0;
  }();
  return on;
}

void begin(bool force) {
  State& s = state();
  for (const Recorded& r : s.calls) s.spare.push_back(r.start), s.spare.push_back(r.stop);
  s.calls.clear();
  s.open = force || enabled();
}

bool recording() { return state().open; }

void before(cudaStream_t stream) {
  State& s = state();
  s.pending = s.event();
  MAMBA3_CUDA_CHECK(cudaEventRecord(s.pending, stream));
}

void after(cudaStream_t stream, const GemmCall& call) {
  State& s = state();
  cudaEvent_t stop = s.event();
  MAMBA3_CUDA_CHECK(cudaEventRecord(stop, stream));
  s.calls.push_back({call, s.pending, stop});
  s.pending = nullptr;
}

void report(const Context& ctx, int64_t steps) {
  State& s = state();
  if (!s.open) return;
  s.open = false;
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());  // the recording streams may be other than ctx's
  struct Total {
    GemmCall call;
    int64_t count = 0;
    double ms = 0;
  };
  std::map<Key, Total> by_shape;
  double all_ms = 0, all_flop = 0;
  for (const Recorded& r : s.calls) {
    float ms = 0;
    MAMBA3_CUDA_CHECK(cudaEventElapsedTime(&ms, r.start, r.stop));
    Total& t = by_shape[key_of(r.call)];
    t.call = r.call, t.count += 1, t.ms += ms;
    all_ms += ms, all_flop += 2.0 * double(r.call.m) * double(r.call.n) * double(r.call.k);
  }
  std::vector<Total> rows;
  for (const auto& [key, t] : by_shape) rows.push_back(t);
  std::sort(rows.begin(), rows.end(), [](const Total& a, const Total& b) { return a.ms > b.ms; });
  const double per = double(std::max<int64_t>(steps, 1));
  std::fprintf(stderr, "gemm profile: %.2f ms per step in %zu products, %.0f TFLOP/s overall\n", all_ms / per,
               s.calls.size() / size_t(per), all_flop / (all_ms * 1e-3) / 1e12);
  std::fprintf(stderr, "  %-44s %6s %9s %8s %7s | %9s %8s %9s %8s\n", "product (row-major)", "calls", "µs/call",
               "TFLOP/s", "ms/step", "alone µs", "TFLOP/s", "best Lt", "TFLOP/s");
  for (const Total& t : rows) {
    const double flop = 2.0 * double(t.call.m) * double(t.call.n) * double(t.call.k);
    const double us = 1000.0 * t.ms / double(t.count);
    ShapeTimer timer(ctx, t.call);
    const double alone = timer.default_us();
    const double best = timer.best_lt(16).first;
    std::fprintf(stderr, "  %-44s %6.1f %9.1f %8.0f %7.3f | %9.1f %8.0f %9.1f %8.0f\n", describe(t.call).c_str(),
                 double(t.count) / per, us, flop / us * 1e-6, t.ms / per, alone, flop / alone * 1e-6, best,
                 flop / best * 1e-6);
  }
}

int64_t tune(const Context& ctx, GemmAlgoTable& table, int candidates, double min_gain, std::FILE* log) {
  State& s = state();
  s.open = false;
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  std::map<Key, GemmCall> shapes;
  for (const Recorded& r : s.calls) shapes.emplace(key_of(r.call), r.call);
  int64_t chosen = 0;
  if (log) std::fprintf(log, "  %-44s %10s %10s %7s\n", "product (row-major, bf16)", "default µs", "best Lt µs", "gain");
  for (const auto& [key, call] : shapes) {
    ShapeTimer timer(ctx, call);
    TunedAlgo tuned;
    tuned.default_us = timer.default_us();
    const auto [best, algo] = timer.best_lt(candidates);
    tuned.tuned_us = best, tuned.algo = algo;
    const bool take = best < tuned.default_us * (1.0 - min_gain);
    if (take) table.set(call, tuned), ++chosen;
    if (log)
      std::fprintf(log, "  %-44s %10.1f %10.1f %6.1f%%%s\n", describe(call).c_str(), tuned.default_us, best,
                   100.0 * (tuned.default_us - best) / tuned.default_us, take ? "  (taken)" : "");
  }
  return chosen;
}

}  // namespace mamba3::cuda::gemm_profile
