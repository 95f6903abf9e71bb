// `mamba3 serve`: the OpenAI-compatible HTTP server (continuous batching, state reuse) over one model directory.
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "commands.h"
#include "core/parallel.h"
#include "model/language_model.h"
#include "server/cpu_backend.h"
#include "server/http_server.h"
#include "tokenizer/tokenizer.h"
#ifdef MAMBA3_HAVE_SERVER_CUDA
#include "server/cuda_backend.h"
#endif

namespace mamba3::cli {

namespace {

struct ServeArgs {
  std::string model, host = "127.0.0.1", device = "auto", precision = "bf16", state_precision = "f32", api_key, alias;
  int port = 8080, threads = 0, http_threads = 0;
  server::EngineOptions engine;
  server::ServerLimits limits;
  int64_t state_cache_mb = 1024, max_body_kb = 1024;
};

void run(ServeArgs& a) {
  MAMBA3_CHECK(a.device == "auto" || a.device == "cpu" || a.device == "cuda",
               "--device must be auto, cpu or cuda (got '{}')", a.device);
#ifdef MAMBA3_HAVE_SERVER_CUDA
  // auto: the GPU when this build has the CUDA backend and the driver reports a device, else the CPU.
  const cuda::DeviceInfo gpu = cuda::device_info();
  if (a.device == "auto") a.device = gpu.available ? "cuda" : "cpu";
  MAMBA3_CHECK(a.device == "cpu" || gpu.available, "--device cuda: no usable CUDA device ({})", gpu.why_not);
#else
  if (a.device == "auto") a.device = "cpu";
  MAMBA3_CHECK(a.device == "cpu", "--device cuda: this build of mamba3 has no CUDA backend (nvcc was not found when it "
               "was configured); rebuild with the CUDA toolkit, or serve with --device cpu");
#endif
  MAMBA3_CHECK(a.state_precision == "f32" || a.state_precision == "bf16",
               "--state-precision: '{}' is not one of f32, bf16", a.state_precision);
  MAMBA3_CHECK(a.device == "cuda" || a.state_precision == "f32",
               "--state-precision bf16: only the CUDA backend stores a bf16 state (the CPU keeps f32); serve with "
               "--device cuda, or measure what it costs with `mamba3 eval --state-precision bf16`");
  MAMBA3_CHECK(a.port >= 0 && a.port <= 65535, "--port: {} is not a TCP port", a.port);
  MAMBA3_CHECK(a.state_cache_mb >= 0 && a.max_body_kb >= 1, "--state-cache-mb must be >= 0 and --max-body-kb >= 1");
  if (a.threads > 0) set_threads(a.threads);
  namespace fs = std::filesystem;
  // The model on its device, and the engine's backend over it.
  std::unique_ptr<LanguageModel> cpu_model;
#ifdef MAMBA3_HAVE_SERVER_CUDA
  std::unique_ptr<cuda::CudaModel> gpu_model;
#endif
  std::unique_ptr<server::EngineBackend> backend;
  if (a.device == "cpu") {
    cpu_model = std::make_unique<LanguageModel>(LanguageModel::load(a.model));
    backend = std::make_unique<server::CpuBackend>(*cpu_model, a.engine.lane_rows);
  } else {
#ifdef MAMBA3_HAVE_SERVER_CUDA
    const cuda::Precision state = cuda::parse_precision(a.state_precision);
    gpu_model = std::make_unique<cuda::CudaModel>(cuda::CudaModel::load(a.model, cuda::parse_precision(a.precision)));
    gpu_model->set_state_precision(state);
    // Batched prefill stays exact: fixed 256-row matrix products, so a prompt's results do not depend on its company.
    if (a.engine.prefill_batch > 1) gpu_model->set_prefill_row_block(256);
    // Every slot holds a whole sequence: the longest prompt plus the most tokens a request may ask for.
    backend = std::make_unique<server::CudaBackend>(*gpu_model, a.engine.max_batch,
                                                    a.limits.max_prompt_tokens + a.limits.max_tokens);
#endif
  }
  Tokenizer tok = fs::exists(fs::path(a.model) / "tokenizer.json") || fs::exists(fs::path(a.model) / "tokenizer.model")
                      ? Tokenizer::from_model_dir(a.model)
                      : Tokenizer::bytes();
  if (tok.kind() == Tokenizer::Kind::Bytes)
    std::fprintf(stderr, "note: no tokenizer in %s: bytes are token ids (0-255)\n", a.model.c_str());
  server::ChatTemplate tmpl = server::ChatTemplate::from_model_dir(a.model);
  a.engine.state_cache_bytes = size_t(a.state_cache_mb) << 20;
  server::ServerOptions so;
  so.host = a.host, so.port = a.port, so.api_key = a.api_key, so.threads = a.http_threads, so.limits = a.limits;
  so.max_body_bytes = size_t(a.max_body_kb) << 10;
  so.model_name = !a.alias.empty() ? a.alias : fs::path(a.model).lexically_normal().filename().string();
  if (so.model_name.empty()) so.model_name = fs::path(a.model).lexically_normal().parent_path().filename().string();

  // SIGINT/SIGTERM are taken by sigwait below (blocked before any thread starts, so every thread inherits that).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  server::Engine engine(std::move(backend), tok, a.engine);
  server::HttpServer http(engine, tok, tmpl, so);
  http.start();
  std::fprintf(stderr, "mamba3 serve: model '%s' (%s) on %s, chat template %s, listening on http://%s:%d%s\n",
               so.model_name.c_str(), a.model.c_str(), a.device.c_str(), tmpl.from_file ? "chat_template.json" : "default",
               a.host.c_str(), http.port(), a.api_key.empty() ? "" : " (API key required)");
  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "mamba3 serve: signal %d, stopping\n", sig);
  http.stop();
  engine.stop();
}

}  // namespace

