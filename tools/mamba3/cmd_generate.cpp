// `mamba3 generate`: load a model directory, encode the prompt, prefill, decode with sampling, stream the text.
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "commands.h"
#ifdef MAMBA3_HAVE_CUDA
#include "cuda/generator_gpu.h"
#endif
#include "core/parallel.h"
#include "default_model.h"
#include "infer/generator.h"
#include "model/language_model.h"
#include "tokenizer/tokenizer.h"

namespace mamba3::cli {

namespace {

struct GenerateArgs {
  std::string model, prompt, ids;
  int64_t max_tokens = 64, batch = 1;
  SamplingParams sampling{.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f};
  bool greedy = false, print_ids = false, no_stats = false;
  int threads = 0;
  std::vector<int64_t> stop_ids;
  std::string device = "cpu", precision = "bf16", state_precision = "f32";
};

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MAMBA3_CHECK(used > 0 && item.find_first_not_of(" \t", used) == std::string::npos,
                 "--ids: '{}' is not an integer (expected a comma-separated list such as 1,2,3)", item);
    ids.push_back(v);
  }
  return ids;
}

// The model directory's tokenizer, or the byte fallback (ids 0–255), said so on stderr.
Tokenizer find_tokenizer(const std::string& dir) {
  namespace fs = std::filesystem;
  if (fs::exists(fs::path(dir) / "tokenizer.json") || fs::exists(fs::path(dir) / "tokenizer.model"))
    return Tokenizer::from_model_dir(dir);
  std::fprintf(stderr, "note: no tokenizer.json or tokenizer.model in %s: using bytes as token ids (0-255)\n",
               dir.c_str());
  return Tokenizer::bytes();
}

