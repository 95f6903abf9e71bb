#include "cuda/gemm_tuner.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <fmt/format.h>

#include "cuda/cuda_context.h"
#include "cuda/env_switch.h"

namespace mamba3::cuda {

namespace {

constexpr int kMaxCandidates = 24;    // cuBLASLt algorithms timed per shape at most (the default comes on top)
constexpr double kBudgetUs = 15000;   // GPU time one shape's tuning aims at: long products get fewer reps/candidates
constexpr double kFlushUs = 40;       // one L2 flush (a memset of twice the L2 at ~3 TB/s), for the budget only
constexpr int kSplitSources = 2;      // the fastest heuristic algorithms that also get split-K variants
constexpr int32_t kSplits[] = {4, 8, 2, 16};  // in this order: 4 and 8 fill an H100/H200 at decode M
constexpr int64_t kMinSplitDepth = 128;       // K per part below which a split cannot pay for its reduction
// A cuBLASLt winner must beat the default by this fraction: medians of flushed launches still move by ~1-2%, and a
// tie is better left on the path that has always run.
constexpr double kMinGain = 0.03;
constexpr double kNever = std::numeric_limits<double>::infinity();

bool tune_log_enabled() {
  static const bool on = env_choice("MAMBA3_GEMM_TUNE_LOG", {"0", "1"}) == "1";
  return on;
}

// The largest power of two up to 256 (cuBLASLt's default requirement) dividing both the address and the row pitch:
// every row offset into one buffer falls in the same class, so a product split by rows (Context::gemm_row_block,
// per-sequence attention products) keeps one plan, and rows computed apart or together round alike.
uint32_t alignment(const void* p, int64_t pitch_bytes) {
  const uint64_t v = uint64_t(reinterpret_cast<uintptr_t>(p)) | uint64_t(pitch_bytes) | 256u;
  return uint32_t(v & (~v + 1));
}

// What linear() always ran before tuning: cuBLAS's own choice.
// Column-major view: yᵀ (N × M) = W (K × N)ᵀ · xᵀ (K × M).
void default_gemm(cublasHandle_t h, const void* w, const void* x, float* y, const GemmShape& s) {
  const float one = 1.0f, zero = 0.0f;
  MAMBA3_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(s.n), int(s.m), int(s.k), &one, w, CUDA_R_16BF,
                                   int(s.k), x, CUDA_R_16BF, int(s.ldx), &zero, y, CUDA_R_32F, int(s.ldy),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

struct LtDestroy {
  void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayout_t l) const { cublasLtMatrixLayoutDestroy(l); }
  void operator()(cublasLtMatmulPreference_t p) const { cublasLtMatmulPreferenceDestroy(p); }
};
template <typename Handle>
using LtOwned = std::unique_ptr<std::remove_pointer_t<Handle>, LtDestroy>;

LtOwned<cublasLtMatrixLayout_t> make_layout(cudaDataType type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t l = nullptr;
  MAMBA3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, uint64_t(rows), uint64_t(cols), ld));
  return LtOwned<cublasLtMatrixLayout_t>(l);
}

std::string describe(const cublasLtMatmulAlgo_t& a) {
  int32_t id = -1, splits = 1;
  uint32_t tile = 0, stages = 0, scheme = 0;
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &written);
  cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &written);
  cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &written);
  cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof splits, &written);
  cublasLtMatmulAlgoConfigGetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof scheme, &written);
  const char* reduce = scheme == CUBLASLT_REDUCTION_SCHEME_INPLACE         ? " in place"
                       : scheme == CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE  ? " via f32 partials"
                       : scheme == CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE   ? " via output-type partials"
                                                                           : "";
  return fmt::format("cuBLASLt algo {} tile {} stages {} split-K {}{}", id, tile, stages, splits, reduce);
}

// Times launches on a stream with CUDA events, each after an L2 flush: a decode shape's weights often fit in the
// 50-60 MB L2 of an H100/H200 and would otherwise time several times faster than in a model step, where the previous
// layers have evicted them.
class LaunchTimer {
 public:
  static constexpr int kMaxReps = 5;

  LaunchTimer(cudaStream_t stream, size_t l2_bytes) : stream_(stream) {
    flush_bytes_ = l2_bytes ? 2 * l2_bytes : size_t(128) << 20;
    // Without the scratch (memory full), time unflushed rather than fail the caller's product.
    if (cudaMalloc(&flush_, flush_bytes_) != cudaSuccess) {
      cudaGetLastError();
      flush_ = nullptr;
    }
  }
  ~LaunchTimer() {
    if (flush_) cudaFree(flush_);
  }
  LaunchTimer(const LaunchTimer&) = delete;
  LaunchTimer& operator=(const LaunchTimer&) = delete;

