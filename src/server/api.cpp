#include "server/api.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

namespace mamba3::server {

nlohmann::json error_json(int status, const std::string& message, const std::string& type, const std::string& param,
                          const std::string& code) {
  (void)status;
  return {{"error",
           {{"message", message},
            {"type", type},
            {"param", param.empty() ? nlohmann::json(nullptr) : nlohmann::json(param)},
            {"code", code.empty() ? nlohmann::json(nullptr) : nlohmann::json(code)}}}};
}

nlohmann::json error_json(const ApiError& e) { return error_json(e.status, e.what(), e.type, e.param, e.code); }

namespace {

using nlohmann::json;

ApiError bad(const std::string& param, const std::string& message) { return ApiError(400, message, param); }

// Optional fields: absent or null → the default; present with the wrong type → 400 naming the field.
double number(const json& j, const char* key, double def, double lo, double hi) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_number()) throw bad(key, fmt::format("'{}' must be a number", key));
  const double v = it->get<double>();
  if (!std::isfinite(v) || v < lo || v > hi)
    throw bad(key, fmt::format("'{}' must lie in [{}, {}], got {}", key, lo, hi, v));
  return v;
}

int64_t integer(const json& j, const char* key, int64_t def, int64_t lo, int64_t hi) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_number_integer()) throw bad(key, fmt::format("'{}' must be an integer", key));
  if (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(INT64_MAX))
    throw bad(key, fmt::format("'{}' must lie in [{}, {}]", key, lo, hi));
  const int64_t v = it->get<int64_t>();
  if (v < lo || v > hi) throw bad(key, fmt::format("'{}' must lie in [{}, {}], got {}", key, lo, hi, v));
  return v;
}

bool boolean(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_boolean()) throw bad(key, fmt::format("'{}' must be true or false", key));
  return it->get<bool>();
}

json parse_body(const std::string& body) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    throw ApiError(400, std::string("the request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object");
  return j;
}

// Fields shared by both endpoints.
ParsedRequest common_fields(const json& j, const ServerLimits& limits, int64_t default_max_tokens) {
  ParsedRequest p;
  auto model = j.find("model");
  if (model != j.end() && !model->is_null()) {
    if (!model->is_string()) throw bad("model", "'model' must be a string");
    p.model = model->get<std::string>();
  }
  GenerationRequest& g = p.gen;
  const char* max_key = j.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  g.max_tokens = integer(j, max_key, default_max_tokens, 1, limits.max_tokens);
  g.n = integer(j, "n", 1, 1, limits.max_n);
  if (j.contains("best_of") && !j["best_of"].is_null() && integer(j, "best_of", 1, 1, limits.max_n) != g.n)
    throw bad("best_of", "'best_of' other than n is not supported");
  g.sampling.temperature = float(number(j, "temperature", 1.0, 0.0, 2.0));
  g.sampling.top_p = float(number(j, "top_p", 1.0, 0.0, 1.0));
  if (g.sampling.top_p <= 0) throw bad("top_p", "'top_p' must be greater than 0");
  g.sampling.top_k = integer(j, "top_k", 0, 0, INT32_MAX);
  g.sampling.min_p = float(number(j, "min_p", 0.0, 0.0, 0.999999));
  g.sampling.repetition_penalty = float(number(j, "repetition_penalty", 1.0, 1e-3, 100.0));
  g.presence_penalty = float(number(j, "presence_penalty", 0.0, -2.0, 2.0));
  g.frequency_penalty = float(number(j, "frequency_penalty", 0.0, -2.0, 2.0));
  if (j.contains("seed") && !j["seed"].is_null()) {
    if (!j["seed"].is_number_integer()) throw bad("seed", "'seed' must be an integer");
    g.sampling.seed = j["seed"].is_number_unsigned() ? j["seed"].get<uint64_t>() : uint64_t(j["seed"].get<int64_t>());
  } else {
    g.sampling.seed = std::random_device{}();
  }
  if (auto s = j.find("stop"); s != j.end() && !s->is_null()) {
    if (s->is_string()) {
      g.stop.push_back(s->get<std::string>());
    } else if (s->is_array() && s->size() <= 4) {
      for (const auto& x : *s) {
        if (!x.is_string()) throw bad("stop", "'stop' must be a string or an array of at most 4 strings");
        g.stop.push_back(x.get<std::string>());
      }
    } else {
      throw bad("stop", "'stop' must be a string or an array of at most 4 strings");
    }
    for (const auto& x : g.stop)
      if (x.empty()) throw bad("stop", "stop strings must not be empty");
  }
  p.stream = boolean(j, "stream", false);
  if (auto so = j.find("stream_options"); so != j.end() && !so->is_null()) {
    if (!so->is_object()) throw bad("stream_options", "'stream_options' must be an object");
    p.include_usage = boolean(*so, "include_usage", false);
  }
  auto unsupported = [&](const char* key) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null() || (it->is_boolean() && !it->get<bool>()) ||
        ((it->is_object() || it->is_array()) && it->empty()))
      return;
    throw bad(key, fmt::format("'{}' is not supported by this server", key));
  };
  for (const char* key : {"logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions"})
    unsupported(key);
  return p;
}

