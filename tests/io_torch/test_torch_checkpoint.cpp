// pytorch_model.bin (torch.save zip) reader and the three-layout weight loader: golden checkpoints against their
// safetensors twins, synthetic archives written here (every storage type, shared storages, offsets, strides, ZIP64
// sentinels, misaligned data, protocol-4 opcodes) and malformed files that must fail naming the file at fault.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "io/safetensors.h"
#include "io/torch_checkpoint.h"
#include "io/weights.h"
#include "support/test_support.h"

namespace mamba3 {
namespace {

namespace fs = std::filesystem;

// A fresh folder per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            fmt::format("mamba3_io_torch_{}_{}_{}", info->test_suite_name(), info->name(), ::getpid());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

::testing::AssertionResult bit_equal(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype())
    return ::testing::AssertionFailure() << "dtype " << dtype_name(a.dtype()) << " vs " << dtype_name(b.dtype());
  if (a.shape() != b.shape())
    return ::testing::AssertionFailure() << "shape " << shape_str(a.shape()) << " vs " << shape_str(b.shape());
  if (a.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) != 0) return ::testing::AssertionFailure() << "bytes";
  return ::testing::AssertionSuccess();
}

// Runs `f`, expecting a mamba3::Error whose message holds every string of `needles`.
template <typename F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no error thrown; expected one mentioning " << needles.at(0);
  } catch (const Error& e) {
    std::string what = e.what();
    for (const auto& n : needles) EXPECT_NE(what.find(n), std::string::npos) << "'" << n << "' not in: " << what;
  }
}

bool tied(const fs::path& dir) {
  std::ifstream in(dir / "config.json");
  auto cfg = nlohmann::json::parse(in);
  return cfg.value("tie_embeddings", true);
}

// ------------------------------------------------------------------------------------------------------------------
// A small torch.save look-alike, written from the format's description: pickle + stored zip (+ ZIP64 end records).

uint32_t crc32(const std::string& s) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : s) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  }
  return c ^ 0xFFFFFFFFu;
}

void le(std::string& s, uint64_t v, int bytes) {
  for (int k = 0; k < bytes; ++k) s.push_back(char(k < 8 ? (v >> (8 * k)) & 0xFF : 0));
}

