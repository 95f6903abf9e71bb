// Server benchmark: a random-initialised Mamba-3 model behind the real HTTP server (in-process, loopback), C
// concurrent streaming clients each sending one request; reports generated tokens/s, p50/p99 time to first token
// and inter-token latency, next to the same requests sent one at a time.
//   bench_server [--device cpu|cuda] [--preset 130m|tiny|1.5b] [--concurrency 1,8,64,256] [--prompt 16]
//                [--max-tokens 16] [--lane-rows 16] [--sequential 4] [--precision bf16|f32] [--prefill-batch 1]
// On cuda the engine has max_batch = C decode slots (the one-by-one baseline: 1 slot).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "model/init_weights.h"
#include "model/language_model.h"
#include "server/cpu_backend.h"
#include "server/http_server.h"
#ifdef MAMBA3_HAVE_CUDA
#include "server/cuda_backend.h"
#endif

using namespace mamba3;
using Clock = std::chrono::steady_clock;

namespace {

struct RequestTimes {
  double start = 0, first = -1, end = 0;
  std::vector<double> tokens;  // arrival time of each token event
};

double pct(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(p * double(v.size() - 1) + 0.5))];
}

RequestTimes one_request(int port, const std::string& body, Clock::time_point t0) {
  RequestTimes t;
  auto now = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(600);
  c.set_tcp_nodelay(true);
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body;
  req.set_header("Content-Type", "application/json");
  std::string pending;
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    const double at = now();
    pending.append(d, n);
    for (size_t e; (e = pending.find("\n\n")) != std::string::npos; pending.erase(0, e + 2)) {
      if (pending.compare(0, 6, "data: ") != 0 || pending.compare(0, 12, "data: [DONE]") == 0) continue;
      // One event per generated token (the bench's tokenizer gives every id a text).
      if (t.first < 0) t.first = at;
      t.tokens.push_back(at);
    }
    return true;
  };
  httplib::Response res;
  httplib::Error err;
  t.start = now();
  if (!c.send(req, res, err) || res.status != 200)
    std::fprintf(stderr, "request failed: %s %d\n", httplib::to_string(err).c_str(), res.status);
  t.end = now();
  return t;
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream in(s);
  for (std::string x; std::getline(in, x, ',');) v.push_back(std::stoi(x));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "130m", device = "cpu", precision = "bf16";
  std::vector<int> concurrency = {1, 8, 64, 256};
  int prompt = 16, max_tokens = 16, lane_rows = 16, sequential = 4, prefill_batch = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--preset") preset = v;
    else if (k == "--device") device = v;
    else if (k == "--precision") precision = v;
    else if (k == "--concurrency") concurrency = parse_list(v);
    else if (k == "--prompt") prompt = std::stoi(v);
    else if (k == "--max-tokens") max_tokens = std::stoi(v);
    else if (k == "--lane-rows") lane_rows = std::stoi(v);
    else if (k == "--sequential") sequential = std::stoi(v);
    else if (k == "--prefill-batch") prefill_batch = std::stoi(v);
    else { std::fprintf(stderr, "unknown flag %s\n", k.c_str()); return 2; }
  }
  const bool tiny = preset == "tiny", big = preset == "1.5b";
  if (!tiny && !big && preset != "130m") {
    std::fprintf(stderr, "unknown preset %s (130m, tiny, 1.5b)\n", preset.c_str());
    return 2;
  }
  nlohmann::json cfg = {{"d_model", tiny ? 128 : 768}, {"n_layer", tiny ? 2 : 24}, {"vocab_size", tiny ? 512 : 50277},
                        {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", tiny ? 16 : 128}, {"headdim", tiny ? 16 : 64}}}};
  if (big)  // the 1.5B class of the paper's speed table (as `mamba3 bench --device cuda --preset 1.5b`)
    cfg = {{"d_model", 2048}, {"n_layer", 24}, {"vocab_size", 128256}, {"d_intermediate", 4096},
           {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 128}, {"headdim", 64}, {"expand", 2}}},
           {"tie_embeddings", true}};
  const ModelConfig c = ModelConfig::from_json(cfg, "bench preset " + preset);
  const auto built_from = Clock::now();
  std::unique_ptr<LanguageModel> model;
  double params = 0;
#ifdef MAMBA3_HAVE_CUDA
  std::unique_ptr<cuda::CudaModel> gpu;
