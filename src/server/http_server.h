#pragma once
// The HTTP front end (cpp-httplib): OpenAI-compatible endpoints over an Engine. Handler threads parse, submit a
// Job and stream its events; they never touch the model.
//   POST /v1/completions, POST /v1/chat/completions (stream: true → server-sent events ending with [DONE])
//   GET /v1/models, GET /health, GET /metrics (Prometheus text)
// Every failure is an OpenAI-style JSON error: 400 malformed, 401 missing/wrong API key, 404 unknown endpoint,
// 413 body too large, 429 queue full, 500 engine failure, 503 shutting down.
#include <memory>
#include <string>
#include <thread>

#include "server/api.h"
#include "server/engine.h"

namespace mamba3::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                  // 0: any free port (see port())
  std::string api_key;              // empty: no authentication
  std::string model_name = "mamba3";
  size_t max_body_bytes = size_t(1) << 20;
  int threads = 0;                  // HTTP worker threads; 0 → max_batch + max_queue + 8 (each stream holds one)
  ServerLimits limits;
};

class HttpServer {
 public:
  HttpServer(Engine& engine, const Tokenizer& tokenizer, ChatTemplate chat_template, ServerOptions options);
  ~HttpServer();  // stops
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds the socket (throws mamba3::Error when it cannot) and serves on a background thread.
  void start();
  // Serves on the calling thread until stop() (binds first if start() was not called).
  void serve();
  void stop();
  int port() const { return port_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
  bool bound_ = false;
  std::thread thread_;
  void bind();
};

}  // namespace mamba3::server
