// safetensors: writer/reader round trips, a real golden file, and every way a file can be malformed (built by hand,
// byte by byte), each of which must fail with a mamba3::Error naming the file and the offending tensor or field.
#include "io/safetensors.h"

#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "support/test_support.h"

namespace mamba3 {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_all(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// 8-byte little-endian length, then the header, then the data. `length` overrides the recorded header length.
std::string st_bytes(const std::string& header, const std::string& data, uint64_t length) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char((length >> (8 * i)) & 0xff);
  return out + header + data;
}
std::string st_bytes(const std::string& header, const std::string& data = "") {
  return st_bytes(header, data, header.size());
}

// Fills a tensor's bytes with a pattern that differs per byte and per tensor.
void fill_pattern(Tensor& t, unsigned seed) {
  std::mt19937 rng(seed);
  auto* p = static_cast<unsigned char*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(rng());
}

std::string bytes_of(const Tensor& t) { return std::string(static_cast<const char*>(t.raw()), t.nbytes()); }

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mamba3_st_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // The message of the mamba3::Error that opening `file` throws.
  static std::string open_error(const std::string& file) {
    try {
      SafetensorsFile::open(file);
    } catch (const Error& e) {
      return e.what();
    }
    ADD_FAILURE() << "expected a mamba3::Error opening " << file;
    return "";
  }

  // Writes `bytes` to a fresh file and checks that opening it fails naming the file and every one of `needles`.
  void expect_bad(const std::string& bytes, const std::vector<std::string>& needles) {
    std::string file = path("bad_" + std::to_string(++count_) + ".safetensors");
    write_all(file, bytes);
    std::string msg = open_error(file);
    EXPECT_THAT(msg, HasSubstr(file));
    for (const auto& n : needles) EXPECT_THAT(msg, HasSubstr(n)) << "header: " << (bytes.size() > 8 ? bytes.substr(8, 200) : "");
  }

  // A header with one tensor `w` whose entry is `entry`, and `data_size` bytes of data.
  void expect_bad_entry(const std::string& entry, size_t data_size, const std::vector<std::string>& needles) {
    std::vector<std::string> all = needles;
    all.push_back("'w'");
    expect_bad(st_bytes(R"({"w": )" + entry + "}", std::string(data_size, '\0')), all);
  }

  fs::path dir_;
  int count_ = 0;
};

TEST_F(Safetensors, RoundTripEveryDtypeAndShape) {
  NamedTensors tensors;
  const std::vector<std::pair<DType, Shape>> kinds = {
      {DType::F32, {3, 5}},    {DType::F64, {7}},  {DType::BF16, {2, 3, 4}}, {DType::F16, {5, 1}},
      {DType::I32, {9}},       {DType::I64, {2, 2}}, {DType::F32, {}},       {DType::BF16, {}},
      {DType::F16, {0}},       {DType::I64, {4, 0, 2}}, {DType::F64, {1, 1, 1, 1}}, {DType::BF16, {3}}};
  unsigned seed = 0;
  for (const auto& [dtype, shape] : kinds) {
    Tensor t = Tensor::empty(dtype, shape);
    fill_pattern(t, ++seed);
    tensors.emplace_back(fmt::format("t{}.{}", seed, dtype_name(dtype)), t);
  }
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"config", R"({"d_model": 64})"}, {"empty", ""}, {"unicode", "Mamba-3 ∂ état"}};
  std::string file = path("round.safetensors");
  write_safetensors(file, tensors, metadata);

  SafetensorsFile st = SafetensorsFile::open(file);
  EXPECT_EQ(st.path(), file);
  EXPECT_EQ(st.metadata(), metadata);
  ASSERT_EQ(st.names().size(), tensors.size());
  EXPECT_EQ(st.tensors().size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, want] = tensors[i];
    EXPECT_EQ(st.names()[i], name) << "file order kept";
    ASSERT_TRUE(st.has(name));
    const Tensor& got = st.get(name);
    EXPECT_EQ(got.dtype(), want.dtype()) << name;
    EXPECT_EQ(got.shape(), want.shape()) << name;
    EXPECT_EQ(bytes_of(got), bytes_of(want)) << name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(got.raw()) % dtype_size(got.dtype()), 0u) << name;
  }
  EXPECT_FALSE(st.has("missing"));
  EXPECT_FALSE(st.has("__metadata__"));

  // The layout itself: the data section starts 8-byte aligned, the header is the JSON the spec describes, and the
  // data is the tensors back to back.
  std::string bytes = read_all(file);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  auto header = nlohmann::ordered_json::parse(bytes.substr(8, n));
  ASSERT_TRUE(header.contains("__metadata__"));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const auto& e = header.at(name);
    EXPECT_EQ(e["dtype"], std::string(dtype_name(t.dtype())));
    EXPECT_EQ(e["shape"].get<Shape>(), t.shape());
    EXPECT_EQ(e["data_offsets"][0].get<uint64_t>(), offset);
    EXPECT_EQ(e["data_offsets"][1].get<uint64_t>(), offset + t.nbytes());
    EXPECT_EQ(bytes.substr(8 + n + offset, t.nbytes()), bytes_of(t)) << name;
    offset += t.nbytes();
  }
  EXPECT_EQ(bytes.size(), 8 + n + offset);
}