  // The median µs of `reps` timed launches after one untimed one (lazy module loading, first touch of the
  // workspace); +inf when `launch` reports that cuBLAS refused it.
  template <typename Launch>
  double median_us(Launch&& launch, int reps) {
    reps = std::clamp(reps, 1, kMaxReps);
    flush();
    if (!launch()) return kNever;
    for (int r = 0; r < reps; ++r) {
      flush();
      MAMBA3_CUDA_CHECK(cudaEventRecord(events_[2 * r].event, stream_));
      if (!launch()) return kNever;
      MAMBA3_CUDA_CHECK(cudaEventRecord(events_[2 * r + 1].event, stream_));
    }
    MAMBA3_CUDA_CHECK(cudaEventSynchronize(events_[2 * reps - 1].event));
    float ms[kMaxReps];
    for (int r = 0; r < reps; ++r)
      MAMBA3_CUDA_CHECK(cudaEventElapsedTime(&ms[r], events_[2 * r].event, events_[2 * r + 1].event));
    std::sort(ms, ms + reps);
    return 1000.0 * double(ms[reps / 2]);
  }

 private:
  struct Event {
    cudaEvent_t event = nullptr;
    Event() { MAMBA3_CUDA_CHECK(cudaEventCreate(&event)); }
    ~Event() {
      if (event) cudaEventDestroy(event);
    }
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
  };

  void flush() {
    if (flush_) MAMBA3_CUDA_CHECK(cudaMemsetAsync(flush_, 0, flush_bytes_, stream_));
  }

  cudaStream_t stream_;
  Event events_[2 * kMaxReps];
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
};

}  // namespace

// The cuBLASLt descriptors of one shape, in default_gemm's column-major view (y is both C and D).
struct LtProblem {
  LtOwned<cublasLtMatmulDesc_t> op;
  LtOwned<cublasLtMatrixLayout_t> a, b, c;  // W (K × N, transposed), x (K × M, ld ldx), y (N × M, ld ldy)

  explicit LtProblem(const GemmShape& s) {
    cublasLtMatmulDesc_t d = nullptr;
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    op.reset(d);
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    a = make_layout(CUDA_R_16BF, s.k, s.n, s.k);
    b = make_layout(CUDA_R_16BF, s.k, s.m, s.ldx);
    c = make_layout(CUDA_R_32F, s.n, s.m, s.ldy);
  }

  cublasStatus_t matmul(cublasLtHandle_t lt, const cublasLtMatmulAlgo_t& algo, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream, const void* w, const void* x, float* y) const {
    const float one = 1.0f, zero = 0.0f;
    return cublasLtMatmul(lt, op.get(), &one, w, a.get(), x, b.get(), &zero, y, c.get(), y, c.get(), &algo, workspace,
                          workspace_bytes, stream);
  }