class PickleWriter {
 public:
  explicit PickleWriter(bool proto4) : proto4_(proto4) {}
  std::string s;
  void op(unsigned char c) { s.push_back(char(c)); }
  void str(const std::string& v) {
    if (proto4_ && v.size() < 256) {
      op(0x8c);
      le(s, v.size(), 1);
    } else {
      op('X');
      le(s, v.size(), 4);
    }
    s += v;
  }
  void integer(int64_t v) {
    if (v >= 0 && v < 256) {
      op('K');
      le(s, uint64_t(v), 1);
    } else if (v >= 0 && v < 65536) {
      op('M');
      le(s, uint64_t(v), 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      op('J');
      le(s, uint64_t(uint32_t(int32_t(v))), 4);
    } else {
      op(0x8a);
      le(s, 8, 1);
      le(s, uint64_t(v), 8);
    }
  }
  void global(const std::string& module, const std::string& name) {
    if (proto4_) {
      str(module);
      str(name);
      op(0x93);
    } else {
      s += "c" + module + "\n" + name + "\n";
    }
  }
  uint32_t memoize() {
    uint32_t k = memo_++;
    if (proto4_) {
      op(0x94);
    } else if (k < 256) {
      op('q');
      le(s, k, 1);
    } else {
      op('r');
      le(s, k, 4);
    }
    return k;
  }
  void get(uint32_t k) {
    op(k < 256 ? 'h' : 'j');
    le(s, k, k < 256 ? 1 : 4);
  }
  void int_tuple(const std::vector<int64_t>& v) {
    op('(');
    for (int64_t x : v) integer(x);
    op('t');
  }
  void empty_ordered_dict() {
    global("collections", "OrderedDict");
    op(')');
    op('R');
  }

 private:
  bool proto4_;
  uint32_t memo_ = 0;
};

struct FakeStorage {
  std::string key, cls;  // cls: "FloatStorage", ...
  std::string bytes;
  int64_t numel;
};
struct FakeTensor {
  std::string name, key;
  int64_t offset;
  std::vector<int64_t> size, stride;
  bool parameter = false;  // wrapped in torch._utils._rebuild_parameter
};
struct FakeCheckpoint {
  std::vector<FakeStorage> storages;
  std::vector<FakeTensor> tensors;
  std::string top = "archive";
  bool proto4 = false;
  bool zip64_sentinels = false;          // end record and entries carry 0xFFFF.. with the values in ZIP64 fields
  int data_shift = 0;                    // data start modulo 64 (torch: 0); 1 makes every storage misaligned
  std::map<std::string, uint16_t> methods;  // entry name -> compression method to claim
  std::set<std::string> drop;            // entry names to leave out
  std::string pickle;                    // replaces the generated data.pkl when not empty
};

std::string make_pickle(const FakeCheckpoint& c) {
  PickleWriter p(c.proto4);
  p.op(0x80);
  p.op(c.proto4 ? 4 : 2);
  if (c.proto4) {  // a FRAME header: a length hint the reader skips
    p.op(0x95);
    le(p.s, 0, 8);
  }
  p.empty_ordered_dict();
  p.memoize();
  p.op('(');
  std::map<std::string, const FakeStorage*> by_key;
  for (const auto& s : c.storages) by_key[s.key] = &s;
  int64_t rebuild = -1;
  for (const auto& t : c.tensors) {
    p.str(t.name);
    if (t.parameter) {
      p.global("torch._utils", "_rebuild_parameter");
      p.op('(');
    }
    if (rebuild < 0) {
      p.global("torch._utils", "_rebuild_tensor_v2");
      rebuild = p.memoize();
    } else {
      p.get(uint32_t(rebuild));
    }
    const FakeStorage& st = *by_key.at(t.key);
    p.op('(');
    p.op('(');
    p.str("storage");
    p.global("torch", st.cls);
    p.str(st.key);
    p.str("cpu");
    p.integer(st.numel);
    p.op('t');
    p.op('Q');
    p.integer(t.offset);
    p.int_tuple(t.size);
    p.int_tuple(t.stride);
    p.op(0x89);
    p.empty_ordered_dict();
    p.op('t');
    p.op('R');
    if (t.parameter) {
      p.op(0x89);
      p.empty_ordered_dict();
      p.op('t');
      p.op('R');
    }
  }
  p.op('u');
  // state_dict._metadata = OrderedDict({"": {"version": 1}}), set by BUILD as torch does.
  p.op('}');
  p.str("_metadata");
  p.empty_ordered_dict();
  p.str("");
  p.op('}');
  p.str("version");
  p.integer(1);
  p.op('s');
  p.op('s');
  p.op('s');
  p.op('b');
  p.op('.');
  return p.s;
}

std::string make_zip(const std::vector<std::pair<std::string, std::string>>& entries, const FakeCheckpoint& c) {
  std::string out, central;
  for (const auto& [name, data] : entries) {
    uint16_t method = c.methods.count(name) ? c.methods.at(name) : 0;
    uint64_t local = out.size();
    uint64_t base = local + 30 + name.size() + 4;  // + the padding field's own header
    uint64_t pad = uint64_t((int64_t(c.data_shift) - int64_t(base % 64) + 128) % 64);
    std::string extra = "FB";
    le(extra, pad, 2);
    extra.append(pad, 'Z');
    uint32_t crc = crc32(data);
    le(out, 0x04034b50, 4);
    le(out, 45, 2);
    le(out, 0, 2);
    le(out, method, 2);
    le(out, 0, 4);
    le(out, crc, 4);
    le(out, data.size(), 4);
    le(out, data.size(), 4);
    le(out, name.size(), 2);
    le(out, extra.size(), 2);
    out += name + extra + data;

    std::string cextra;
    if (c.zip64_sentinels) {
      le(cextra, 1, 2);
      le(cextra, 24, 2);
      le(cextra, data.size(), 8);
      le(cextra, data.size(), 8);
      le(cextra, local, 8);
    }
    uint64_t s32 = c.zip64_sentinels ? 0xFFFFFFFF : data.size();
    le(central, 0x02014b50, 4);
    le(central, 0x031e, 2);
    le(central, 45, 2);
    le(central, 0, 2);
    le(central, method, 2);
    le(central, 0, 4);
    le(central, crc, 4);
    le(central, s32, 4);
    le(central, s32, 4);
    le(central, name.size(), 2);
    le(central, cextra.size(), 2);
    le(central, 0, 2 + 2 + 2 + 4);
    le(central, c.zip64_sentinels ? 0xFFFFFFFF : local, 4);
    central += name + cextra;
  }
  uint64_t cd_offset = out.size();
  out += central;
  uint64_t end64 = out.size();
  le(out, 0x06064b50, 4);
  le(out, 44, 8);
  le(out, 0x031e, 2);
  le(out, 45, 2);
  le(out, 0, 8);
  le(out, entries.size(), 8);
  le(out, entries.size(), 8);
  le(out, central.size(), 8);
  le(out, cd_offset, 8);
  le(out, 0x07064b50, 4);
  le(out, 0, 4);
  le(out, end64, 8);
  le(out, 1, 4);
  le(out, 0x06054b50, 4);
  le(out, 0, 4);
  le(out, c.zip64_sentinels ? 0xFFFF : entries.size(), 2);
  le(out, c.zip64_sentinels ? 0xFFFF : entries.size(), 2);
  le(out, c.zip64_sentinels ? 0xFFFFFFFF : central.size(), 4);
  le(out, c.zip64_sentinels ? 0xFFFFFFFF : cd_offset, 4);
  le(out, 0, 2);
  return out;
}

void write_checkpoint(const fs::path& path, const FakeCheckpoint& c) {
  std::vector<std::pair<std::string, std::string>> entries;
  entries.emplace_back(c.top + "/data.pkl", c.pickle.empty() ? make_pickle(c) : c.pickle);
  for (const auto& s : c.storages) entries.emplace_back(c.top + "/data/" + s.key, s.bytes);
  entries.emplace_back(c.top + "/version", "3\n");
  entries.emplace_back(c.top + "/byteorder", "little");
  std::erase_if(entries, [&](const auto& e) { return c.drop.count(e.first) != 0; });
  write_bytes(path, make_zip(entries, c));
}

template <typename T>
std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}
template <typename T>
std::vector<T> values_of(const Tensor& t) {
  std::vector<T> v(size_t(t.numel()));
  std::memcpy(v.data(), t.raw(), t.nbytes());
  return v;
}

