#include "server/http_server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <csignal>
#include <ctime>
#include <random>

#include <httplib.h>

namespace mamba3::server {

using nlohmann::json;

struct HttpServer::Impl {
  Engine& engine;
  const Tokenizer& tok;
  ChatTemplate chat_template;
  ServerOptions opt;
  std::vector<int64_t> eos_ids;
  httplib::Server svr;
  std::atomic<int64_t> next_id{0};
  int listen_socket = -1;
  const std::time_t started = std::time(nullptr);

  Impl(Engine& e, const Tokenizer& t, ChatTemplate c, ServerOptions o)
      : engine(e), tok(t), chat_template(std::move(c)), opt(std::move(o)), eos_ids(eos_ids_of(t)) {}

  static void send_json(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n", "application/json");
  }
  static void send_error(httplib::Response& res, const ApiError& e) { send_json(res, e.status, error_json(e)); }

  std::string new_id(const char* prefix) {
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    thread_local std::mt19937_64 rng{std::random_device{}()};
    std::string id = prefix;
    for (int i = 0; i < 16; ++i) id += digits[rng() % 36];
    return id + std::to_string(next_id++);
  }

  json usage(const Job& job) const {
    const int64_t prompt = int64_t(job.request().prompt.size()), completion = job.completion_tokens();
    return {{"prompt_tokens", prompt},
            {"completion_tokens", completion},
            {"total_tokens", prompt + completion},
            {"prompt_tokens_details", {{"cached_tokens", job.cached_tokens()}}}};
  }

  // One choice of a streamed chunk (chat: a delta; completions: text).
  json chunk(bool chat, const std::string& id, std::time_t created, const std::string& model, json choice) const {
    return {{"id", id},
            {"object", chat ? "chat.completion.chunk" : "text_completion"},
            {"created", created},
            {"model", model},
            {"choices", json::array({std::move(choice)})}};
  }