// Header lengths of every residue mod 8 (via name lengths) all come out padded to 8.
TEST_F(Safetensors, HeaderAlwaysAligned) {
  for (int len = 1; len <= 16; ++len) {
    std::string file = path("align" + std::to_string(len) + ".safetensors");
    write_safetensors(file, {{std::string(size_t(len), 'n'), Tensor::from_floats({1, 2, 3}, {3})}});
    std::string bytes = read_all(file);
    uint64_t n;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ(n % 8, 0u) << len;
    EXPECT_EQ(SafetensorsFile::open(file).get(std::string(size_t(len), 'n')).data<float>()[2], 3.0f);
  }
}

TEST_F(Safetensors, NoTensorsNoMetadata) {
  std::string file = path("empty.safetensors");
  write_safetensors(file, {});
  SafetensorsFile st = SafetensorsFile::open(file);
  EXPECT_TRUE(st.names().empty());
  EXPECT_TRUE(st.metadata().empty());
  std::string bytes = read_all(file);
  EXPECT_EQ(bytes.find("__metadata__"), std::string::npos);
}

TEST_F(Safetensors, EmptyAndScalarTensors) {
  Tensor scalar = Tensor::from_floats({-3.25f}, {});
  Tensor empty = Tensor::zeros(DType::F32, {0, 4});
  Tensor after = Tensor::from_floats({1, 2}, {2});
  std::string file = path("mixed.safetensors");
  write_safetensors(file, {{"empty_first", empty}, {"scalar", scalar}, {"empty_mid", empty}, {"after", after}});
  SafetensorsFile st = SafetensorsFile::open(file);
  EXPECT_EQ(st.get("scalar").shape(), Shape{});
  EXPECT_EQ(st.get("scalar").numel(), 1);
  EXPECT_EQ(st.get("scalar").data<float>()[0], -3.25f);
  EXPECT_EQ(st.get("empty_first").shape(), (Shape{0, 4}));
  EXPECT_EQ(st.get("empty_mid").numel(), 0);
  EXPECT_EQ(st.get("after").data<float>()[1], 2.0f);
}

// An empty tensor shares no bytes with anything, whichever order the header lists it in.
TEST_F(Safetensors, EmptyTensorAtAnotherTensorsOffsetIsNotAnOverlap) {
  std::string data(8, '\0');
  float vals[2] = {1.5f, -2.0f};
  std::memcpy(data.data(), vals, 8);
  for (const char* header :
       {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})",
        R"({"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
        R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}})",
        R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}})"}) {
    std::string file = path("empty_at_offset.safetensors");
    write_all(file, st_bytes(header, data));
    SafetensorsFile st = SafetensorsFile::open(file);
    EXPECT_EQ(st.get("a").data<float>()[1], -2.0f) << header;
    EXPECT_EQ(st.get("e").numel(), 0) << header;
  }
}