// A checkpoint exercising every supported storage type, a shared storage, offsets, strides and odd shapes.
FakeCheckpoint rich_checkpoint() {
  FakeCheckpoint c;
  std::vector<float> emb(24);
  for (size_t i = 0; i < emb.size(); ++i) emb[i] = 0.5f * float(i) - 3.0f;
  c.storages.push_back({"0", "FloatStorage", bytes_of(emb), 24});
  c.storages.push_back({"1", "DoubleStorage", bytes_of(std::vector<double>{1.5, -2.25, 1e300}), 3});
  c.storages.push_back({"2", "HalfStorage", bytes_of(std::vector<uint16_t>{0x3c00, 0xc000, 0x7bff, 0x0001}), 4});
  c.storages.push_back({"3", "BFloat16Storage", bytes_of(std::vector<uint16_t>{0x3f80, 0xbf80}), 2});
  c.storages.push_back({"4", "LongStorage", bytes_of(std::vector<int64_t>{-1, int64_t(1) << 40, 7}), 3});
  c.storages.push_back({"5", "IntStorage", bytes_of(std::vector<int32_t>{10, 20, 30, 40, 50, 60}), 6});
  c.tensors = {
      {"backbone.embedding.weight", "0", 0, {6, 4}, {4, 1}},
      {"doubles", "1", 0, {3}, {1}},
      {"halves", "2", 1, {3}, {1}},  // storage_offset
      {"bf16", "3", 0, {2}, {1}, true},  // an nn.Parameter
      {"longs", "4", 0, {3}, {1}},
      {"ints_transposed", "5", 0, {3, 2}, {1, 3}},  // non-contiguous: copied
      {"ints_expanded", "5", 4, {2, 2}, {0, 1}},    // stride 0: copied
      {"scalar", "1", 2, {}, {}},
      {"empty", "0", 0, {0, 4}, {4, 1}},
      {"row_of_embedding", "0", 8, {1, 4}, {99, 1}},  // size-1 dims may carry any stride
      {"lm_head.weight", "0", 0, {6, 4}, {4, 1}},     // tied: the same storage as the embedding
  };
  return c;
}