void append_ids(const Tokenizer& tok, std::string_view text, bool allow_special, std::vector<int64_t>& out) {
  for (uint32_t id : tok.encode(text, allow_special)) out.push_back(int64_t(id));
}

void check_prompt(const std::vector<int64_t>& ids, const ServerLimits& limits, const char* param) {
  if (ids.empty()) throw bad(param, "the prompt is empty (it must encode to at least one token)");
  if (int64_t(ids.size()) > limits.max_prompt_tokens)
    throw bad(param, fmt::format("the prompt has {} tokens, more than this server's limit of {}", ids.size(),
                                 limits.max_prompt_tokens));
}

std::string replace_role(std::string s, const std::string& role) {
  for (size_t at; (at = s.find("{role}")) != std::string::npos;) s.replace(at, 6, role);
  return s;
}

}  // namespace

ChatTemplate ChatTemplate::from_model_dir(const std::string& dir) {
  ChatTemplate t;
  const auto path = std::filesystem::path(dir) / "chat_template.json";
  if (!std::filesystem::exists(path)) return t;
  std::ifstream in(path);
  json j;
  try {
    j = json::parse(in);
  } catch (const json::parse_error& e) {
    fail("{}: not valid JSON: {}", path.string(), e.what());
  }
  MAMBA3_CHECK(j.is_object(), "{}: expected a JSON object", path.string());
  auto str = [&](const char* key, std::string& out) {
    if (!j.contains(key)) return;
    MAMBA3_CHECK(j[key].is_string(), "{}: '{}' must be a string", path.string(), key);
    out = j[key].get<std::string>();
  };
  str("bos", t.bos), str("message_prefix", t.message_prefix), str("message_suffix", t.message_suffix);
  str("generation_prompt", t.generation_prompt);
  if (j.contains("stop")) {
    MAMBA3_CHECK(j["stop"].is_array(), "{}: 'stop' must be an array of strings", path.string());
    t.stop.clear();
    for (const auto& s : j["stop"]) {
      MAMBA3_CHECK(s.is_string() && !s.get<std::string>().empty(), "{}: 'stop' must hold non-empty strings",
                   path.string());
      t.stop.push_back(s.get<std::string>());
    }
  }
  t.from_file = true;
  return t;
}