// Header lengths that leave the data misaligned: the reader copies rather than handing out unaligned views.
TEST_F(Safetensors, MisalignedDataIsCopied) {
  std::string header = R"({"x": {"dtype": "F64", "shape": [2], "data_offsets": [1, 17]}})";
  double vals[2] = {3.5, -7.25};
  std::string data(17, '\0');
  std::memcpy(data.data() + 1, vals, 16);
  std::string file = path("misaligned.safetensors");
  write_all(file, st_bytes(header, data));
  SafetensorsFile st = SafetensorsFile::open(file);
  const Tensor& x = st.get("x");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(x.raw()) % 8, 0u);
  EXPECT_EQ(x.data<double>()[0], 3.5);
  EXPECT_EQ(x.data<double>()[1], -7.25);
}

// Trailing spaces in the header (other writers pad too), gaps between tensors and bytes after the last are allowed.
TEST_F(Safetensors, PaddedHeaderAndGaps) {
  std::string header = R"({"b": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]}})" + std::string(5, ' ');
  std::string data(16, '\0');
  int32_t v = -123456;
  std::memcpy(data.data() + 8, &v, 4);
  std::string file = path("padded.safetensors");
  write_all(file, st_bytes(header, data));
  EXPECT_EQ(SafetensorsFile::open(file).get("b").data<int32_t>()[0], -123456);
}

TEST_F(Safetensors, TensorsOutliveTheFileObject) {
  std::string file = path("keep.safetensors");
  write_safetensors(file, {{"w", Tensor::from_floats({1, 2, 3, 4}, {2, 2})}});
  Tensor w;
  {
    SafetensorsFile st = SafetensorsFile::open(file);
    w = st.get("w");
  }
  fs::remove(file);
  EXPECT_EQ(w.data<float>()[3], 4.0f);
  EXPECT_EQ(w.to(DType::BF16).to(DType::F32).data<float>()[2], 3.0f);
}

TEST_F(Safetensors, ReadsGoldenFile) {
  fs::path file = test::golden_dir() / "mixer_siso_basic.safetensors";
  if (!fs::exists(file)) GTEST_SKIP() << "no golden data at " << file;
  SafetensorsFile st = SafetensorsFile::open(file.string());

  // Parse the header independently and compare names, order, dtypes, shapes and bytes.
  std::string bytes = read_all(file);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  auto header = nlohmann::ordered_json::parse(bytes.substr(8, n));
  std::vector<std::string> names;
  for (auto it = header.begin(); it != header.end(); ++it)
    if (it.key() != "__metadata__") names.push_back(it.key());
  EXPECT_EQ(st.names(), names);
  ASSERT_GT(names.size(), 10u);
  for (const auto& name : names) {
    const auto& e = header[name];
    const Tensor& t = st.get(name);
    DType dtype;
    ASSERT_TRUE(dtype_from_name(e["dtype"].get<std::string>(), &dtype));
    EXPECT_EQ(t.dtype(), dtype) << name;
    EXPECT_EQ(t.shape(), e["shape"].get<Shape>()) << name;
    uint64_t begin = e["data_offsets"][0], end = e["data_offsets"][1];
    ASSERT_EQ(t.nbytes(), end - begin) << name;
    EXPECT_EQ(bytes_of(t), bytes.substr(8 + n + begin, end - begin)) << name;
  }
  EXPECT_EQ(st.get("in_proj.weight").shape(), (Shape{352, 64}));
  EXPECT_EQ(st.get("in_proj.weight").dtype(), DType::F32);
  EXPECT_EQ(st.get("prefill_out_f64").dtype(), DType::F64);
  EXPECT_EQ(st.get("prefill_out").shape(), (Shape{2, 37, 64}));
  ASSERT_TRUE(header.contains("__metadata__"));
  EXPECT_EQ(st.metadata().size(), header["__metadata__"].size());
  EXPECT_EQ(st.metadata().at("seqlen"), "37");
  auto config = nlohmann::json::parse(st.metadata().at("config"));
  EXPECT_EQ(config["d_model"], 64);
  EXPECT_THAT(open_error((test::golden_dir() / "no_such_case.safetensors").string()), HasSubstr("no_such_case"));
  try {
    st.get("no.such.tensor");
    ADD_FAILURE() << "expected a mamba3::Error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(file.string()));
    EXPECT_THAT(e.what(), HasSubstr("no.such.tensor"));
  }
}