void check_rich(const NamedTensors& got) {
  std::vector<std::string> names;
  for (const auto& [n, t] : got) names.push_back(n);
  ASSERT_EQ(names, (std::vector<std::string>{"backbone.embedding.weight", "doubles", "halves", "bf16", "longs",
                                             "ints_transposed", "ints_expanded", "scalar", "empty",
                                             "row_of_embedding", "lm_head.weight"}));
  std::map<std::string, Tensor> m(got.begin(), got.end());
  const Tensor& emb = m["backbone.embedding.weight"];
  EXPECT_EQ(emb.dtype(), DType::F32);
  EXPECT_EQ(emb.shape(), (Shape{6, 4}));
  EXPECT_EQ(values_of<float>(emb)[5], -0.5f);
  // Shared storage: the same bytes, not equal copies; offsets are views into them.
  EXPECT_EQ(m["lm_head.weight"].raw(), emb.raw());
  EXPECT_EQ(m["row_of_embedding"].data<float>(), emb.data<float>() + 8);
  EXPECT_EQ(m["row_of_embedding"].shape(), (Shape{1, 4}));
  EXPECT_EQ(values_of<double>(m["doubles"]), (std::vector<double>{1.5, -2.25, 1e300}));
  EXPECT_EQ(m["halves"].dtype(), DType::F16);
  EXPECT_EQ(values_of<uint16_t>(m["halves"]), (std::vector<uint16_t>{0xc000, 0x7bff, 0x0001}));
  EXPECT_EQ(m["bf16"].dtype(), DType::BF16);
  EXPECT_EQ(values_of<uint16_t>(m["bf16"]), (std::vector<uint16_t>{0x3f80, 0xbf80}));
  EXPECT_EQ(m["longs"].dtype(), DType::I64);
  EXPECT_EQ(values_of<int64_t>(m["longs"]), (std::vector<int64_t>{-1, int64_t(1) << 40, 7}));
  EXPECT_EQ(m["ints_transposed"].dtype(), DType::I32);
  EXPECT_EQ(m["ints_transposed"].shape(), (Shape{3, 2}));
  EXPECT_EQ(values_of<int32_t>(m["ints_transposed"]), (std::vector<int32_t>{10, 40, 20, 50, 30, 60}));
  EXPECT_EQ(values_of<int32_t>(m["ints_expanded"]), (std::vector<int32_t>{50, 60, 50, 60}));
  EXPECT_EQ(m["scalar"].shape(), Shape{});
  EXPECT_EQ(values_of<double>(m["scalar"]), std::vector<double>{1e300});
  EXPECT_EQ(m["empty"].shape(), (Shape{0, 4}));
}

// ------------------------------------------------------------------------------------------------------------------

std::vector<fs::path> lm_cases() {
  auto cases = test::golden_cases("lm_");
  EXPECT_FALSE(cases.empty()) << "no lm_* folders in " << test::golden_dir();
  return cases;
}

