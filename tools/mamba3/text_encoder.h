#pragma once
// `--tokenizer PATH|bytes` of `prepare` and `train`: the tokenizer that turns text into training ids.
#include <filesystem>
#include <string>

#include "tokenizer/tokenizer.h"
#include "train/data.h"

namespace mamba3::cli {

inline Tokenizer training_tokenizer(const std::string& spec) {
  if (spec.empty() || spec == "bytes") return Tokenizer::bytes();
  return std::filesystem::is_directory(spec) ? Tokenizer::from_model_dir(spec) : Tokenizer::load(spec);
}

// Encodes as `mamba3 tokenize` does (special-token text stays plain text). The tokenizer is shared, not copied.
inline TextEncoder text_encoder(const Tokenizer& tok) {
  return [tok](std::string_view text, std::vector<uint32_t>& out) { tok.encode_into(text, false, out); };
}

}  // namespace mamba3::cli