// ---- Malformed files -------------------------------------------------------------------------------------------

TEST_F(Safetensors, ShorterThanEightBytes) {
  expect_bad("", {"8"});
  expect_bad(std::string("\x02\0\0\0\0", 5), {"5 bytes"});
  expect_bad(std::string(7, '\0'), {"7 bytes"});
}

TEST_F(Safetensors, HeaderLengthPastEnd) {
  expect_bad(st_bytes("{}", "", 1000), {"header length 1000"});
  expect_bad(st_bytes("{}", "", 3), {"header length 3"});
  expect_bad(st_bytes("{}", "", UINT64_MAX), {"header length 18446744073709551615"});
  expect_bad(st_bytes("{}", "", uint64_t(1) << 63), {"header length"});
}

TEST_F(Safetensors, BadJson) {
  for (const char* header : {"", "{", R"({"w": )", "{}}", "{'w': 1}", "{} x", "nul", "{\"w\": \"\xff\"}"})
    expect_bad(st_bytes(header), {"JSON"});
}

TEST_F(Safetensors, HeaderNotAnObject) {
  for (const char* header : {"[]", "[{}]", "3", R"("w")", "null", "true"}) expect_bad(st_bytes(header), {"not an object"});
}

TEST_F(Safetensors, EntryNotAnObject) {
  expect_bad_entry("3", 0, {"not a JSON object"});
  expect_bad_entry("[]", 0, {"not a JSON object"});
  expect_bad_entry("null", 0, {"not a JSON object"});
}

TEST_F(Safetensors, BadDtype) {
  expect_bad_entry(R"({"dtype": "F8_E5M2", "shape": [1], "data_offsets": [0, 1]})", 1, {"F8_E5M2", "dtype"});
  expect_bad_entry(R"({"dtype": "f32", "shape": [1], "data_offsets": [0, 4]})", 4, {"'f32'"});
  expect_bad_entry(R"({"shape": [1], "data_offsets": [0, 4]})", 4, {"dtype"});
  expect_bad_entry(R"({"dtype": 4, "shape": [1], "data_offsets": [0, 4]})", 4, {"dtype"});
}

TEST_F(Safetensors, DataOffsetsOutOfRange) {
  expect_bad_entry(R"({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]})", 8, {"data_offsets", "16", "8 bytes"});
  expect_bad_entry(R"({"dtype": "F32", "shape": [1], "data_offsets": [20, 24]})", 8, {"data_offsets"});
  expect_bad_entry(R"({"dtype": "F32", "shape": [1], "data_offsets": [18446744073709551612, 18446744073709551615]})",
                   8, {"data_offsets"});
  expect_bad_entry(R"({"dtype": "F32", "shape": [0], "data_offsets": [9, 9]})", 8, {"data_offsets"});
}

TEST_F(Safetensors, DataOffsetsBeginAfterEnd) {
  expect_bad_entry(R"({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]})", 8, {"data_offsets", "[8, 4]"});
}

TEST_F(Safetensors, DataOffsetsNotTwoIntegers) {
  for (const char* offsets : {"[0]", "[0, 4, 8]", "[]", R"("0,4")", "[0.0, 4]", "[0, 4.5]", "[-4, 0]", R"(["0", "4"])",
                              "[null, 4]", "{}", "4"})
    expect_bad_entry(std::string(R"({"dtype": "F32", "shape": [1], "data_offsets": )") + offsets + "}", 8,
                     {"data_offsets"});
  expect_bad_entry(R"({"dtype": "F32", "shape": [1]})", 8, {"data_offsets"});
}