TEST(TorchCheckpoint, GoldenBinMatchesSafetensors) {
  for (const auto& dir : lm_cases()) {
    SCOPED_TRACE(dir.string());
    SafetensorsFile st = SafetensorsFile::open((dir / "model.safetensors").string());
    NamedTensors bin = read_torch_checkpoint((dir / "pytorch_model.bin").string());
    std::vector<std::string> expected = st.names(), got;
    if (tied(dir) && !st.has("lm_head.weight")) expected.push_back("lm_head.weight");
    for (const auto& [n, t] : bin) got.push_back(n);
    ASSERT_EQ(got, expected);
    std::map<std::string, Tensor> m(bin.begin(), bin.end());
    for (const auto& name : st.names()) EXPECT_TRUE(bit_equal(m[name], st.get(name))) << name;
    if (tied(dir)) {
      // These exports write the tied matrix as a second storage of equal bytes; one shared storage (what a
      // torch.save of a live tied model writes) is checked on a synthetic archive (SyntheticArchive).
      EXPECT_TRUE(bit_equal(m["lm_head.weight"], m["backbone.embedding.weight"]));
    }
  }
}

TEST(TorchCheckpoint, SyntheticArchive) {
  TempDir tmp;
  write_checkpoint(tmp.path() / "a.bin", rich_checkpoint());
  check_rich(read_torch_checkpoint(tmp.file("a.bin")));
}

TEST(TorchCheckpoint, Zip64SentinelsAndProtocol4) {
  TempDir tmp;
  FakeCheckpoint c = rich_checkpoint();
  c.zip64_sentinels = true;
  c.proto4 = true;
  c.top = "pytorch_model";
  write_checkpoint(tmp.path() / "a.bin", c);
  check_rich(read_torch_checkpoint(tmp.file("a.bin")));
}

TEST(TorchCheckpoint, MisalignedStoragesAreCopiedOnceAndStillShared) {
  TempDir tmp;
  FakeCheckpoint c = rich_checkpoint();
  c.data_shift = 1;
  write_checkpoint(tmp.path() / "a.bin", c);
  check_rich(read_torch_checkpoint(tmp.file("a.bin")));
}

TEST(TorchCheckpoint, TensorsOutliveTheirReader) {
  TempDir tmp;
  write_checkpoint(tmp.path() / "a.bin", rich_checkpoint());
  NamedTensors got = read_torch_checkpoint(tmp.file("a.bin"));
  fs::remove(tmp.path() / "a.bin");  // the mapping stays valid while a tensor holds it
  check_rich(got);
}

TEST(LoadWeights, EachGoldenDirAndEachLayout) {
  for (const auto& dir : lm_cases()) {
    SCOPED_TRACE(dir.string());
    Weights w = load_weights(dir.string());
    EXPECT_EQ(w.source(), (dir / "model.safetensors").string());
    SafetensorsFile st = SafetensorsFile::open((dir / "model.safetensors").string());
    EXPECT_EQ(w.names(), st.names());
    for (const auto& name : st.names()) EXPECT_TRUE(bit_equal(w.get(name), st.get(name))) << name;
    expect_error([&] { w.get("no.such.tensor"); }, {"model.safetensors", "no.such.tensor"});

    // Only the .bin: the loader falls back to it.
    TempDir tmp;
    fs::copy_file(dir / "pytorch_model.bin", tmp.path() / "pytorch_model.bin");
    Weights b = load_weights(tmp.path().string());
    EXPECT_EQ(b.source(), tmp.file("pytorch_model.bin"));
    for (const auto& name : st.names()) EXPECT_TRUE(bit_equal(b.get(name), st.get(name))) << name;
    EXPECT_EQ(b.has("lm_head.weight"), tied(dir) || st.has("lm_head.weight"));
  }
}

