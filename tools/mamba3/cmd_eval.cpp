// `mamba3 eval [-m DIR] -i text.txt [--window N]`: the model's perplexity on held-out text — the figure that
// models/default/README.md documents and tests/trainer/test_default_model checks. Text is tokenized with the model's
// tokenizer (bytes when it has none) and scored in non-overlapping windows, each from a fresh state
// (train/perplexity.h); the default window, 257 ids, is the trainer's validation window at --seq-len 256.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "core/parallel.h"
#include "default_model.h"
#include "model/language_model.h"
#include "tokenizer/tokenizer.h"
#include "train/perplexity.h"

namespace mamba3::cli {

namespace {

struct EvalArgs {
  std::string model;
  std::vector<std::string> inputs;
  int64_t window = 257;
  int threads = 0;
  bool json = false;
  bool decode = false;
  std::string state_precision = "f32";
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MAMBA3_CHECK(in.good(), "{}: cannot open", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void run(const EvalArgs& a) {
  if (a.threads > 0) set_threads(a.threads);
  const std::string dir = a.model.empty() ? find_default_model() : a.model;
  const LanguageModel model = LanguageModel::load(dir);
  namespace fs = std::filesystem;
  const bool has_tokenizer =
      fs::exists(fs::path(dir) / "tokenizer.json") || fs::exists(fs::path(dir) / "tokenizer.model");
  const Tokenizer tok = has_tokenizer ? Tokenizer::from_model_dir(dir) : Tokenizer::bytes();
  std::vector<int64_t> ids;
  size_t bytes = 0;
  for (const std::string& path : a.inputs) {
    const std::string text = read_text(path);
    bytes += text.size();
    for (uint32_t id : tok.encode(text)) ids.push_back(id);
  }
  MAMBA3_CHECK(a.state_precision == "f32" || a.state_precision == "bf16",
               "--state-precision: expected f32 or bf16, got '{}'", a.state_precision);
  const bool bf16_state = a.state_precision == "bf16", decode = a.decode || bf16_state;
  const PerplexityResult r =
      decode ? evaluate_perplexity_decode(model, ids, a.window, bf16_state) : evaluate_perplexity(model, ids, a.window);
  const std::string mode = decode ? std::string("decode steps, ") + a.state_precision + " ssm state" : "prefill";
  // Bits per byte compares models across tokenizers: the whole text's log-likelihood over its byte count.
  const double bits_per_byte = r.nll * double(r.predicted) / std::log(2.0) / double(bytes);
  if (a.json) {
    const nlohmann::json j = {{"model", dir},           {"bytes", bytes},        {"tokens", r.tokens},
                              {"windows", r.windows},   {"window", a.window},    {"predicted", r.predicted},
                              {"nll", r.nll},           {"perplexity", r.perplexity()},
                              {"bits_per_byte", bits_per_byte}, {"mode", mode}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s: %zu bytes, %lld tokens (%s), %lld windows of %lld (%s): loss %.6f nats/token, perplexity %.4f "
                "per token, %.4f bits per byte\n",
                dir.c_str(), bytes, static_cast<long long>(r.tokens), has_tokenizer ? "model tokenizer" : "bytes",
                static_cast<long long>(r.windows), static_cast<long long>(a.window), mode.c_str(), r.nll,
                r.perplexity(), bits_per_byte);
  }
}

}  // namespace

void register_eval(CLI::App& app) {
  static EvalArgs a;
  auto* cmd = app.add_subcommand("eval", "Perplexity of a model on held-out text files");
  cmd->add_option("-m,--model", a.model, "model directory; default: $MAMBA3_MODEL_DIR, else models/default");
  cmd->add_option("-i,--input", a.inputs, "text files (UTF-8), concatenated in this order")->required();
  cmd->add_option("--window", a.window, "ids per window (each scored from a fresh state)")->capture_default_str();
  cmd->add_option("--threads", a.threads, "CPU threads (default: all cores)");
  cmd->add_flag("--json", a.json, "print one JSON object instead of a sentence");
  cmd->add_flag("--decode", a.decode, "score through decode steps, one token at a time (as generation runs)");
  cmd->add_option("--state-precision", a.state_precision,
                  "f32, or bf16: round the Mamba-3 ssm state to bf16 after every decode step (implies --decode), to "
                  "measure what a bf16 state cache costs the model")
      ->capture_default_str();
  cmd->callback([] { run(a); });
}

}  // namespace mamba3::cli