#endif
  if (device == "cpu") {
    model = std::make_unique<LanguageModel>(c, init_weights(c, 1, InitStreams::Parallel), "random " + preset);
    params = double(model->parameter_count());
  } else if (device == "cuda") {
#ifdef MAMBA3_HAVE_CUDA
    const TensorMap w = init_weights(c, 1, InitStreams::Parallel);
    for (const auto& [name, t] : w) params += double(t.numel());
    gpu = std::make_unique<cuda::CudaModel>(c, w, "random " + preset, cuda::parse_precision(precision));
    if (prefill_batch > 1) gpu->set_prefill_row_block(256);  // as `mamba3 serve --prefill-batch`
#else
    std::fprintf(stderr, "this build has no CUDA backend\n");
    return 2;
#endif
  } else {
    std::fprintf(stderr, "unknown device %s (cpu, cuda)\n", device.c_str());
    return 2;
  }
  std::fprintf(stderr, "bench_server: model ready in %.1f s\n",
               std::chrono::duration<double>(Clock::now() - built_from).count());
  // A fresh engine per row of the table: on cuda its decode slots are max_batch.
  auto make_engine = [&](const Tokenizer& tok, server::EngineOptions eo) {
    std::unique_ptr<server::EngineBackend> backend;
#ifdef MAMBA3_HAVE_CUDA
    if (gpu) backend = std::make_unique<server::CudaBackend>(*gpu, eo.max_batch, int64_t(prompt + max_tokens + 1));
#endif
    if (!backend) backend = std::make_unique<server::CpuBackend>(*model, eo.lane_rows);
    return std::make_unique<server::Engine>(std::move(backend), tok, eo);
  };
  // Bytes plus one named special per remaining id, so that every sampled id is a visible token event.
  std::vector<std::string> specials;
  for (int64_t id = 256; id < c.vocab_size; ++id) specials.push_back("<t" + std::to_string(id) + ">");
  const Tokenizer tok = Tokenizer::bytes(specials);
  std::printf("bench_server: %s (%.1fM parameters) on %s, prompt %d tokens, %d generated per request, prefill batch %d%s\n",
              preset.c_str(), params / 1e6, device.c_str(), prompt, max_tokens, prefill_batch,
              device == "cpu" ? (", lanes of " + std::to_string(lane_rows) + " rows").c_str() : "");
  std::fflush(stdout);  // every line reaches a pipe at once (a run cut short by a time limit keeps its rows)
  std::printf("%8s %9s %11s %10s %10s %10s %10s %14s\n", "clients", "requests", "tokens/s", "TTFT p50", "TTFT p99",
              "ITL p50", "ITL p99", "vs one-by-one");
  std::mt19937 rng(11);
  auto body_for = [&](int i) {
    nlohmann::json ids = nlohmann::json::array();
    for (int k = 0; k < prompt; ++k) ids.push_back(int(rng() % 256));
    return nlohmann::json{{"prompt", ids}, {"max_tokens", max_tokens}, {"stream", true}, {"seed", i},
                          {"temperature", 0.8}}
        .dump();
  };
  double one_by_one = 0;  // tokens/s of requests sent one at a time
  {
    server::EngineOptions eo;
    eo.lane_rows = lane_rows;
    if (device == "cuda") eo.max_batch = 1;
    auto engine = make_engine(tok, eo);
    server::ServerOptions so;
    so.port = 0;
    server::HttpServer http(*engine, tok, server::ChatTemplate{}, so);
    http.start();
    const auto t0 = Clock::now();
    int64_t tokens = 0;
    for (int i = 0; i < sequential; ++i) tokens += int64_t(one_request(http.port(), body_for(i), t0).tokens.size());
    one_by_one = double(tokens) / std::chrono::duration<double>(Clock::now() - t0).count();
    std::printf("%8s %9d %11.1f   (one request at a time: the baseline)\n", "1 (seq)", sequential, one_by_one);
    std::fflush(stdout);
  }
  for (int C : concurrency) {
    server::EngineOptions eo;
    eo.max_batch = C;
    eo.max_queue = C;
    eo.lane_rows = lane_rows;
    eo.prefill_batch = prefill_batch;
    auto engine = make_engine(tok, eo);
    server::ServerOptions so;
    so.port = 0;
    server::HttpServer http(*engine, tok, server::ChatTemplate{}, so);
    http.start();
    std::vector<std::string> bodies;
    for (int i = 0; i < C; ++i) bodies.push_back(body_for(i));
    std::vector<RequestTimes> times(static_cast<size_t>(C));
    const auto t0 = Clock::now();
    std::vector<std::thread> clients;
    for (int i = 0; i < C; ++i)
      clients.emplace_back([&, i] { times[size_t(i)] = one_request(http.port(), bodies[size_t(i)], t0); });
    for (auto& t : clients) t.join();
    const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
    std::vector<double> ttft, itl;
    int64_t tokens = 0;
    for (const auto& t : times) {
      tokens += int64_t(t.tokens.size());
      if (t.first >= 0) ttft.push_back(t.first - t.start);
      for (size_t k = 1; k < t.tokens.size(); ++k) itl.push_back(t.tokens[k] - t.tokens[k - 1]);
    }
    const double tps = double(tokens) / wall;
    std::printf("%8d %9d %11.1f %9.0fms %9.0fms %9.1fms %9.1fms %13.1fx\n", C, C, tps, pct(ttft, 0.5) * 1e3,
                pct(ttft, 0.99) * 1e3, pct(itl, 0.5) * 1e3, pct(itl, 0.99) * 1e3, tps / one_by_one);
    std::fflush(stdout);
  }
  return 0;
}
