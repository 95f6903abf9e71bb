#include "cuda/train/train_gemm_algos.h"

#include <cublas_v2.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/cuda_context.h"

namespace mamba3::cuda {

namespace {

constexpr const char* kFormat = "mamba3-train-gemm-algos";
constexpr int kFormatVersion = 1;

std::string this_device() {
  const DeviceInfo info = device_info();
  return info.available ? info.name : std::string();
}

std::string to_hex(const cublasLtMatmulAlgo_t& a) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(&a);
  std::string s;
  for (size_t i = 0; i < sizeof a; ++i) s += fmt::format("{:02x}", bytes[i]);
  return s;
}

bool from_hex(const std::string& s, cublasLtMatmulAlgo_t& a) {
  if (s.size() != 2 * sizeof a) return false;
  auto* bytes = reinterpret_cast<unsigned char*>(&a);
  for (size_t i = 0; i < sizeof a; ++i) {
    unsigned v = 0;
    for (int h = 0; h < 2; ++h) {
      const char ch = s[2 * i + size_t(h)];
      const int d = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
      if (d < 0) return false;
      v = v * 16 + unsigned(d);
    }
    bytes[i] = static_cast<unsigned char>(v);
  }
  return true;
}

// The readable part of an algorithm (for the file's reader; loading uses the bytes).
nlohmann::json describe(const cublasLtMatmulAlgo_t& a) {
  auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attr, auto zero) {
    decltype(zero) v = zero;
    size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(&a, attr, &v, sizeof v, &written) != CUBLAS_STATUS_SUCCESS) v = zero;
    return int64_t(v);
  };
  return {{"id", get(CUBLASLT_ALGO_CONFIG_ID, int32_t(0))},
          {"tile", get(CUBLASLT_ALGO_CONFIG_TILE_ID, uint32_t(0))},
          {"stages", get(CUBLASLT_ALGO_CONFIG_STAGES_ID, uint32_t(0))},
          {"splitk", get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM, int32_t(0))},
          {"reduction", get(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, uint32_t(0))},
          {"swizzle", get(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, uint32_t(0))},
          {"cluster", get(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, uint16_t(0))}};
}

// Descriptors of a product in TrainGemm's convention: row-major C = op(A)·op(B) is column-major
// Cᵀ = op(B)ᵀ·op(A)ᵀ, so B is cuBLASLt's A with B's own transpose flag.
struct Descriptors {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  explicit Descriptors(const GemmCall& c) {
    const cublasOperation_t oa = c.tb ? CUBLAS_OP_T : CUBLAS_OP_N, ob = c.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof oa));
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof ob));
    MAMBA3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, uint64_t(c.tb ? c.k : c.n),
                                                   uint64_t(c.tb ? c.n : c.k), c.ldb));
    MAMBA3_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, uint64_t(c.ta ? c.m : c.k),
                                                   uint64_t(c.ta ? c.k : c.m), c.lda));
    MAMBA3_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&lc, c.bf16_out ? CUDA_R_16BF : CUDA_R_32F, uint64_t(c.n), uint64_t(c.m), c.ldc));
  }
  ~Descriptors() {
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatmulDescDestroy(desc);
  }
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
};

std::string shape_text(const GemmCall& c) {
  return fmt::format("{}{}×{} · {}{}×{} {} {} (lda {}, ldb {}, ldc {})", c.ta ? "Aᵀ" : "A ", c.m, c.k,
                     c.tb ? "Bᵀ" : "B ", c.k, c.n, c.accumulate ? "+=" : "→", c.bf16_out ? "bf16" : "f32", c.lda, c.ldb,
                     c.ldc);
}

struct ProcessTable {
  std::mutex mutex;
  bool env_read = false;
  std::shared_ptr<const GemmAlgoTable> table;
};

ProcessTable& process_table() {
  static ProcessTable p;
  return p;
}

}  // namespace

GemmAlgoTable::GemmAlgoTable() : device_(this_device()), version_(cublasLtGetVersion()) {}

const TunedAlgo* GemmAlgoTable::find(const GemmCall& c) const {
  auto it = entries_.find(gemm_key(c));
  return it == entries_.end() ? nullptr : &it->second.second;
}