  // Up to `count` of cuBLASLt's ranked candidates that run on operands of the key's alignment within the workspace.
  std::vector<cublasLtMatmulAlgo_t> heuristic(cublasLtHandle_t lt, size_t workspace_bytes, uint32_t align_w,
                                              uint32_t align_x, uint32_t align_y, int count) const {
    cublasLtMatmulPreference_t raw = nullptr;
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw));
    const LtOwned<cublasLtMatmulPreference_t> pref(raw);
    const uint64_t ws = workspace_bytes;
    MAMBA3_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(raw, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_y},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_y}};
    for (const auto& [attr, bytes] : aligns)
      MAMBA3_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(raw, attr, &bytes, sizeof bytes));
    std::vector<cublasLtMatmulHeuristicResult_t> results(size_t(std::max(count, 1)));
    int returned = 0;
    // NOT_SUPPORTED (no algorithm for this problem) leaves the shape on the default, like any empty answer.
    if (cublasLtMatmulAlgoGetHeuristic(lt, op.get(), a.get(), b.get(), c.get(), c.get(), pref.get(), count,
                                       results.data(), &returned) != CUBLAS_STATUS_SUCCESS)
      returned = 0;
    std::vector<cublasLtMatmulAlgo_t> algos;
    for (int i = 0; i < returned; ++i)
      if (results[size_t(i)].state == CUBLAS_STATUS_SUCCESS && results[size_t(i)].workspaceSize <= workspace_bytes)
        algos.push_back(results[size_t(i)].algo);
    return algos;
  }

  // `algo` with K split in `splits` parts, reduced by the first scheme it supports (in place in y first: no extra
  // pass over partials), when cuBLASLt accepts that for this problem within the workspace.
  bool split_variant(cublasLtHandle_t lt, size_t workspace_bytes, const cublasLtMatmulAlgo_t& algo, int32_t splits,
                     cublasLtMatmulAlgo_t& out) const {
    int32_t support = 0;
    uint32_t schemes = 0;
    size_t written = 0;
    if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &support, sizeof support,
                                          &written) != CUBLAS_STATUS_SUCCESS ||
        !support ||
        cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes,
                                          &written) != CUBLAS_STATUS_SUCCESS)
      return false;
    uint32_t scheme = 0;
    for (uint32_t candidate : {CUBLASLT_REDUCTION_SCHEME_INPLACE, CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE,
                               CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE})
      if (schemes & candidate) {
        scheme = candidate;
        break;
      }
    if (!scheme) return false;
    out = algo;
    cublasLtMatmulHeuristicResult_t check{};
    return cublasLtMatmulAlgoConfigSetAttribute(&out, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof splits) ==
               CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulAlgoConfigSetAttribute(&out, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                                sizeof scheme) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulAlgoCheck(lt, op.get(), a.get(), b.get(), c.get(), c.get(), &out, &check) ==
               CUBLAS_STATUS_SUCCESS &&
           check.state == CUBLAS_STATUS_SUCCESS && check.workspaceSize <= workspace_bytes;
  }
};

struct GemmTuner::Plan {
  std::unique_ptr<LtProblem> problem;  // null: cublasGemmEx's default
  cublasLtMatmulAlgo_t algo{};
};

bool gemm_tune_enabled() {
  static const bool on = env_choice("MAMBA3_GEMM_TUNE", {"0", "1"}) == "1";
  return on;
}

void gemm_bf16(const Context& ctx, const void* w, const void* x, float* y, const GemmShape& s) {
  if (gemm_tune_enabled())
    ctx.gemm_tuner().matmul(w, x, y, s);
  else
    default_gemm(ctx.cublas(), w, x, y, s);
}

GemmTuner::GemmTuner(cudaStream_t stream, cublasHandle_t cublas, cublasLtHandle_t lt, void* workspace,
                     size_t workspace_bytes, size_t l2_bytes)
    : stream_(stream), cublas_(cublas), lt_(lt), workspace_(workspace), workspace_bytes_(workspace_bytes),
      l2_bytes_(l2_bytes) {}

GemmTuner::~GemmTuner() = default;

GemmTuner::Key GemmTuner::key_of(const void* w, const void* x, const float* y, const GemmShape& s) {
  return {s.n, s.k, s.m, s.ldx, s.ldy, alignment(w, 2 * s.k), alignment(x, 2 * s.ldx), alignment(y, 4 * s.ldy)};
}

GemmTuner::Choice GemmTuner::choice(const void* w, const void* x, const float* y, const GemmShape& s) const {
  const auto it = plans_.find(key_of(w, x, y, s));
  if (it == plans_.end()) return Choice::Untuned;
  return it->second->problem ? Choice::Tuned : Choice::Default;
}

void GemmTuner::matmul(const void* w, const void* x, float* y, const GemmShape& s) {
  if (s.m <= 0 || s.n <= 0 || s.k <= 0) return default_gemm(cublas_, w, x, y, s);  // nothing to tune (k = 0: y = 0)
  const Key key = key_of(w, x, y, s);
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    MAMBA3_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
    std::unique_ptr<Plan> plan;
    if (capture == cudaStreamCaptureStatusNone) {
      plan = tune(key, w, x, y, s);
    } else {
      plan = std::make_unique<Plan>();  // pinned to the default (see the class comment)
      if (tune_log_enabled())
        std::fputs(fmt::format("gemm tune n={} k={} m={} ldx={} ldy={}: first call inside a graph capture, pinned to "
                               "the default\n",
                               s.n, s.k, s.m, s.ldx, s.ldy)
                       .c_str(),
                   stderr);
    }
    it = plans_.emplace(key, std::move(plan)).first;
  }
  run(*it->second, w, x, y, s);
}