ParsedRequest parse_completion_request(const std::string& body, const Tokenizer& tok, const ServerLimits& limits,
                                       const std::vector<int64_t>& eos_ids) {
  const json j = parse_body(body);
  ParsedRequest p = common_fields(j, limits, 16);
  auto it = j.find("prompt");
  if (it == j.end() || it->is_null()) throw bad("prompt", "'prompt' is required");
  const json& pr = *it;
  std::vector<int64_t>& ids = p.gen.prompt;
  auto all_ints = [](const json& a) {
    return a.is_array() && !a.empty() && std::all_of(a.begin(), a.end(), [](const json& x) { return x.is_number_integer(); });
  };
  if (pr.is_string()) {
    append_ids(tok, pr.get<std::string>(), false, ids);
  } else if (all_ints(pr)) {
    for (const auto& x : pr) {
      if (x.is_number_unsigned() && x.get<uint64_t>() > uint64_t(INT64_MAX)) throw bad("prompt", "token id out of range");
      ids.push_back(x.get<int64_t>());
    }
  } else if (pr.is_array() && pr.size() == 1 && (pr[0].is_string() || all_ints(pr[0]))) {
    if (pr[0].is_string()) {
      append_ids(tok, pr[0].get<std::string>(), false, ids);
    } else {
      for (const auto& x : pr[0]) ids.push_back(x.get<int64_t>());
    }
  } else if (pr.is_array() && pr.size() > 1) {
    throw bad("prompt", "only one prompt per request is supported (send several requests; they are batched)");
  } else {
    throw bad("prompt", "'prompt' must be a string, an array of token ids, or an array holding one of those");
  }
  check_prompt(ids, limits, "prompt");
  p.gen.stop_ids = eos_ids;
  return p;
}

ParsedRequest parse_chat_request(const std::string& body, const Tokenizer& tok, const ServerLimits& limits,
                                 const std::vector<int64_t>& eos_ids, const ChatTemplate& tmpl) {
  const json j = parse_body(body);
  ParsedRequest p = common_fields(j, limits, limits.default_chat_max_tokens);
  auto it = j.find("messages");
  if (it == j.end() || !it->is_array() || it->empty())
    throw bad("messages", "'messages' must be a non-empty array of {role, content} objects");
  std::vector<int64_t>& ids = p.gen.prompt;
  append_ids(tok, tmpl.bos, true, ids);
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string where = fmt::format("messages[{}]", i);
    if (!m.is_object()) throw bad(where, where + " must be an object with 'role' and 'content'");
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) throw bad(where + ".role", where + ".role must be a string");
    const std::string r = role->get<std::string>();
    if (r != "system" && r != "user" && r != "assistant" && r != "developer" && r != "tool")
      throw bad(where + ".role", fmt::format("{}.role '{}' is not one of system, developer, user, assistant, tool",
                                             where, r));
    std::string content;
    auto c = m.find("content");
    if (c == m.end() || c->is_null()) {
      if (r != "assistant") throw bad(where + ".content", where + ".content is required");
    } else if (c->is_string()) {
      content = c->get<std::string>();
    } else if (c->is_array()) {
      for (const auto& part : *c) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
          throw bad(where + ".content", where + ".content parts must be {\"type\": \"text\", \"text\": …}");
        content += part["text"].get<std::string>();
      }
    } else {
      throw bad(where + ".content", where + ".content must be a string or an array of text parts");
    }
    append_ids(tok, replace_role(tmpl.message_prefix, r), true, ids);
    append_ids(tok, content, false, ids);
    append_ids(tok, replace_role(tmpl.message_suffix, r), true, ids);
    p.gen.boundaries.push_back(int64_t(ids.size()));  // a message end: its state may be reused by later turns
  }
  append_ids(tok, tmpl.generation_prompt, true, ids);
  check_prompt(ids, limits, "messages");
  for (const auto& s : tmpl.stop)
    if (std::find(p.gen.stop.begin(), p.gen.stop.end(), s) == p.gen.stop.end()) p.gen.stop.push_back(s);
  p.gen.stop_ids = eos_ids;
  return p;
}

std::vector<int64_t> eos_ids_of(const Tokenizer& tok) {
  std::vector<int64_t> ids;
  for (const char* name : {"<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<eos>"}) {
    auto id = tok.token_id(name);
    if (id && tok.is_special(*id)) ids.push_back(int64_t(*id));
  }
  return ids;
}

}  // namespace mamba3::server