void register_serve(CLI::App& app) {
  static ServeArgs a;
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server with continuous batching and state reuse");
  cmd->add_option("-m,--model", a.model, "model directory (config.json + weights [+ tokenizer])")->required();
  cmd->add_option("--host", a.host, "address to bind")->capture_default_str();
  cmd->add_option("--port", a.port, "TCP port (0: any free port, printed on stderr)")->capture_default_str();
  cmd->add_option("--device", a.device,
                  "auto (cuda when built and a GPU is present, else cpu), cpu, or cuda (one GPU; --max-batch slots)")
      ->capture_default_str();
  cmd->add_option("--precision", a.precision, "cuda: bf16 (weights and matrix inputs) or f32 (exact mode)")
      ->capture_default_str();
  cmd->add_option("--state-precision", a.state_precision,
                  "cuda: the Mamba-3 ssm state, f32 or bf16 (half the state memory and traffic; rounded every step)")
      ->capture_default_str();
  cmd->add_option("--api-key", a.api_key, "require 'Authorization: Bearer KEY' (except /health)");
  cmd->add_option("--alias", a.alias, "model name in the API (default: the directory name)");
  cmd->add_option("--max-batch", a.engine.max_batch, "sequences decoded together")->capture_default_str();
  cmd->add_option("--max-queue", a.engine.max_queue, "requests waiting beyond the batch (then 429)")
      ->capture_default_str();
  cmd->add_option("--lane-rows", a.engine.lane_rows,
                  "cpu: rows per decode call (<= 16: batch-invariant results; larger: BLAS, faster, not bit-exact)")
      ->capture_default_str();
  cmd->add_option("--prefill-block", a.engine.prefill_block, "prompt segment length (state reuse granularity)")
      ->capture_default_str();
  cmd->add_option("--prefill-batch", a.engine.prefill_batch,
                  "cuda: prompts prefilled in one call (more than 1: faster under load; the prefill's matrix products "
                  "then run in fixed 256-row blocks so that outputs stay those of requests sent alone)")
      ->capture_default_str();
  cmd->add_option("--prefill-budget", a.engine.prefill_budget, "prompt tokens prefilled between decode steps")
      ->capture_default_str();
  cmd->add_option("--state-cache-mb", a.state_cache_mb, "memory for cached prompt states (0 = off)")
      ->capture_default_str();
  cmd->add_option("--max-prompt-tokens", a.limits.max_prompt_tokens, "longest prompt accepted")->capture_default_str();
  cmd->add_option("--max-tokens", a.limits.max_tokens, "largest max_tokens accepted")->capture_default_str();
  cmd->add_option("--max-n", a.limits.max_n, "largest n accepted")->capture_default_str();
  cmd->add_option("--max-body-kb", a.max_body_kb, "largest request body")->capture_default_str();
  cmd->add_option("--threads", a.threads, "CPU threads for the model (default: all cores)");
  cmd->add_option("--http-threads", a.http_threads, "HTTP worker threads (default: max-batch + max-queue + 8)");
  cmd->callback([] { run(a); });
}

}  // namespace mamba3::cli