TEST_F(Safetensors, ShapeSizeMismatch) {
  expect_bad_entry(R"({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]})", 8, {"(3)", "12 bytes", "span 8"});
  expect_bad_entry(R"({"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]})", 8, {"(2, 3)", "BF16"});
  expect_bad_entry(R"({"dtype": "F64", "shape": [], "data_offsets": [0, 4]})", 8, {"()"});
  expect_bad_entry(R"({"dtype": "F32", "shape": [0], "data_offsets": [0, 4]})", 8, {"(0)"});
}

TEST_F(Safetensors, BadShapeEntries) {
  for (const char* shape : {"[-1]", "[2, -3]", "[1.5]", "[2.0]", R"(["2"])", "[null]", "[[2]]", "[true]", "{}", "3",
                            R"("2,2")"})
    expect_bad_entry(std::string(R"({"dtype": "F32", "shape": )") + shape + R"(, "data_offsets": [0, 8]})", 8,
                     {"shape"});
  expect_bad_entry(R"({"dtype": "F32", "data_offsets": [0, 8]})", 8, {"shape"});
}

// Dimensions that overflow: entries past int64, and products that wrap even 128 bits (2^63·2^63·4·8 = 2^131) so a
// careless check sees "0 bytes" and accepts them.
TEST_F(Safetensors, HugeShapesRejected) {
  expect_bad_entry(R"({"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 8]})", 8, {"shape"});
  expect_bad_entry(R"({"dtype": "F64", "shape": [9223372036854775808, 9223372036854775808, 4], "data_offsets": [0, 0]})",
                   8, {"shape"});
  expect_bad_entry(
      R"({"dtype": "F64", "shape": [4611686018427387904, 4611686018427387904, 4611686018427387904], "data_offsets": [0, 0]})",
      8, {"shape"});
  expect_bad_entry(R"({"dtype": "I64", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]})", 8, {"shape"});
  // A huge dimension next to a zero is a legal empty tensor.
  std::string file = path("huge_zero.safetensors");
  write_all(file, st_bytes(R"({"z": {"dtype": "F32", "shape": [9223372036854775807, 0], "data_offsets": [0, 0]}})"));
  EXPECT_EQ(SafetensorsFile::open(file).get("z").numel(), 0);
}

TEST_F(Safetensors, OverlappingTensors) {
  std::string t = R"({"dtype": "F32", "shape": [2], "data_offsets": )";
  expect_bad(st_bytes("{\"a\": " + t + "[0, 8]}, \"b\": " + t + "[4, 12]}}", std::string(12, '\0')),
             {"'a'", "'b'", "overlap"});
  expect_bad(st_bytes("{\"b\": " + t + "[4, 12]}, \"a\": " + t + "[0, 8]}}", std::string(12, '\0')),
             {"'a'", "'b'", "overlap"});
  expect_bad(st_bytes("{\"a\": " + t + "[0, 8]}, \"b\": " + t + "[0, 8]}}", std::string(8, '\0')),
             {"'a'", "'b'", "overlap"});
  // Contained: c sits inside the span of a 4-element tensor, with another tensor between in sort order.
  std::string t4 = R"({"dtype": "F32", "shape": [4], "data_offsets": )";
  std::string t1 = R"({"dtype": "F32", "shape": [1], "data_offsets": )";
  expect_bad(st_bytes("{\"big\": " + t4 + "[0, 16]}, \"c\": " + t1 + "[8, 12]}, \"d\": " + t1 + "[16, 20]}}",
                      std::string(20, '\0')),
             {"'big'", "'c'", "overlap"});
}

TEST_F(Safetensors, DuplicateTensorNames) {
  std::string t = R"({"dtype": "F32", "shape": [1], "data_offsets": )";
  expect_bad(st_bytes("{\"w\": " + t + "[0, 4]}, \"w\": " + t + "[4, 8]}}", std::string(8, '\0')),
             {"'w'", "twice"});
  expect_bad(st_bytes(R"({"__metadata__": {}, "__metadata__": {}})"), {"__metadata__"});
}

