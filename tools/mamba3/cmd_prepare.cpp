// `mamba3 prepare --tokenizer PATH|bytes --input a.txt [b.txt …] --out tokens.bin [--val-fraction 0.05]`: text files
// → a token file for `mamba3 train` (format in src/train/data.h): the files are tokenized in order, concatenated,
// and the last val-fraction of the ids is kept apart for validation — or, with `--val-input v.txt …`, the
// validation ids are exactly those of the files given there (and --val-fraction is not used).
#include <cstdio>
#include <string>
#include <vector>

#include "commands.h"
#include "core/error.h"
#include "text_encoder.h"
#include "train/data.h"

namespace mamba3::cli {

void register_prepare(CLI::App& app) {
  auto* cmd = app.add_subcommand("prepare", "Tokenize text files into a token file for `mamba3 train`");
  static std::string tokenizer = "bytes", out;
  static std::vector<std::string> inputs, val_inputs;
  static double val_fraction = 0.05;
  cmd->add_option("-t,--tokenizer", tokenizer, "tokenizer.json, tiktoken rank file, model directory, or 'bytes'")
      ->capture_default_str();
  cmd->add_option("-i,--input", inputs, "text files (UTF-8), tokenized in this order")->required();
  cmd->add_option("-o,--out", out, "token file to write")->required();
  auto* fraction = cmd->add_option("--val-fraction", val_fraction,
                                   "share of the ids kept for validation (the last ones)")
                       ->capture_default_str();
  cmd->add_option("--val-input", val_inputs, "text files that are the validation split (instead of --val-fraction)")
      ->excludes(fraction);
  cmd->callback([] {
    const Tokenizer tok = training_tokenizer(tokenizer);
    const double fraction_used = val_inputs.empty() ? val_fraction : 0;
    TokenData data = tokenize_text_files(inputs, text_encoder(tok), tok.vocab_size(), fraction_used);
    if (!val_inputs.empty())
      data.val = tokenize_text_files(val_inputs, text_encoder(tok), tok.vocab_size(), 0).train;
    write_token_file(out, data);
    std::fprintf(stderr, "%s: %zu training + %zu validation tokens (vocabulary %u, %s)\n", out.c_str(),
                 data.train.size(), data.val.size(), data.vocab_size, tok.describe().c_str());
  });
}

}  // namespace mamba3::cli
