#pragma once
// The OpenAI-compatible request side: JSON bodies of /v1/completions and /v1/chat/completions → a
// GenerationRequest, with every field checked (wrong types and ranges become 400 errors naming the field), and
// the chat template that turns messages into prompt tokens.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "server/engine.h"
#include "tokenizer/tokenizer.h"

namespace mamba3::server {

// An error answered as HTTP `status` with OpenAI's body {"error": {"message", "type", "param", "code"}}.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string param = {}, std::string type = "invalid_request_error",
           std::string code = {})
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)),
        code(std::move(code)) {}
  int status;
  std::string type, param, code;
};
nlohmann::json error_json(int status, const std::string& message, const std::string& type,
                          const std::string& param = {}, const std::string& code = {});
nlohmann::json error_json(const ApiError& e);

// How chat messages become text. The default (used when the model directory has no chat_template.json):
//   for each message: "<|{role}|>\n" + content + "<|end|>\n"; then "<|assistant|>\n"; stop strings {"<|end|>"}.
// chat_template.json may set any of: "bos", "message_prefix", "message_suffix", "generation_prompt", "stop"
// ({role} in message_prefix/message_suffix is replaced by the role). Template text may contain special tokens;
// message content never becomes special tokens.
struct ChatTemplate {
  std::string bos;
  std::string message_prefix = "<|{role}|>\n";
  std::string message_suffix = "<|end|>\n";
  std::string generation_prompt = "<|assistant|>\n";
  std::vector<std::string> stop = {"<|end|>"};
  bool from_file = false;
  // dir/chat_template.json when present, else the default. Throws mamba3::Error for a malformed file.
  static ChatTemplate from_model_dir(const std::string& dir);
};

struct ServerLimits {
  int64_t max_prompt_tokens = 8192;
  int64_t max_tokens = 4096;               // per choice
  int64_t default_chat_max_tokens = 256;   // when a chat request gives none (completions default to 16, as OpenAI)
  int64_t max_n = 16;
};

struct ParsedRequest {
  GenerationRequest gen;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  std::string model;
};

// Parses a request body; throws ApiError (400) for anything malformed.
ParsedRequest parse_completion_request(const std::string& body, const Tokenizer& tok, const ServerLimits& limits,
                                       const std::vector<int64_t>& eos_ids);
ParsedRequest parse_chat_request(const std::string& body, const Tokenizer& tok, const ServerLimits& limits,
                                 const std::vector<int64_t>& eos_ids, const ChatTemplate& tmpl);

// End-of-sequence ids of a tokenizer (its special tokens named like <|endoftext|>, </s>, <|eot_id|>, …).
std::vector<int64_t> eos_ids_of(const Tokenizer& tok);

}  // namespace mamba3::server