  void generate(const httplib::Request& req, httplib::Response& res, bool chat) {
    ParsedRequest p = chat ? parse_chat_request(req.body, tok, opt.limits, eos_ids, chat_template)
                           : parse_completion_request(req.body, tok, opt.limits, eos_ids);
    std::shared_ptr<Job> job;
    try {
      job = engine.submit(std::move(p.gen));
    } catch (const QueueFull& e) {
      throw ApiError(429, e.what(), {}, "rate_limit_error", "queue_full");
    } catch (const Error& e) {
      throw ApiError(400, e.what());
    }
    const std::string id = new_id(chat ? "chatcmpl-" : "cmpl-");
    const std::time_t created = std::time(nullptr);
    const std::string model = opt.model_name;
    if (!p.stream) {
      const auto events = job->wait_all();
      if (auto err = job->error()) throw ApiError(500, *err, {}, "server_error");
      const int64_t n = job->request().n;
      std::vector<std::string> text{size_t(n), std::string()}, reason{size_t(n), std::string("length")};
      for (const auto& e : events) {
        text[size_t(e.choice)] += e.text;
        if (!e.finish_reason.empty()) reason[size_t(e.choice)] = e.finish_reason;
      }
      json choices = json::array();
      for (int64_t i = 0; i < n; ++i) {
        json c = {{"index", i}, {"logprobs", nullptr}, {"finish_reason", reason[size_t(i)]}};
        if (chat) {
          c["message"] = {{"role", "assistant"}, {"content", text[size_t(i)]}};
        } else {
          c["text"] = text[size_t(i)];
        }
        choices.push_back(std::move(c));
      }
      send_json(res, 200,
                {{"id", id},
                 {"object", chat ? "chat.completion" : "text_completion"},
                 {"created", created},
                 {"model", model},
                 {"choices", std::move(choices)},
                 {"usage", usage(*job)}});
      return;
    }
    // Streaming: the provider runs on this handler thread after we return, until the job is over or the client
    // goes away (then the job is cancelled and its sequences leave the batch at the next step).
    auto sent_roles = std::make_shared<bool>(false);
    const bool include_usage = p.include_usage;
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, job, id, created, model, chat, sent_roles, include_usage](size_t, httplib::DataSink& sink) {
          std::string out;
          auto emit = [&](const json& j) {
            out += "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
          };
          if (chat && !*sent_roles) {
            for (int64_t i = 0; i < job->request().n; ++i)
              emit(chunk(true, id, created, model,
                         {{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr},
                          {"finish_reason", nullptr}}));
            *sent_roles = true;
          }
          std::vector<JobEvent> events;
          const bool more = job->take(events, std::chrono::milliseconds(250));
          for (const auto& e : events) {
            json c = {{"index", e.choice}, {"logprobs", nullptr}};
            if (chat) {
              c["delta"] = e.text.empty() && !e.finish_reason.empty() ? json::object() : json{{"content", e.text}};
            } else {
              c["text"] = e.text;
            }
            c["finish_reason"] = e.finish_reason.empty() ? json(nullptr) : json(e.finish_reason);
            emit(chunk(chat, id, created, model, std::move(c)));
          }
          if (!more) {
            if (auto err = job->error()) {
              emit(error_json(500, *err, "server_error"));
            } else if (include_usage) {
              json u = chunk(chat, id, created, model, json::array());
              u["choices"] = json::array();
              u["usage"] = usage(*job);
              emit(u);
            }
            out += "data: [DONE]\n\n";
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) {
            job->cancel();
            return false;
          }
          if (!more) sink.done();
          return true;
        },
        [job](bool) { job->cancel(); });  // harmless once over; frees the sequences of a dropped client
  }

  std::string metrics_text() const {
    const EngineMetrics m = engine.metrics();
    std::string s;
    auto metric = [&](const char* name, const char* type, const char* help, double v) {
      s += fmt::format("# HELP mamba3_{0} {1}\n# TYPE mamba3_{0} {2}\nmamba3_{0} {3}\n", name, help, type, v);
    };
    metric("requests_total", "counter", "Generation requests accepted.", double(m.requests));
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full (429).",
           double(m.rejected));
    metric("sequences_cancelled_total", "counter", "Sequences or queued requests dropped because the client left.",
           double(m.cancelled));
    metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", double(m.prompt_tokens));
    metric("prefill_tokens_total", "counter", "Prompt tokens actually prefilled (the rest came from the state cache).",
           double(m.prefilled_tokens));
    metric("tokens_generated_total", "counter", "Tokens generated.", double(m.generated_tokens));
    metric("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.", m.tokens_per_second);
    metric("queue_depth", "gauge", "Requests waiting for admission.", double(m.queue_depth));
    metric("active_sequences", "gauge", "Sequences being prefilled or decoded.", double(m.active_sequences));
    metric("state_cache_hits_total", "counter", "Prompts that continued from a cached prefix state.",
           double(m.cache_hits));
    metric("state_cache_misses_total", "counter", "Prompts prefilled from the start.", double(m.cache_misses));
    metric("state_cache_hit_tokens_total", "counter", "Prompt tokens skipped thanks to cached states.",
           double(m.cache_hit_tokens));
    metric("state_cache_bytes", "gauge", "Bytes held by the prefix state cache.", double(m.cache_bytes));
    metric("state_cache_entries", "gauge", "States held by the prefix state cache.", double(m.cache_entries));
    return s;
  }

  void routes() {
    // Debian's compiled cpp-httplib listens with a backlog of 5: a burst of connections overflows it (the kernel
    // drops them; clients stall for seconds or fail). Remember the socket and listen again with a deep backlog.
    svr.set_socket_options([this](int sock) {
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
      // Accepted sockets inherit it: each streamed token leaves at once (Nagle + delayed ACK would add ~40 ms).
      ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes);
      listen_socket = sock;
    });
    svr.set_payload_max_length(opt.max_body_bytes);
    svr.set_read_timeout(30);
    svr.set_write_timeout(30);
    const int threads =
        opt.threads > 0 ? opt.threads : int(engine.options().max_batch + engine.options().max_queue + 8);
    svr.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };

    svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (opt.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
      if (req.get_header_value("Authorization") == "Bearer " + opt.api_key)
        return httplib::Server::HandlerResponse::Unhandled;
      send_error(res, ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", {},
                               "invalid_request_error", "invalid_api_key"));
      return httplib::Server::HandlerResponse::Handled;
    });
    svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty() || res.is_chunked_content_provider_) return;
      if (res.status == 404) {
        send_error(res, ApiError(404, fmt::format("no endpoint {} {}", req.method, req.path), {},
                                 "invalid_request_error", "not_found"));
      } else if (res.status == 413) {
        send_error(res, ApiError(413, "the request body is too large", {}, "invalid_request_error",
                                 "payload_too_large"));
      } else {
        send_error(res, ApiError(res.status, fmt::format("HTTP error {}", res.status), {}, "invalid_request_error"));
      }
    });
    svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      send_error(res, ApiError(500, "internal error: " + what, {}, "server_error"));
    });

    auto guarded = [this](bool chat) {
      return [this, chat](const httplib::Request& req, httplib::Response& res) {
        try {
          generate(req, res, chat);
        } catch (const ApiError& e) {
          send_error(res, e);
        } catch (const std::exception& e) {
          send_error(res, ApiError(500, std::string("internal error: ") + e.what(), {}, "server_error"));
        }
      };
    };
    svr.Post("/v1/completions", guarded(false));
    svr.Post("/v1/chat/completions", guarded(true));
    svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      send_json(res, 200,
                {{"object", "list"},
                 {"data", json::array({{{"id", opt.model_name},
                                         {"object", "model"},
                                         {"created", started},
                                         {"owned_by", "mamba3"}}})}});
    });
    svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const EngineMetrics m = engine.metrics();
      send_json(res, 200, {{"status", "ok"}, {"active_sequences", m.active_sequences}, {"queue_depth", m.queue_depth}});
    });
    svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics_text(), "text/plain; version=0.0.4");
    });
  }
};

HttpServer::HttpServer(Engine& engine, const Tokenizer& tokenizer, ChatTemplate chat_template, ServerOptions options)
    : impl_(std::make_unique<Impl>(engine, tokenizer, std::move(chat_template), std::move(options))) {
  std::signal(SIGPIPE, SIG_IGN);  // a client that disconnects must not kill the process (writes then fail)
  impl_->routes();
}

HttpServer::~HttpServer() { stop(); }

void HttpServer::bind() {
  if (bound_) return;
  const auto& o = impl_->opt;
  if (o.port == 0) {
    port_ = impl_->svr.bind_to_any_port(o.host);
    MAMBA3_CHECK(port_ > 0, "serve: cannot bind {} on any port", o.host);
  } else {
    MAMBA3_CHECK(impl_->svr.bind_to_port(o.host, o.port), "serve: cannot bind {}:{} (in use, or not an address here?)",
                 o.host, o.port);
    port_ = o.port;
  }
  if (impl_->listen_socket >= 0) ::listen(impl_->listen_socket, SOMAXCONN);
  bound_ = true;
}

void HttpServer::start() {
  bind();
  thread_ = std::thread([this] { impl_->svr.listen_after_bind(); });
  for (int i = 0; i < 5000 && !impl_->svr.is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void HttpServer::serve() {
  bind();
  impl_->svr.listen_after_bind();
}

void HttpServer::stop() {
  impl_->svr.stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace mamba3::server
