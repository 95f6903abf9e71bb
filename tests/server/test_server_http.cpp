// The HTTP API against live servers on free loopback ports (golden byte-level model): every endpoint, streaming and
// not, errors and limits, batching invariance (concurrent = alone, exactly), prefix state reuse (fewer tokens
// prefilled, same output as without the cache), disconnects and overload leave the server healthy.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "server/http_server.h"
#include "support/test_support.h"

namespace mamba3::server {
namespace {

using nlohmann::json;

struct Live {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<HttpServer> http;
  int port = 0;
  Live(const LanguageModel& m, const Tokenizer& t, EngineOptions eo = {}, ServerOptions so = {}) {
    so.port = 0;
    so.model_name = "golden";
    if (so.max_body_bytes == (size_t(1) << 20)) so.max_body_bytes = 64 << 10;
    engine = std::make_unique<Engine>(m, t, eo);
    http = std::make_unique<HttpServer>(*engine, t, ChatTemplate{}, so);
    http->start();
    port = http->port();
  }
  ~Live() {
    http->stop();
    engine->stop();
  }
  httplib::Client client(int timeout_s = 120) const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(timeout_s);
    c.set_write_timeout(timeout_s);
    return c;
  }
  // POST; returns (status, body).
  std::pair<int, std::string> post(const std::string& path, const std::string& body,
                                   const httplib::Headers& headers = {}) const {
    auto c = client();
    auto r = c.Post(path.c_str(), headers, body, "application/json");
    if (!r) return {-1, "transport error " + httplib::to_string(r.error())};
    return {r->status, r->body};
  }
  json post_json(const std::string& path, const json& body) const {
    auto [status, text] = post(path, body.dump());
    EXPECT_EQ(status, 200) << text;
    return json::parse(text);
  }
  std::string get(const std::string& path, int* status = nullptr) const {
    auto c = client();
    auto r = c.Get(path.c_str());
    if (status) *status = r ? r->status : -1;
    return r ? r->body : std::string();
  }
  double metric(const std::string& name) const {
    const std::string text = get("/metrics");
    const std::string key = "\nmamba3_" + name + " ";
    const size_t at = text.find(key);
    EXPECT_NE(at, std::string::npos) << name;
    return at == std::string::npos ? -1 : std::stod(text.substr(at + key.size()));
  }
};

class ServerHttp : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto dir = test::golden_dir() / "lm_siso_mlp";
    ASSERT_TRUE(std::filesystem::exists(dir)) << dir << " missing (set MAMBA3_GOLDEN_DIR)";
    model_ = new LanguageModel(LanguageModel::load(dir.string()));
    tok_ = new Tokenizer(Tokenizer::bytes());
  }
  static void TearDownTestSuite() {
    delete model_;
    delete tok_;
  }
  static LanguageModel* model_;
  static Tokenizer* tok_;
};
LanguageModel* ServerHttp::model_ = nullptr;
Tokenizer* ServerHttp::tok_ = nullptr;

// data: payloads of an SSE body, in order.
std::vector<std::string> sse_data(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    const std::string ev = body.substr(pos, end - pos);
    if (ev.rfind("data: ", 0) == 0) out.push_back(ev.substr(6));
    pos = end + 2;
  }
  return out;
}

// Texts per choice from a streamed response; checks the chunk shapes and the final [DONE].
std::vector<std::string> stream_texts(const std::string& body, bool chat, int n, json* usage = nullptr) {
  auto events = sse_data(body);
  EXPECT_FALSE(events.empty());
  if (events.empty()) return {};
  EXPECT_EQ(events.back(), "[DONE]");
  std::vector<std::string> texts(static_cast<size_t>(n));
  std::vector<int> finishes(static_cast<size_t>(n), 0);
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    json j = json::parse(events[i]);
    EXPECT_EQ(j["object"], chat ? "chat.completion.chunk" : "text_completion");
    if (j.contains("usage") && usage) *usage = j["usage"];
    for (const auto& c : j["choices"]) {
      const int idx = c["index"].get<int>();
      if (chat) {
        if (c["delta"].contains("content")) texts[size_t(idx)] += c["delta"]["content"].get<std::string>();
      } else {
        texts[size_t(idx)] += c["text"].get<std::string>();
      }
      if (!c["finish_reason"].is_null()) ++finishes[size_t(idx)];
    }
  }
  for (int i = 0; i < n; ++i) EXPECT_EQ(finishes[size_t(i)], 1) << "choice " << i;
  return texts;
}

