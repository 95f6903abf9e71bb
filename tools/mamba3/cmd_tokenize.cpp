// `mamba3 tokenize -t PATH [--pattern NAME] [--allow-special] [--decode]`: UTF-8 text on stdin → the ids as one JSON
// array on stdout; with --decode, a JSON array of ids on stdin → the text. PATH is a tokenizer.json, a tiktoken rank
// file (NAME: cl100k, o200k, llama3, gpt2; guessed from the vocabulary size when left out), or a model directory.
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace mamba3::cli {

void register_tokenize(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Encode stdin to token ids (or decode ids with --decode)");
  static std::string path, pattern;
  static bool decode = false, allow_special = false, describe = false;
  cmd->add_option("-t,--tokenizer", path, "tokenizer.json, tiktoken rank file, or model directory")->required();
  cmd->add_option("--pattern", pattern, "split pattern of a rank file: cl100k, o200k, llama3, gpt2");
  cmd->add_flag("--decode", decode, "read a JSON array of ids, print the text");
  cmd->add_flag("--allow-special", allow_special, "turn special-token text (e.g. <|endoftext|>) into its id");
  cmd->add_flag("--describe", describe, "print what was loaded to stderr");
  cmd->callback([] {
    const Tokenizer tok = std::filesystem::is_directory(path) ? Tokenizer::from_model_dir(path)
                                                               : Tokenizer::load(path, pattern);
    if (describe) std::fprintf(stderr, "%s\n", tok.describe().c_str());
    std::ios::sync_with_stdio(false);
    const std::string input{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
    if (decode) {
      std::vector<uint32_t> ids;
      try {
        ids = nlohmann::json::parse(input).get<std::vector<uint32_t>>();
      } catch (const nlohmann::json::exception& e) {
        fail("--decode expects a JSON array of token ids on stdin: {}", e.what());
      }
      const std::string text = tok.decode(ids);
      std::fwrite(text.data(), 1, text.size(), stdout);
      return;
    }
    const std::vector<uint32_t> ids = tok.encode(input, allow_special);
    std::string out = "[";
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) out += ',';
      out += std::to_string(ids[i]);
    }
    out += "]\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
  });
}

}  // namespace mamba3::cli