void GemmTuner::run(const Plan& plan, const void* w, const void* x, float* y, const GemmShape& s) const {
  if (!plan.problem) return default_gemm(cublas_, w, x, y, s);
  MAMBA3_CUBLAS_CHECK(plan.problem->matmul(lt_, plan.algo, workspace_, workspace_bytes_, stream_, w, x, y));
}

std::unique_ptr<GemmTuner::Plan> GemmTuner::tune(const Key& key, const void* w, const void* x, float* y,
                                                 const GemmShape& s) {
  const auto started = std::chrono::steady_clock::now();
  ++tunings_;
  LaunchTimer timer(stream_, l2_bytes_);
  const double default_us = timer.median_us(
      [&] {
        default_gemm(cublas_, w, x, y, s);
        return true;
      },
      3);
  // Long products (prefill, lm_head at large M) get fewer reps and candidates, so a shape costs about kBudgetUs.
  const int reps = default_us < 100 ? 5 : default_us < 1000 ? 3 : 1;
  const int max_candidates =
      std::clamp(int(kBudgetUs / ((1 + reps) * (default_us + kFlushUs))), 2, kMaxCandidates);

  auto problem = std::make_unique<LtProblem>(s);
  struct Timed {
    cublasLtMatmulAlgo_t algo;
    double us;
  };
  std::vector<Timed> timed;
  auto try_algo = [&](const cublasLtMatmulAlgo_t& algo) {
    for (const Timed& t : timed)
      if (std::memcmp(&t.algo, &algo, sizeof algo) == 0) return;
    const double us = timer.median_us(
        [&] {
          return problem->matmul(lt_, algo, workspace_, workspace_bytes_, stream_, w, x, y) == CUBLAS_STATUS_SUCCESS;
        },
        reps);
    timed.push_back({algo, us});
  };
  // The heuristic's first two thirds, then split-K variants of the fastest of them (the heuristic's own list rarely
  // splits K at decode M), then the heuristic's rest while the cap allows (algorithms without split-K support).
  const std::vector<cublasLtMatmulAlgo_t> ranked =
      problem->heuristic(lt_, workspace_bytes_, key.align_w, key.align_x, key.align_y, max_candidates);
  const size_t first = std::min(ranked.size(), size_t(max_candidates - max_candidates / 3));
  for (size_t i = 0; i < first; ++i) try_algo(ranked[i]);
  std::vector<Timed> sources = timed;
  std::sort(sources.begin(), sources.end(), [](const Timed& a, const Timed& b) { return a.us < b.us; });
  sources.resize(std::min(sources.size(), size_t(kSplitSources)));
  for (int32_t splits : kSplits)
    for (const Timed& source : sources) {
      cublasLtMatmulAlgo_t variant;
      if (int(timed.size()) >= max_candidates || source.us == kNever || s.k < splits * kMinSplitDepth ||
          !problem->split_variant(lt_, workspace_bytes_, source.algo, splits, variant))
        continue;
      try_algo(variant);
    }
  for (size_t i = first; i < ranked.size() && int(timed.size()) < max_candidates; ++i) try_algo(ranked[i]);

  auto plan = std::make_unique<Plan>();
  const auto best = std::min_element(timed.begin(), timed.end(), [](const Timed& a, const Timed& b) {
    return a.us < b.us;
  });
  const bool lt_wins = best != timed.end() && best->us < default_us * (1 - kMinGain);
  if (lt_wins) {
    plan->problem = std::move(problem);
    plan->algo = best->algo;
  }
  if (tune_log_enabled()) {
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
    const std::string head = fmt::format("gemm tune n={} k={} m={} ldx={} ldy={} align {}/{}/{}: default {:.1f} us, ",
                                         s.n, s.k, s.m, s.ldx, s.ldy, key.align_w, key.align_x, key.align_y,
                                         default_us);
    const std::string result =
        lt_wins ? fmt::format("winner {:.1f} us ({:.2f}x, {})", best->us, default_us / best->us, describe(best->algo))
        : best != timed.end() && best->us != kNever
            ? fmt::format("kept (best cuBLASLt {:.1f} us, {})", best->us, describe(best->algo))
            : std::string("kept (no cuBLASLt candidate)");
    std::fputs(fmt::format("{}{}; {} candidates, {} reps, {:.1f} ms\n", head, result, timed.size(), reps, ms).c_str(),
               stderr);
  }
  return plan;
}

}  // namespace mamba3::cuda