void GemmAlgoTable::save(const std::string& path) const {
  nlohmann::json products = nlohmann::json::array();
  for (const auto& [k, entry] : entries_) {
    const auto& [c, a] = entry;
    products.push_back({{"ta", c.ta},
                        {"tb", c.tb},
                        {"bf16_out", c.bf16_out},
                        {"accumulate", c.accumulate},
                        {"m", c.m},
                        {"n", c.n},
                        {"k", c.k},
                        {"lda", c.lda},
                        {"ldb", c.ldb},
                        {"ldc", c.ldc},
                        {"algo", to_hex(a.algo)},
                        {"config", describe(a.algo)},
                        {"default_us", a.default_us},
                        {"tuned_us", a.tuned_us}});
  }
  const nlohmann::json j = {{"format", kFormat},     {"version", kFormatVersion}, {"device", device_},
                            {"cublaslt_version", version_}, {"products", products}};
  AtomicFile out(path);
  out.write(j.dump(1) + "\n");
  out.commit();
}

GemmAlgoTable GemmAlgoTable::load(const std::string& path) {
  std::ifstream in(path);
  MAMBA3_CHECK(in.good(), "{}: cannot read the GEMM algorithm table (MAMBA3_TRAIN_GEMM_ALGOS)", path);
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not a JSON GEMM algorithm table: {}", path, e.what());
  }
  MAMBA3_CHECK(j.is_object() && j.value("format", "") == kFormat,
               "{}: field 'format' must be \"{}\" (a file written by `mamba3 bench --train --tune-gemm`)", path,
               kFormat);
  MAMBA3_CHECK(j.value("version", 0) == kFormatVersion, "{}: field 'version' must be {}", path, kFormatVersion);
  GemmAlgoTable t;
  t.source_ = path;
  const std::string device = j.value("device", "");
  MAMBA3_CHECK(device == t.device_, "{}: tuned on '{}', this device is '{}': tune again on this device", path, device,
               t.device_);
  const size_t version = j.value("cublaslt_version", size_t(0));
  MAMBA3_CHECK(version == t.version_,
               "{}: tuned with cuBLASLt {}, this process has {}: stored algorithms are valid only with the same "
               "version; tune again",
               path, version, t.version_);
  MAMBA3_CHECK(j.contains("products") && j["products"].is_array(), "{}: field 'products' must be an array", path);
  size_t index = 0;
  for (const auto& p : j["products"]) {
    const std::string where = fmt::format("{}: products[{}]", path, index++);
    try {
      GemmCall c;
      c.ta = p.at("ta").get<bool>(), c.tb = p.at("tb").get<bool>();
      c.bf16_out = p.at("bf16_out").get<bool>(), c.accumulate = p.at("accumulate").get<bool>();
      c.m = p.at("m").get<int64_t>(), c.n = p.at("n").get<int64_t>(), c.k = p.at("k").get<int64_t>();
      c.lda = p.at("lda").get<int64_t>(), c.ldb = p.at("ldb").get<int64_t>(), c.ldc = p.at("ldc").get<int64_t>();
      MAMBA3_CHECK(c.m > 0 && c.n > 0 && c.k > 0 && c.lda > 0 && c.ldb > 0 && c.ldc > 0,
                   "{}: sizes and strides must be positive", where);
      TunedAlgo a;
      MAMBA3_CHECK(from_hex(p.at("algo").get<std::string>(), a.algo), "{}: field 'algo' must be {} hex digits",
                   where, 2 * sizeof a.algo);
      a.default_us = p.value("default_us", 0.0), a.tuned_us = p.value("tuned_us", 0.0);
      t.set(c, a);
    } catch (const nlohmann::json::exception& e) {
      fail("{}: {}", where, e.what());
    }
  }
  return t;
}

std::shared_ptr<const GemmAlgoTable> process_gemm_algos() {
  ProcessTable& p = process_table();
  std::lock_guard<std::mutex> lock(p.mutex);
  if (!p.env_read) {
    p.env_read = true;
    const char* path = std::getenv("MAMBA3_TRAIN_GEMM_ALGOS");
    if (path != nullptr && *path != '\0' && !p.table)
      p.table = std::make_shared<const GemmAlgoTable>(GemmAlgoTable::load(path));
  }
  return p.table;
}