void run(const GenerateArgs& a) {
  if (a.threads > 0) set_threads(a.threads);
  SamplingParams sp = a.sampling;
  if (a.greedy) sp.temperature = 0;
  sp.validate();
  MAMBA3_CHECK(a.max_tokens >= 0, "-n: the number of tokens must be non-negative, got {}", a.max_tokens);
  MAMBA3_CHECK(a.batch >= 1, "--batch: must be at least 1, got {}", a.batch);
  MAMBA3_CHECK(a.prompt.empty() || a.ids.empty(), "give either -p/--prompt or --ids, not both");

  MAMBA3_CHECK(a.device == "cpu" || a.device == "cuda", "--device: '{}' is not one of cpu, cuda", a.device);
#ifndef MAMBA3_HAVE_CUDA
  MAMBA3_CHECK(a.device == "cpu", "--device cuda: this build has no CUDA backend (configure with -DMAMBA3_CUDA=ON)");
#endif
  MAMBA3_CHECK(a.state_precision == "f32" || a.state_precision == "bf16",
               "--state-precision: '{}' is not one of f32, bf16", a.state_precision);
  MAMBA3_CHECK(a.device == "cuda" || a.state_precision == "f32",
               "--state-precision bf16: only --device cuda stores a bf16 state (the CPU keeps f32; `mamba3 eval "
               "--state-precision bf16` measures what the rounding costs)");
  const std::string dir = a.model.empty() ? find_default_model() : a.model;
  Tokenizer tok = find_tokenizer(dir);
  std::vector<int64_t> prompt;
  if (!a.ids.empty()) {
    prompt = parse_ids(a.ids);
  } else {
    for (uint32_t id : tok.encode(a.prompt)) prompt.push_back(id);
  }
  MAMBA3_CHECK(!prompt.empty(), "the prompt is empty: give -p TEXT or --ids 1,2,3");

  GenerateOptions opt;
  opt.max_new_tokens = a.max_tokens;
  opt.sampling = sp;
  opt.stop_ids = a.stop_ids;
  GenerateStats stats;
  std::vector<StreamDecoder> decoders(size_t(a.batch), StreamDecoder(tok));
  const bool stream = a.batch == 1 && !a.print_ids;
  if (stream && a.ids.empty()) {
    std::fputs(a.prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  auto on_token = [&](int64_t row, int64_t id) {
    if (stream) {
      const std::string text = id < tok.vocab_size() ? decoders[size_t(row)].push(uint32_t(id)) : std::string();
      std::fputs(text.c_str(), stdout);
      std::fflush(stdout);
    }
    return true;
  };
  std::vector<std::vector<int64_t>> out;
#ifdef MAMBA3_HAVE_CUDA
  if (a.device == "cuda") out = cuda::generate_gpu(dir, a.precision, prompt, a.batch, opt, on_token, &stats,
                                                           a.state_precision);
#endif
  if (a.device == "cpu") out = generate_n(LanguageModel::load(dir), prompt, a.batch, opt, on_token, &stats);
  if (stream) {
    std::fputs((decoders[0].finish() + "\n").c_str(), stdout);
  } else {
    for (size_t r = 0; r < out.size(); ++r) {
      if (a.print_ids) {
        std::string line = "[";
        for (size_t i = 0; i < out[r].size(); ++i) line += (i ? ", " : "") + std::to_string(out[r][i]);
        std::printf("%s]\n", line.c_str());
      } else {
        std::vector<uint32_t> ids;
        for (int64_t id : out[r])
          if (id < tok.vocab_size()) ids.push_back(uint32_t(id));
        std::printf("[%zu] %s%s\n", r, a.ids.empty() ? a.prompt.c_str() : "", tok.decode(ids).c_str());
      }
    }
  }
  if (!a.no_stats) {
    std::fprintf(stderr, "\nprefill: %ld tokens in %.3f s (%.1f tokens/s)\n", long(stats.prompt_tokens),
                 stats.prefill_seconds, double(stats.prompt_tokens) / std::max(stats.prefill_seconds, 1e-9));
    std::fprintf(stderr, "decode: %ld tokens in %.3f s (%.1f tokens/s, batch %ld)\n", long(stats.generated_tokens),
                 stats.decode_seconds, double(stats.generated_tokens) / std::max(stats.decode_seconds, 1e-9),
                 long(a.batch));
  }
}

}  // namespace

void register_generate(CLI::App& app) {
  static GenerateArgs a;
  auto* cmd = app.add_subcommand("generate", "Generate text with a Mamba-3 language model");
  cmd->add_option("-m,--model", a.model,
                  "model directory (config.json + weights [+ tokenizer]); default: $MAMBA3_MODEL_DIR, else the "
                  "repository's models/default");
  cmd->add_option("-p,--prompt", a.prompt, "prompt text (encoded with the model's tokenizer)");
  cmd->add_option("--ids", a.ids, "prompt as comma-separated token ids instead of text");
  cmd->add_option("-n,--max-tokens", a.max_tokens, "tokens to generate per sequence")->capture_default_str();
  cmd->add_option("--temperature", a.sampling.temperature, "sampling temperature (0 = greedy)")->capture_default_str();
  cmd->add_option("--top-k", a.sampling.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
  cmd->add_option("--top-p", a.sampling.top_p, "nucleus sampling mass (1 = off)")->capture_default_str();
  cmd->add_option("--min-p", a.sampling.min_p, "drop tokens below min_p × the top probability (0 = off)")
      ->capture_default_str();
  cmd->add_option("--repeat-penalty", a.sampling.repetition_penalty, "repetition penalty (1 = off)")
      ->capture_default_str();
  cmd->add_option("--seed", a.sampling.seed, "random seed (row r of a batch uses seed + r)")->capture_default_str();
  cmd->add_option("--stop-id", a.stop_ids, "stop a sequence after this token id (repeatable)");
  cmd->add_option("--batch", a.batch, "number of continuations sampled from the prompt (one prefill, forked)")
      ->capture_default_str();
  cmd->add_option("--threads", a.threads, "CPU threads (default: all cores)");
  cmd->add_option("--device", a.device, "cpu, or cuda (decode steps as CUDA graphs, sampling on the GPU)")
      ->capture_default_str();
  cmd->add_option("--precision", a.precision, "cuda: bf16 (weights and matrix inputs) or f32 (exact mode)")
      ->capture_default_str();
  cmd->add_option("--state-precision", a.state_precision,
                  "cuda: the Mamba-3 ssm state, f32 or bf16 (half the state memory and traffic; rounded every step)")
      ->capture_default_str();
  cmd->add_flag("--greedy", a.greedy, "greedy decoding (same as --temperature 0)");
  cmd->add_flag("--print-ids", a.print_ids, "print the generated token ids (one JSON list per sequence)");
  cmd->add_flag("--no-stats", a.no_stats, "do not print the speed summary on stderr");
  cmd->callback([] { run(a); });
}

}  // namespace mamba3::cli
