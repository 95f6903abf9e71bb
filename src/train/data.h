#pragma once
// Training data: token files, their preparation from text, the train/validation split and seeded window sampling.
//
// Token file (little-endian; written atomically):
//   offset  0  8 bytes  magic "M3TOKENS"
//           8  uint32   format version (1)
//          12  uint32   vocab_size of the tokenizer that produced the ids (every id is < vocab_size)
//          16  uint64   n_train: number of training ids
//          24  uint64   n_val: number of validation ids
//          32  uint32 × (n_train + n_val): the training ids, then the validation ids
// The split is by position: the validation ids are the last ⌈val_fraction · n⌉ ids of the concatenated input
// (text files are tokenized one by one, in the order given, and concatenated with nothing in between).
//
// The tokenizer lives above this module, so text is tokenized through a TextEncoder the caller builds
// (the CLI builds it from a Tokenizer; a Tokenizer::bytes() encoder is the default).
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace mamba3 {

// Appends the ids of `text` to `out`.
using TextEncoder = std::function<void(std::string_view text, std::vector<uint32_t>& out)>;

struct TokenData {
  std::vector<uint32_t> train, val;
  uint32_t vocab_size = 0;  // of the producing tokenizer
  std::string source;       // for error messages
};

// Reads a token file; throws naming the path for a missing, empty, truncated or malformed file.
TokenData read_token_file(const std::string& path);
void write_token_file(const std::string& path, const TokenData& data);

// Tokenizes the files in order and splits off the last ⌈val_fraction · n⌉ ids (0 ≤ val_fraction < 1).
// Throws for a missing or empty file, or when nothing is left for training.
TokenData tokenize_text_files(const std::vector<std::string>& paths, const TextEncoder& encode, uint32_t vocab_size,
                              double val_fraction);

// `--data` of `mamba3 train`: a token file (by its magic) or a text file tokenized on the fly as `prepare` would.
TokenData load_training_data(const std::string& path, const TextEncoder& encode, uint32_t vocab_size,
                             double val_fraction);

// Checks before training: every id < model_vocab, enough training ids for one window of `window` ids, and (when
// need_val) enough validation ids for one window. Errors name data.source.
void check_token_data(const TokenData& data, int64_t model_vocab, int64_t window, bool need_val);

// Random windows of `window` consecutive ids, a pure function of (seed, step, index): no hidden state, so a resumed
// run samples exactly what the uninterrupted run would, and sequence `index` of optimizer step `step` is the same
// window whatever the split of that step into micro-batches.
class WindowSampler {
 public:
  WindowSampler(const std::vector<uint32_t>& tokens, int64_t window, uint64_t seed);
  int64_t start(int64_t step, int64_t index) const;  // the window's first position
  // Writes the window's ids (window int64 values).
  void sample(int64_t step, int64_t index, int64_t* out) const;

 private:
  const std::vector<uint32_t>* tokens_;
  int64_t window_;
  uint64_t seed_;
};

// Deterministic validation windows: up to `count` non-overlapping windows from the start of `tokens`, written
// row after row into `out` (resized). Returns the number of windows (≥ 1 when tokens.size() ≥ window).
int64_t validation_windows(const std::vector<uint32_t>& tokens, int64_t window, int64_t count,
                           std::vector<int64_t>& out);

// Language-model windows (B rows of L+1 ids) as inputs (B, L) = ids [0, L) and targets (B, L) = ids [1, L] of each
// row (both resized).
void split_windows(const int64_t* tokens, int64_t B, int64_t L, std::vector<int64_t>& inputs,
                   std::vector<int64_t>& targets);

}  // namespace mamba3