// Splits a golden model.safetensors into two shards plus an index.
void write_shards(const fs::path& dir, const SafetensorsFile& st) {
  NamedTensors first, second;
  nlohmann::ordered_json map = nlohmann::ordered_json::object();
  size_t total = 0;
  for (size_t i = 0; i < st.names().size(); ++i) {
    const std::string& name = st.names()[i];
    bool in_first = i < st.names().size() / 2;
    (in_first ? first : second).emplace_back(name, st.get(name));
    map[name] = in_first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    total += st.get(name).nbytes();
  }
  write_safetensors((dir / "model-00001-of-00002.safetensors").string(), first);
  write_safetensors((dir / "model-00002-of-00002.safetensors").string(), second);
  nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", map}};
  write_bytes(dir / "model.safetensors.index.json", index.dump(2));
}

TEST(LoadWeights, ShardedIndexLoadsIdentically) {
  for (const auto& dir : lm_cases()) {
    SCOPED_TRACE(dir.string());
    SafetensorsFile st = SafetensorsFile::open((dir / "model.safetensors").string());
    TempDir tmp;
    write_shards(tmp.path(), st);
    // The index wins over a pytorch_model.bin beside it.
    fs::copy_file(dir / "pytorch_model.bin", tmp.path() / "pytorch_model.bin");
    Weights w = load_weights(tmp.path().string());
    EXPECT_EQ(w.source(), tmp.file("model.safetensors.index.json"));
    EXPECT_EQ(w.names(), st.names());
    for (const auto& name : st.names()) EXPECT_TRUE(bit_equal(w.get(name), st.get(name))) << name;
    // ...and model.safetensors wins over both.
    fs::copy_file(dir / "model.safetensors", tmp.path() / "model.safetensors");
    EXPECT_EQ(load_weights(tmp.path().string()).source(), tmp.file("model.safetensors"));
  }
}

TEST(LoadWeights, ShardErrors) {
  auto cases = lm_cases();
  ASSERT_FALSE(cases.empty());
  SafetensorsFile st = SafetensorsFile::open((cases[0] / "model.safetensors").string());
  TempDir tmp;
  write_shards(tmp.path(), st);
  const std::string index = tmp.file("model.safetensors.index.json");

  fs::rename(tmp.path() / "model-00002-of-00002.safetensors", tmp.path() / "moved.safetensors");
  expect_error([&] { load_weights(tmp.path().string()); },
               {"model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist"});
  fs::rename(tmp.path() / "moved.safetensors", tmp.path() / "model-00002-of-00002.safetensors");
  EXPECT_NO_THROW(load_weights(tmp.path().string()));

  auto json = nlohmann::ordered_json::parse(read_bytes(index));
  json["weight_map"]["backbone.not.there"] = "model-00001-of-00002.safetensors";
  write_bytes(index, json.dump());
  expect_error([&] { load_weights(tmp.path().string()); },
               {"model.safetensors.index.json", "backbone.not.there", "model-00001-of-00002.safetensors"});

  json["weight_map"]["backbone.not.there"] = "../elsewhere.safetensors";
  write_bytes(index, json.dump());
  expect_error([&] { load_weights(tmp.path().string()); }, {"model.safetensors.index.json", "elsewhere"});

  write_bytes(index, "{\"weight_map\": ");
  expect_error([&] { load_weights(tmp.path().string()); }, {"model.safetensors.index.json", "JSON"});
}

TEST(LoadWeights, EmptyDirectory) {
  TempDir tmp;
  expect_error([&] { load_weights(tmp.path().string()); }, {tmp.path().string(), "pytorch_model.bin"});
  expect_error([&] { load_weights(tmp.file("missing")); }, {tmp.file("missing")});
}