void set_process_gemm_algos(std::shared_ptr<const GemmAlgoTable> table) {
  ProcessTable& p = process_table();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.env_read = true;  // an explicit table replaces the environment's
  p.table = std::move(table);
}

std::vector<cublasLtMatmulAlgo_t> lt_candidates(cublasLtHandle_t lt, const GemmCall& c, int count,
                                                size_t workspace_bytes) {
  const Descriptors d(c);
  cublasLtMatmulPreference_t pref = nullptr;
  MAMBA3_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = workspace_bytes;
  MAMBA3_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                           sizeof ws));
  // Algorithms that run on operands aligned to kLtAlignment bytes (cuBLASLt assumes 256 unless told): training passes
  // column blocks of wider buffers.
  const uint32_t align = kLtAlignment;
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    MAMBA3_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof align));
  std::vector<cublasLtMatmulHeuristicResult_t> results(size_t(std::max(count, 1)));
  int returned = 0;
  if (cublasLtMatmulAlgoGetHeuristic(lt, d.desc, d.la, d.lb, d.lc, d.lc, pref, count, results.data(), &returned) !=
      CUBLAS_STATUS_SUCCESS)
    returned = 0;
  cublasLtMatmulPreferenceDestroy(pref);
  std::vector<cublasLtMatmulAlgo_t> algos;
  for (int i = 0; i < returned; ++i)
    if (results[size_t(i)].state == CUBLAS_STATUS_SUCCESS) algos.push_back(results[size_t(i)].algo);
  return algos;
}

struct LtRunner::Plan {
  explicit Plan(const GemmCall& c) : d(c) {}
  Descriptors d;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

LtRunner::LtRunner(std::shared_ptr<const GemmAlgoTable> table) : table_(std::move(table)) {
  MAMBA3_CUBLAS_CHECK(cublasLtCreate(&lt_));
}

LtRunner::~LtRunner() {
  plans_.clear();
  if (lt_) cublasLtDestroy(lt_);
}

bool LtRunner::run(const Context& ctx, const GemmCall& c, float alpha, float beta, const void* A, const void* B,
                   void* C) {
  const GemmKey key = gemm_key(c);
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    const TunedAlgo* tuned = table_ ? table_->find(c) : nullptr;
    std::unique_ptr<Plan> plan;
    if (tuned) {
      plan = std::make_unique<Plan>(c);
      plan->algo = tuned->algo;
      cublasLtMatmulHeuristicResult_t check{};
      const cublasStatus_t st =
          cublasLtMatmulAlgoCheck(lt_, plan->d.desc, plan->d.la, plan->d.lb, plan->d.lc, plan->d.lc, &plan->algo, &check);
      MAMBA3_CHECK(st == CUBLAS_STATUS_SUCCESS,
                   "{}: cuBLASLt refuses the stored algorithm for {} (status {}): tune again",
                   table_->source().empty() ? std::string("the GEMM algorithm table") : table_->source(),
                   shape_text(c), int(st));
      plan->workspace = check.workspaceSize;
      if (plan->workspace > workspace_.bytes()) {
        MAMBA3_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));  // the old workspace may still be in use
        workspace_.resize(plan->workspace);
      }
    }
    it = plans_.emplace(key, std::move(plan)).first;
  }
  const Plan* plan = it->second.get();
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kLtAlignment == 0; };
  if (!plan || !aligned(A) || !aligned(B) || !aligned(C)) return false;
  MAMBA3_CUBLAS_CHECK(cublasLtMatmul(lt_, plan->d.desc, &alpha, B, plan->d.la, A, plan->d.lb, &beta, C, plan->d.lc, C,
                                     plan->d.lc, &plan->algo, plan->workspace ? workspace_.raw() : nullptr,
                                     plan->workspace, ctx.stream()));
  ++calls_;
  return true;
}

}  // namespace mamba3::cuda