TEST_F(ServerHttp, EndpointsAndShapes) {
  Live s(*model_, *tok_);
  int status = 0;
  EXPECT_EQ(json::parse(s.get("/health", &status))["status"], "ok");
  EXPECT_EQ(status, 200);
  json models = json::parse(s.get("/v1/models"));
  EXPECT_EQ(models["object"], "list");
  EXPECT_EQ(models["data"][0]["id"], "golden");

  json c = s.post_json("/v1/completions", {{"model", "golden"}, {"prompt", "Hello"}, {"max_tokens", 7}, {"seed", 1}});
  EXPECT_EQ(c["object"], "text_completion");
  EXPECT_TRUE(c["id"].get<std::string>().starts_with("cmpl-"));
  ASSERT_EQ(c["choices"].size(), 1u);
  EXPECT_EQ(c["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(c["choices"][0]["text"].is_string());
  EXPECT_EQ(c["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(c["usage"]["completion_tokens"], 7);
  EXPECT_EQ(c["usage"]["total_tokens"], 12);

  json chat = s.post_json("/v1/chat/completions",
                          {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 5}, {"seed", 2}});
  EXPECT_EQ(chat["object"], "chat.completion");
  EXPECT_EQ(chat["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(chat["choices"][0]["message"]["content"].is_string());
  EXPECT_EQ(chat["usage"]["completion_tokens"], 5);

  const std::string metrics = s.get("/metrics");
  for (const char* name : {"requests_total 2", "tokens_generated_total 12", "queue_depth 0", "active_sequences 0",
                           "tokens_per_second", "state_cache_hits_total"})
    EXPECT_NE(metrics.find(std::string("mamba3_") + name), std::string::npos) << name << " in\n" << metrics;
}

TEST_F(ServerHttp, StreamingMatchesNonStreamingAndSeedsFollowChoices) {
  Live s(*model_, *tok_);
  const json req = {{"prompt", "Once upon"}, {"max_tokens", 12}, {"seed", 5}, {"n", 3}, {"temperature", 0.9}};
  json plain = s.post_json("/v1/completions", req);
  json sreq = req;
  sreq["stream"] = true;
  sreq["stream_options"] = {{"include_usage", true}};
  auto [status, body] = s.post("/v1/completions", sreq.dump());
  ASSERT_EQ(status, 200);
  json usage;
  auto texts = stream_texts(body, false, 3, &usage);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(texts[size_t(i)], plain["choices"][i]["text"]) << "choice " << i;
  EXPECT_EQ(usage["completion_tokens"], 36);
  // Choice i of n samples with seed + i: it equals a single request with that seed.
  for (int i = 0; i < 3; ++i) {
    json one = req;
    one["n"] = 1;
    one["seed"] = 5 + i;
    EXPECT_EQ(s.post_json("/v1/completions", one)["choices"][0]["text"], plain["choices"][i]["text"]) << i;
  }
  // Chat streaming: a role chunk first, content deltas, then [DONE]; same text as non-streamed.
  const json chat = {{"messages", {{{"role", "user"}, {"content", "hey"}}}}, {"max_tokens", 6}, {"seed", 4}};
  json cplain = s.post_json("/v1/chat/completions", chat);
  json cs = chat;
  cs["stream"] = true;
  auto [cstatus, cbody] = s.post("/v1/chat/completions", cs.dump());
  ASSERT_EQ(cstatus, 200);
  EXPECT_EQ(json::parse(sse_data(cbody)[0])["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(stream_texts(cbody, true, 1)[0], cplain["choices"][0]["message"]["content"]);
}

TEST_F(ServerHttp, StopStringsAndGreedy) {
  Live s(*model_, *tok_);
  json g = s.post_json("/v1/completions", {{"prompt", "abc"}, {"max_tokens", 20}, {"temperature", 0}});
  const std::string text = g["choices"][0]["text"];
  ASSERT_GE(text.size(), 4u);
  // Stop at a piece of the greedy text (whole UTF-8 characters 2–3): the answer is everything before its first
  // occurrence.
  std::vector<size_t> starts;
  for (size_t i = 0; i < text.size(); ++i)
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) starts.push_back(i);
  starts.push_back(text.size());
  ASSERT_GE(starts.size(), 5u);
  const std::string stop = text.substr(starts[1], starts[3] - starts[1]);
  json st = s.post_json("/v1/completions", {{"prompt", "abc"}, {"max_tokens", 20}, {"temperature", 0}, {"stop", stop}});
  EXPECT_EQ(st["choices"][0]["text"], text.substr(0, text.find(stop)));
  EXPECT_EQ(st["choices"][0]["finish_reason"], "stop");
}

TEST_F(ServerHttp, ErrorsAreOpenAiJson) {
  ServerOptions so;
  so.max_body_bytes = 2048;
  Live s(*model_, *tok_, {}, so);
  auto expect_error = [&](const std::string& path, const std::string& body, int want, const char* param = nullptr) {
    auto [status, text] = s.post(path, body);
    EXPECT_EQ(status, want) << body << " → " << text;
    json j = json::parse(text, nullptr, false);
    ASSERT_TRUE(j.is_object() && j.contains("error")) << text;
    EXPECT_TRUE(j["error"]["message"].is_string());
    EXPECT_TRUE(j["error"]["type"].is_string());
    if (param) {
      EXPECT_EQ(j["error"]["param"], param) << text;
    }
  };
  expect_error("/v1/completions", "{not json", 400);
  expect_error("/v1/completions", "[1,2]", 400);
  expect_error("/v1/completions", R"({"max_tokens":3})", 400, "prompt");
  expect_error("/v1/completions", R"({"prompt":"x","max_tokens":"3"})", 400, "max_tokens");
  expect_error("/v1/completions", R"({"prompt":[1,99999]})", 400);
  expect_error("/v1/completions", R"({"prompt":"x","temperature":9})", 400, "temperature");
  expect_error("/v1/chat/completions", R"({"messages":[{"role":"user","content":{}}]})", 400, "messages[0].content");
  expect_error("/v1/completions", json{{"prompt", std::string(4096, 'x')}}.dump(), 413);
  expect_error("/v1/nothing", "{}", 404);
  int status = 0;
  s.get("/v1/nothing", &status);
  EXPECT_EQ(status, 404);
  // The server still works.
  EXPECT_EQ(s.post_json("/v1/completions", {{"prompt", "x"}, {"max_tokens", 2}})["usage"]["completion_tokens"], 2);
}

TEST_F(ServerHttp, ApiKey) {
  ServerOptions so;
  so.api_key = "sekret";
  Live s(*model_, *tok_, {}, so);
  const std::string body = R"({"prompt":"x","max_tokens":2})";
  EXPECT_EQ(s.post("/v1/completions", body).first, 401);
  EXPECT_EQ(s.post("/v1/completions", body, {{"Authorization", "Bearer wrong"}}).first, 401);
  EXPECT_EQ(s.post("/v1/completions", body, {{"Authorization", "Bearer sekret"}}).first, 200);
  int status = 0;
  s.get("/health", &status);
  EXPECT_EQ(status, 200);
  s.get("/v1/models", &status);
  EXPECT_EQ(status, 401);
}

TEST_F(ServerHttp, BatchingDoesNotChangeResults) {
  EngineOptions eo;
  eo.max_batch = 64;
  Live s(*model_, *tok_, eo);
  const int N = 32;
  auto request = [](int i) {
    json r = {{"prompt", "request " + std::to_string(i) + std::string(size_t(i % 5), '!')},
              {"max_tokens", 10 + i % 7},
              {"seed", 1000 + i},
              {"temperature", i % 4 == 0 ? 0.0 : 0.8},
              {"top_k", i % 3 == 0 ? 0 : 20},
              {"n", i % 8 == 0 ? 2 : 1}};
    if (i % 5 == 1) r["repetition_penalty"] = 1.3;
    if (i % 6 == 2) r["presence_penalty"] = 0.7;
    return r;
  };
  std::vector<std::string> alone(N);
  for (int i = 0; i < N; ++i) alone[size_t(i)] = s.post_json("/v1/completions", request(i))["choices"].dump();
  auto concurrently = [&](const Live& server) {
    std::vector<std::string> together(N);
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int i = 0; i < N; ++i)
      threads.emplace_back([&, i] {
        json r = request(i);
        if (i % 2) r["stream"] = true;  // half of them streamed
        auto [status, body] = server.post("/v1/completions", r.dump());
        if (status != 200) {
          ++failures;
          together[size_t(i)] = "HTTP " + std::to_string(status) + ": " + body;
          return;
        }
        if (i % 2) {
          auto texts = stream_texts(body, false, r["n"].get<int>());
          json choices = json::parse(alone[size_t(i)]);
          bool same = texts.size() == choices.size();
          for (size_t k = 0; same && k < texts.size(); ++k) same = texts[k] == choices[k]["text"];
          together[size_t(i)] = same ? alone[size_t(i)] : "stream differs";
        } else {
          together[size_t(i)] = json::parse(body)["choices"].dump();
        }
      });
    for (auto& t : threads) t.join();
    EXPECT_EQ(failures, 0);
    for (int i = 0; i < N; ++i) EXPECT_EQ(together[size_t(i)], alone[size_t(i)]) << "request " << i;
  };
  concurrently(s);
  // Prompts grouped into batched prefill calls (short segments, a small budget: many rounds and groups). The CPU
  // backend runs a group one by one, so the results stay exact.
  EngineOptions grouped = eo;
  grouped.prefill_batch = 4;
  grouped.prefill_block = 4;
  grouped.prefill_budget = 24;
  Live g(*model_, *tok_, grouped);
  concurrently(g);
}

TEST_F(ServerHttp, PrefixReuseSkipsPrefillAndChangesNothing) {
  EngineOptions cached;
  cached.prefill_block = 16;
  EngineOptions uncached = cached;
  uncached.state_cache_bytes = 0;
  Live a(*model_, *tok_, cached);
  Live b(*model_, *tok_, uncached);
  const std::string system = "You are a terse assistant that answers in one word, always.";
  auto chat = [&](const std::string& user) {
    return json{{"messages", {{{"role", "system"}, {"content", system}}, {{"role", "user"}, {"content", user}}}},
                {"max_tokens", 8},
                {"seed", 77},
                {"temperature", 0.7}};
  };
  const int64_t system_tokens = int64_t(("<|system|>\n" + system + "<|end|>\n").size());
  json first = a.post_json("/v1/chat/completions", chat("first question"));
  EXPECT_EQ(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  const double prefilled = a.metric("prefill_tokens_total");
  const double hits = a.metric("state_cache_hits_total");
  json second = a.post_json("/v1/chat/completions", chat("second one"));
  const int64_t prompt2 = second["usage"]["prompt_tokens"];
  EXPECT_EQ(second["usage"]["prompt_tokens_details"]["cached_tokens"], system_tokens);
  EXPECT_EQ(a.metric("prefill_tokens_total") - prefilled, double(prompt2 - system_tokens));
  EXPECT_EQ(a.metric("state_cache_hits_total"), hits + 1);
  EXPECT_GT(a.metric("state_cache_entries"), 0);
  // Same output as a server without the cache.
  EXPECT_EQ(second["choices"].dump(), b.post_json("/v1/chat/completions", chat("second one"))["choices"].dump());
  EXPECT_EQ(b.metric("state_cache_hits_total"), 0);
  // An exact repeat of a completion prompt prefills nothing.
  const json comp = {{"prompt", "The same prompt, sent twice."}, {"max_tokens", 6}, {"seed", 3}};
  json c1 = a.post_json("/v1/completions", comp);
  const double before = a.metric("prefill_tokens_total");
  json c2 = a.post_json("/v1/completions", comp);
  EXPECT_EQ(a.metric("prefill_tokens_total"), before);
  EXPECT_EQ(c2["usage"]["prompt_tokens_details"]["cached_tokens"], c2["usage"]["prompt_tokens"]);
  EXPECT_EQ(c1["choices"].dump(), c2["choices"].dump());
  EXPECT_EQ(c2["choices"].dump(), b.post_json("/v1/completions", comp)["choices"].dump());
}

TEST_F(ServerHttp, DisconnectsAndOverloadLeaveTheServerHealthy) {
  EngineOptions eo;
  eo.max_batch = 2;
  eo.max_queue = 2;
  Live s(*model_, *tok_, eo);
  // Clients that drop mid-stream: their sequences leave the batch.
  for (int k = 0; k < 3; ++k) {
    auto c = s.client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = json{{"prompt", "go"}, {"max_tokens", 4000}, {"stream", true}}.dump();
    req.set_header("Content-Type", "application/json");
    int chunks = 0;
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 3; };
    httplib::Response res;
    httplib::Error err;
    c.send(req, res, err);
    EXPECT_GE(chunks, 3);
  }
  auto wait_idle = [&] {
    for (int i = 0; i < 200; ++i) {
      if (json::parse(s.get("/health"))["active_sequences"] == 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  };
  EXPECT_TRUE(wait_idle()) << "dropped streams still decode";
  EXPECT_GE(s.metric("sequences_cancelled_total"), 3);
  // A burst over the queue limit: some get 429 (JSON error), the rest are served.
  std::atomic<int> ok{0}, busy{0}, other{0};
  std::vector<std::thread> burst;
  for (int i = 0; i < 12; ++i)
    burst.emplace_back([&] {
      auto [status, body] = s.post("/v1/completions", json{{"prompt", "burst"}, {"max_tokens", 200}}.dump());
      if (status == 200) {
        ++ok;
      } else if (status == 429 && json::parse(body)["error"]["code"] == "queue_full") {
        ++busy;
      } else {
        ++other;
      }
    });
  for (auto& t : burst) t.join();
  EXPECT_GE(ok, 1);
  EXPECT_GE(busy, 1);
  EXPECT_EQ(other, 0);
  EXPECT_GE(s.metric("requests_rejected_total"), 1);
  EXPECT_TRUE(wait_idle());
  EXPECT_EQ(s.post_json("/v1/completions", {{"prompt", "after"}, {"max_tokens", 3}})["usage"]["completion_tokens"], 3);
}

}  // namespace
}  // namespace mamba3::server