TEST_F(Safetensors, BadMetadata) {
  expect_bad(st_bytes(R"({"__metadata__": "x"})"), {"__metadata__", "not an object"});
  expect_bad(st_bytes(R"({"__metadata__": ["a", "b"]})"), {"__metadata__", "not an object"});
  expect_bad(st_bytes(R"({"__metadata__": null})"), {"__metadata__"});
  expect_bad(st_bytes(R"({"__metadata__": {"ok": "fine", "seed": 1000}})"), {"__metadata__", "'seed'"});
  expect_bad(st_bytes(R"({"__metadata__": {"nested": {"a": "b"}}})"), {"__metadata__", "'nested'"});
  expect_bad(st_bytes(R"({"__metadata__": {"n": null}})"), {"__metadata__", "'n'"});
}

TEST_F(Safetensors, NonexistentOrNotAFile) {
  std::string missing = path("does_not_exist.safetensors");
  EXPECT_THAT(open_error(missing), HasSubstr(missing));
  EXPECT_THAT(open_error(dir_.string()), HasSubstr(dir_.string()));
}

// ---- Writer ------------------------------------------------------------------------------------------------------

TEST_F(Safetensors, WriterRejectsDuplicateAndReservedNames) {
  std::string file = path("dup.safetensors");
  Tensor t = Tensor::from_floats({1}, {1});
  for (const NamedTensors& bad : {NamedTensors{{"w", t}, {"v", t}, {"w", t}}, NamedTensors{{"__metadata__", t}}}) {
    try {
      write_safetensors(file, bad);
      ADD_FAILURE() << "expected a mamba3::Error";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(file));
      EXPECT_THAT(e.what(), HasSubstr(bad.back().first));
    }
    EXPECT_FALSE(fs::exists(file));
  }
  EXPECT_TRUE(fs::is_empty(dir_)) << "no temporary file left";
}

TEST_F(Safetensors, WriterRejectsUndefinedTensor) {
  std::string file = path("undef.safetensors");
  try {
    write_safetensors(file, {{"ok", Tensor::from_floats({1}, {1})}, {"missing", Tensor()}});
    ADD_FAILURE() << "expected a mamba3::Error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(file));
    EXPECT_THAT(e.what(), HasSubstr("'missing'"));
  }
  EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(Safetensors, WriterMissingDirectoryNamesPath) {
  std::string file = path("no/such/dir/out.safetensors");
  try {
    write_safetensors(file, {{"w", Tensor::from_floats({1}, {1})}});
    ADD_FAILURE() << "expected a mamba3::Error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(file));
  }
}

TEST_F(Safetensors, WriterReplacesExistingFile) {
  std::string file = path("replace.safetensors");
  write_safetensors(file, {{"old", Tensor::from_floats({1, 2}, {2})}});
  write_safetensors(file, {{"new", Tensor::from_floats({3}, {1})}}, {{"v", "2"}});
  SafetensorsFile st = SafetensorsFile::open(file);
  EXPECT_THAT(st.names(), ElementsAre("new"));
  EXPECT_EQ(st.metadata().at("v"), "2");
  EXPECT_EQ(st.get("new").data<float>()[0], 3.0f);
}

// Views (slices) write only their own rows.
TEST_F(Safetensors, WriterWritesViews) {
  Tensor t = Tensor::from_floats({0, 1, 2, 3, 4, 5}, {3, 2});
  std::string file = path("views.safetensors");
  write_safetensors(file, {{"mid", t.slice(1, 2)}, {"flat", t.reshape({6}).to(DType::F16)}});
  SafetensorsFile st = SafetensorsFile::open(file);
  EXPECT_EQ(st.get("mid").shape(), (Shape{1, 2}));
  EXPECT_EQ(st.get("mid").data<float>()[1], 3.0f);
  EXPECT_EQ(f16_to_f32(st.get("flat").data<uint16_t>()[5]), 5.0f);
}

}  // namespace
}  // namespace mamba3
