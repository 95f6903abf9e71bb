#include "train/data.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include "core/atomic_file.h"
#include "core/error.h"

namespace mamba3 {

namespace {

constexpr char kMagic[8] = {'M', '3', 'T', 'O', 'K', 'E', 'N', 'S'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 32;

std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open: {}", path, std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail("{}: read failed", path);
  return bytes;
}

template <typename T>
T load_le(const char* p) {  // the format is little-endian, as is every machine this builds for
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

bool has_magic(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char head[8] = {};
  return in.read(head, 8) && std::memcmp(head, kMagic, 8) == 0;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

TokenData read_token_file(const std::string& path) {
  const std::string bytes = read_whole_file(path);
  MAMBA3_CHECK(!bytes.empty(), "{}: the data file is empty", path);
  MAMBA3_CHECK(bytes.size() >= kHeaderBytes && std::memcmp(bytes.data(), kMagic, 8) == 0,
               "{}: not a token file (no M3TOKENS header; `mamba3 prepare` writes one)", path);
  const uint32_t version = load_le<uint32_t>(bytes.data() + 8);
  MAMBA3_CHECK(version == kVersion, "{}: token file version {} (this build reads version {})", path, version, kVersion);
  TokenData d;
  d.source = path;
  d.vocab_size = load_le<uint32_t>(bytes.data() + 12);
  const uint64_t n_train = load_le<uint64_t>(bytes.data() + 16), n_val = load_le<uint64_t>(bytes.data() + 24);
  const uint64_t payload = bytes.size() - kHeaderBytes;
  MAMBA3_CHECK(n_train <= payload / 4 && n_val <= payload / 4 && (n_train + n_val) * 4 == payload,
               "{}: header says {} + {} ids but the file holds {} bytes of ids (truncated or corrupt)", path, n_train,
               n_val, payload);
  MAMBA3_CHECK(n_train + n_val > 0, "{}: the token file holds no tokens", path);
  d.train.resize(n_train);
  d.val.resize(n_val);
  std::memcpy(d.train.data(), bytes.data() + kHeaderBytes, n_train * 4);
  std::memcpy(d.val.data(), bytes.data() + kHeaderBytes + n_train * 4, n_val * 4);
  return d;
}

void write_token_file(const std::string& path, const TokenData& data) {
  char header[kHeaderBytes];
  std::memcpy(header, kMagic, 8);
  const uint64_t n_train = data.train.size(), n_val = data.val.size();
  std::memcpy(header + 8, &kVersion, 4);
  std::memcpy(header + 12, &data.vocab_size, 4);
  std::memcpy(header + 16, &n_train, 8);
  std::memcpy(header + 24, &n_val, 8);
  AtomicFile file(path);
  file.write(header, sizeof header);
  file.write(data.train.data(), n_train * 4);
  file.write(data.val.data(), n_val * 4);
  file.commit();
}

TokenData tokenize_text_files(const std::vector<std::string>& paths, const TextEncoder& encode, uint32_t vocab_size,
                              double val_fraction) {
  MAMBA3_CHECK(!paths.empty(), "no input text files");
  MAMBA3_CHECK(val_fraction >= 0 && val_fraction < 1, "validation fraction {} must lie in [0, 1)", val_fraction);
  std::vector<uint32_t> ids;
  for (const std::string& path : paths) {
    const std::string text = read_whole_file(path);
    MAMBA3_CHECK(!text.empty(), "{}: the text file is empty", path);
    encode(text, ids);
  }
  TokenData d;
  d.vocab_size = vocab_size;
  d.source = paths.size() == 1 ? paths[0] : paths[0] + " (and " + std::to_string(paths.size() - 1) + " more)";
  for (size_t i = 0; i < ids.size(); ++i)
    MAMBA3_CHECK(ids[i] < vocab_size, "{}: the tokenizer produced id {} ≥ its vocabulary size {}", d.source, ids[i],
                 vocab_size);
  const size_t n_val = size_t(std::ceil(val_fraction * double(ids.size())));
  MAMBA3_CHECK(n_val < ids.size(), "{}: {} tokens leave nothing for training after the validation split", d.source,
               ids.size());
  d.val.assign(ids.end() - std::ptrdiff_t(n_val), ids.end());
  ids.resize(ids.size() - n_val);
  d.train = std::move(ids);
  return d;
}

TokenData load_training_data(const std::string& path, const TextEncoder& encode, uint32_t vocab_size,
                             double val_fraction) {
  std::ifstream probe(path, std::ios::binary);
  if (!probe) fail("{}: cannot open the data file: {}", path, std::strerror(errno));
  if (has_magic(path)) return read_token_file(path);
  return tokenize_text_files({path}, encode, vocab_size, val_fraction);
}

void check_token_data(const TokenData& d, int64_t model_vocab, int64_t window, bool need_val) {
  MAMBA3_CHECK(window >= 2, "sequence length must be ≥ 1 (a window of L+1 = {} ids)", window);
  for (const auto* part : {&d.train, &d.val}) {
    const char* which = part == &d.train ? "training" : "validation";
    for (size_t i = 0; i < part->size(); ++i)
      MAMBA3_CHECK(int64_t((*part)[i]) < model_vocab,
                   "{}: {} token {} at position {} is ≥ the model's vocab_size {} (was the data prepared with "
                   "another tokenizer?)",
                   d.source, which, (*part)[i], i, model_vocab);
  }
  MAMBA3_CHECK(int64_t(d.train.size()) >= window,
               "{}: {} training tokens are too few for one window of seq_len + 1 = {} tokens", d.source,
               d.train.size(), window);
  MAMBA3_CHECK(!need_val || int64_t(d.val.size()) >= window,
               "{}: {} validation tokens are too few for one window of seq_len + 1 = {} tokens (raise the "
               "validation fraction, or turn evaluation off with --eval-every 0)",
               d.source, d.val.size(), window);
}

WindowSampler::WindowSampler(const std::vector<uint32_t>& tokens, int64_t window, uint64_t seed)
    : tokens_(&tokens), window_(window), seed_(seed) {
  MAMBA3_CHECK(window >= 1 && int64_t(tokens.size()) >= window, "{} tokens are too few for a window of {}",
               tokens.size(), window);
}

int64_t WindowSampler::start(int64_t step, int64_t index) const {
  const uint64_t range = uint64_t(int64_t(tokens_->size()) - window_ + 1);
  const uint64_t h = splitmix64(splitmix64(splitmix64(seed_) ^ uint64_t(step)) ^ uint64_t(index));
  return int64_t((unsigned __int128)h * range >> 64);
}

void WindowSampler::sample(int64_t step, int64_t index, int64_t* out) const {
  const uint32_t* src = tokens_->data() + start(step, index);
  for (int64_t i = 0; i < window_; ++i) out[i] = src[i];
}

int64_t validation_windows(const std::vector<uint32_t>& tokens, int64_t window, int64_t count,
                           std::vector<int64_t>& out) {
  const int64_t n = std::min<int64_t>(count, int64_t(tokens.size()) / window);
  out.resize(size_t(n * window));
  for (int64_t i = 0; i < n * window; ++i) out[size_t(i)] = tokens[size_t(i)];
  return n;
}

void split_windows(const int64_t* tokens, int64_t B, int64_t L, std::vector<int64_t>& inputs,
                   std::vector<int64_t>& targets) {
  inputs.resize(size_t(B * L)), targets.resize(size_t(B * L));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t) {
      inputs[size_t(b * L + t)] = tokens[b * (L + 1) + t];
      targets[size_t(b * L + t)] = tokens[b * (L + 1) + t + 1];
    }
}

}  // namespace mamba3