TEST(TorchCheckpointErrors, TruncatedAndCorruptedGolden) {
  auto cases = lm_cases();
  ASSERT_FALSE(cases.empty());
  const std::string good = read_bytes(cases[0] / "pytorch_model.bin");
  TempDir tmp;
  const std::string bin = tmp.file("pytorch_model.bin");

  for (size_t keep : {good.size() / 2, good.size() - 10, size_t(100), size_t(0)}) {
    SCOPED_TRACE(keep);
    write_bytes(bin, good.substr(0, keep));
    expect_error([&] { read_torch_checkpoint(bin); }, {bin});
    expect_error([&] { load_weights(tmp.path().string()); }, {bin});
  }

  // The first central directory record and the first local header lose their signatures.
  std::string bad = good;
  size_t central = bad.find(std::string("PK\x01\x02", 4));
  ASSERT_NE(central, std::string::npos);
  bad[central + 2] = 'X';
  write_bytes(bin, bad);
  expect_error([&] { read_torch_checkpoint(bin); }, {bin, "central directory"});

  bad = good;
  bad[1] = 'X';  // "PK\3\4" of the first entry, data.pkl
  write_bytes(bin, bad);
  expect_error([&] { read_torch_checkpoint(bin); }, {bin, "data.pkl", "local header"});

  // A flipped byte inside data.pkl fails its CRC.
  bad = good;
  size_t pkl = bad.find("_rebuild_tensor_v2");
  ASSERT_NE(pkl, std::string::npos);
  bad[pkl] ^= 0x20;
  write_bytes(bin, bad);
  expect_error([&] { read_torch_checkpoint(bin); }, {bin, "data.pkl", "CRC"});

  // The legacy (pre-zip) format is a bare pickle.
  write_bytes(bin, std::string("\x80\x02\x8a\x0a", 4) + std::string(40, 'x'));
  expect_error([&] { read_torch_checkpoint(bin); }, {bin, "legacy"});
}

TEST(TorchCheckpointErrors, Synthetic) {
  using namespace std::string_literals;
  TempDir tmp;
  const std::string bin = tmp.file("x.bin");
  auto check = [&](const FakeCheckpoint& c, const std::vector<std::string>& needles) {
    write_checkpoint(bin, c);
    std::vector<std::string> all = needles;
    all.push_back(bin);
    expect_error([&] { read_torch_checkpoint(bin); }, all);
  };

  FakeCheckpoint c = rich_checkpoint();
  c.methods["archive/data.pkl"] = 8;
  check(c, {"archive/data.pkl", "deflate"});
  c = rich_checkpoint();
  c.methods["archive/data/3"] = 8;
  check(c, {"archive/data/3", "deflate"});

  c = rich_checkpoint();
  c.drop.insert("archive/data/4");
  check(c, {"missing data file", "archive/data/4"});

  c = rich_checkpoint();
  c.drop.insert("archive/data.pkl");
  check(c, {"data.pkl"});

  c = rich_checkpoint();
  c.storages[5].numel = 7;  // claims more elements than its 24 bytes hold
  check(c, {"storage '5'", "archive/data/5"});

  c = rich_checkpoint();
  c.tensors[2].offset = 2;  // 3 halves from offset 2 overrun the 4-element storage
  check(c, {"tensor 'halves'", "storage '2'"});

  c = rich_checkpoint();
  c.tensors[0].size = {6, 4, 2};  // size and stride ranks differ
  check(c, {"tensor 'backbone.embedding.weight'", "dimensions"});

  c = rich_checkpoint();
  c.storages[1].cls = "ByteStorage";
  check(c, {"torch.ByteStorage", "unsupported global"});

  c = rich_checkpoint();
  c.pickle = "\x80\x02" "cos\nsystem\n" "X\x02\x00\x00\x00" "ls\x85R."s;
  check(c, {"os.system", "unsupported global", "opcode 0x63"});

  c = rich_checkpoint();
  c.pickle = "\x80\x02}q\x00(X\x01\x00\x00\x00" "a" "I1\n" "u."s;  // the text-protocol INT opcode
  check(c, {"opcode 0x49", "byte 12"});

  c = rich_checkpoint();
  c.pickle = make_pickle(c);
  c.pickle.resize(c.pickle.size() / 2);
  check(c, {"archive/data.pkl", "truncated"});

  c = rich_checkpoint();
  c.pickle = "\x80\x02K\x05."s;
  check(c, {"not a state_dict"});

  c = rich_checkpoint();
  c.pickle = "\x80\x02}h\x07."s;
  check(c, {"memo key 7"});
}

}  // namespace
}  // namespace mamba3
