// The GEMM algorithm table of GPU training (train_gemm_algos.h): a TrainGemm given a table runs the table's shapes
// through cuBLASLt with the stored algorithm — the lowest-ranked candidate cuBLASLt offers, so not the default —
// and gets the product of the float64 reference (f32 and bf16 results, β = 0 and β = 1, transposed operands, awkward
// sizes), bit-identical when repeated; shapes the table lacks and unaligned operands keep cublasGemmEx's default; the
// file round-trips, and bad files are refused with errors naming the file.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda/train/train_gemm.h"
#include "cuda/train/train_gemm_algos.h"
#include "gpu_test_util.h"
#include "support/test_support.h"

namespace mamba3::test {
namespace {

using cuda::DeviceBuffer;
using cuda::GemmCall;
using cuda::Precision;

std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t count) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint16_t> v(count);
  for (auto& e : v) e = f32_to_bf16(u(rng));
  return v;
}

// α·op(A)·op(B) + β·C0 in float64 on the bf16 values (row-major, TrainGemm's convention).
std::vector<double> reference(const GemmCall& c, const std::vector<uint16_t>& A, const std::vector<uint16_t>& B,
                              float beta, const std::vector<float>& C0) {
  std::vector<double> out(size_t(c.m * c.n));
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < c.k; ++p) {
        const double a = bf16_to_f32(A[size_t(c.ta ? p * c.lda + i : i * c.lda + p)]);
        const double b = bf16_to_f32(B[size_t(c.tb ? j * c.ldb + p : p * c.ldb + j)]);
        s += a * b;
      }
      out[size_t(i * c.n + j)] = s + (beta != 0.0f ? double(C0[size_t(i * c.ldc + j)]) : 0.0);
    }
  return out;
}

GemmCall make_call(int64_t m, int64_t n, int64_t k, bool ta, bool tb, bool accumulate, bool bf16_out) {
  GemmCall c;
  c.ta = ta, c.tb = tb, c.accumulate = accumulate, c.bf16_out = bf16_out;
  c.m = m, c.n = n, c.k = k;
  c.lda = (ta ? m : k) + 8;  // padded rows
  c.ldb = tb ? k : n;
  c.ldc = n + (bf16_out ? 0 : 3);
  return c;
}

// A table holding, for c, the lowest-ranked of cuBLASLt's first 16 candidates.
std::shared_ptr<const cuda::GemmAlgoTable> table_with_last_candidate(const GemmCall& c) {
  cublasLtHandle_t lt = nullptr;
  MAMBA3_CUBLAS_CHECK(cublasLtCreate(&lt));
  const std::vector<cublasLtMatmulAlgo_t> algos = cuda::lt_candidates(lt, c, 16, size_t(32) << 20);
  cublasLtDestroy(lt);
  EXPECT_FALSE(algos.empty()) << "cuBLASLt offered no algorithm";
  cuda::GemmAlgoTable table;
  cuda::TunedAlgo tuned;
  if (!algos.empty()) tuned.algo = algos.back();
  table.set(c, tuned);
  return std::make_shared<const cuda::GemmAlgoTable>(std::move(table));
}

TEST(TrainGemmAlgosGpu, TunedProductsMatchFloat64AndRepeat) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(5);
  for (const GemmCall& c :
       {make_call(300, 77, 520, false, true, false, false), make_call(67, 130, 48, true, false, true, false),
        make_call(5, 259, 130, false, false, false, true), make_call(1000, 64, 96, true, true, false, false),
        make_call(2051, 192, 64, false, true, true, false)}) {
    SCOPED_TRACE(fmt::format("m {} n {} k {} ta {} tb {} accumulate {} bf16 out {}", c.m, c.n, c.k, c.ta, c.tb,
                             c.accumulate, c.bf16_out));
    const int64_t a_rows = c.ta ? c.k : c.m, b_rows = c.tb ? c.n : c.k;
    const std::vector<uint16_t> A = random_bf16(rng, size_t(a_rows * c.lda)), B = random_bf16(rng, size_t(b_rows * c.ldb));
    std::vector<float> C0(size_t(c.m * c.ldc));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& e : C0) e = u(rng);
    const float beta = c.accumulate ? 1.0f : 0.0f;
    const std::vector<double> ref = reference(c, A, B, beta, C0);

    cuda::TrainGemm tuned(Precision::BF16);
    tuned.set_algo_table(table_with_last_candidate(c));
    DeviceBuffer dA = DeviceBuffer::from(A), dB = DeviceBuffer::from(B);
    const size_t c_bytes = size_t(c.m * c.ldc) * (c.bf16_out ? 2 : 4);
    std::vector<std::vector<uint8_t>> results;
    for (int rep = 0; rep < 2; ++rep) {
      DeviceBuffer dC(c_bytes);
      if (c.accumulate) {
        dC.upload(C0.data(), c_bytes);
      } else {
        poison(dC.raw(), c_bytes);
      }
      if (c.bf16_out) {
        tuned.run_bf16_out(ctx, c.ta, c.tb, c.m, c.n, c.k, 1.0f, dA.as<uint16_t>(), c.lda, dB.as<uint16_t>(), c.ldb,
                           dC.as<uint16_t>(), c.ldc);
      } else {
        tuned.run_bf16(ctx, c.ta, c.tb, c.m, c.n, c.k, 1.0f, dA.as<uint16_t>(), c.lda, dB.as<uint16_t>(), c.ldb, beta,
                       dC.as<float>(), c.ldc);
      }
      results.push_back(down_vec<uint8_t>(dC, c_bytes));
    }
    EXPECT_EQ(tuned.tuned_calls(), 2) << "the table's algorithm was not used";
    EXPECT_EQ(results[0], results[1]) << "a repeated product differs";
    double num = 0, den = 0;
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t j = 0; j < c.n; ++j) {
        const size_t at = size_t(i * c.ldc + j);
        double got;
        if (c.bf16_out) {
          uint16_t bits;
          std::memcpy(&bits, results[0].data() + at * 2, 2);
          got = bf16_to_f32(bits);
        } else {
          float f;
          std::memcpy(&f, results[0].data() + at * 4, 4);
          got = f;
        }
        ASSERT_FALSE(std::isnan(got)) << "entry (" << i << ", " << j << ") not written";
        const double r = ref[size_t(i * c.n + j)];
        num += (got - r) * (got - r), den += r * r;
      }
    EXPECT_LE(std::sqrt(num / den), c.bf16_out ? 4e-3 : 1e-5);
  }
}

// Shapes the table lacks, and operands off the tuned alignment (16 bytes), run on cublasGemmEx's default.
TEST(TrainGemmAlgosGpu, OtherShapesAndUnalignedOperandsKeepTheDefault) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  std::mt19937 rng(9);
  const GemmCall c = make_call(64, 96, 128, false, true, false, false);
  cuda::TrainGemm tuned(Precision::BF16), plain(Precision::BF16);
  tuned.set_algo_table(table_with_last_candidate(c));
  plain.set_algo_table(nullptr);
  const std::vector<uint16_t> A = random_bf16(rng, size_t(c.m * c.lda + 64)), B = random_bf16(rng, size_t(c.n * c.ldb));
  DeviceBuffer dA = DeviceBuffer::from(A), dB = DeviceBuffer::from(B), d1(size_t(c.m * c.ldc) * 4),
               d2(size_t(c.m * c.ldc) * 4);
  // Another shape (k − 8): not in the table.
  tuned.run_bf16(ctx, false, true, c.m, c.n, c.k - 8, 1.0f, dA.as<uint16_t>(), c.lda, dB.as<uint16_t>(), c.ldb, 0.0f,
                 d1.as<float>(), c.ldc);
  plain.run_bf16(ctx, false, true, c.m, c.n, c.k - 8, 1.0f, dA.as<uint16_t>(), c.lda, dB.as<uint16_t>(), c.ldb, 0.0f,
                 d2.as<float>(), c.ldc);
  EXPECT_EQ(tuned.tuned_calls(), 0);
  EXPECT_EQ(down_vec<float>(d1, size_t(c.m * c.ldc)), down_vec<float>(d2, size_t(c.m * c.ldc)));
  // The table's shape with A 2 bytes past an aligned address.
  const uint16_t* shifted = dA.as<uint16_t>() + 1;
  tuned.run_bf16(ctx, false, true, c.m, c.n, c.k, 1.0f, shifted, c.lda, dB.as<uint16_t>(), c.ldb, 0.0f, d1.as<float>(),
                 c.ldc);
  plain.run_bf16(ctx, false, true, c.m, c.n, c.k, 1.0f, shifted, c.lda, dB.as<uint16_t>(), c.ldb, 0.0f, d2.as<float>(),
                 c.ldc);
  EXPECT_EQ(tuned.tuned_calls(), 0);
  EXPECT_EQ(down_vec<float>(d1, size_t(c.m * c.ldc)), down_vec<float>(d2, size_t(c.m * c.ldc)));
  // And aligned: the table's algorithm.
  tuned.run_bf16(ctx, false, true, c.m, c.n, c.k, 1.0f, dA.as<uint16_t>(), c.lda, dB.as<uint16_t>(), c.ldb, 0.0f,
                 d1.as<float>(), c.ldc);
  EXPECT_EQ(tuned.tuned_calls(), 1);
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / fmt::format("mamba3_{}_{}", ::getpid(), name)).string();
}

TEST(TrainGemmAlgosGpu, TableFileRoundTrips) {
  MAMBA3_REQUIRE_GPU();
  const GemmCall a = make_call(300, 77, 520, false, true, false, false), b = make_call(5, 259, 130, false, false, false, true);
  cuda::GemmAlgoTable table;
  cuda::TunedAlgo ta = *table_with_last_candidate(a)->find(a), tb = *table_with_last_candidate(b)->find(b);
  ta.default_us = 12.5, ta.tuned_us = 10.25;
  table.set(a, ta);
  table.set(b, tb);
  const std::string path = temp_path("algos.json");
  table.save(path);
  const cuda::GemmAlgoTable back = cuda::GemmAlgoTable::load(path);
  std::filesystem::remove(path);
  EXPECT_EQ(back.size(), 2u);
  EXPECT_EQ(back.source(), path);
  ASSERT_NE(back.find(a), nullptr);
  ASSERT_NE(back.find(b), nullptr);
  EXPECT_EQ(std::memcmp(&back.find(a)->algo, &ta.algo, sizeof ta.algo), 0);
  EXPECT_EQ(std::memcmp(&back.find(b)->algo, &tb.algo, sizeof tb.algo), 0);
  EXPECT_DOUBLE_EQ(back.find(a)->tuned_us, 10.25);
  GemmCall other = a;
  other.ldc += 1;
  EXPECT_EQ(back.find(other), nullptr);
}

TEST(TrainGemmAlgosGpu, BadTableFilesAreRefused) {
  MAMBA3_REQUIRE_GPU();
  const std::string path = temp_path("bad_algos.json");
  auto refused = [&](const std::string& text, const std::string& expected) {
    {
      std::ofstream f(path);
      f << text;
    }
    try {
      (void)cuda::GemmAlgoTable::load(path);
      ADD_FAILURE() << "loaded: " << text;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(path), std::string::npos) << what;
      EXPECT_NE(what.find(expected), std::string::npos) << what;
    }
  };
  // A valid file to start from, then broken copies of it.
  cuda::GemmAlgoTable table;
  const GemmCall c = make_call(300, 77, 520, false, true, false, false);
  table.set(c, *table_with_last_candidate(c)->find(c));
  table.save(path);
  std::string good;
  {
    std::ifstream f(path);
    good.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    const size_t at = s.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) s.replace(at, from.size(), to);
    return s;
  };
  refused("{ not json", "not a JSON");
  refused("{\"format\": \"something else\"}", "format");
  refused(replaced("\"device\": \"", "\"device\": \"Other GPU "), "tune again");
  refused(replaced("\"cublaslt_version\": ", "\"cublaslt_version\": 1"), "cuBLASLt");
  refused(replaced("\"algo\": \"", "\"algo\": \"zz"), "hex");
  refused(replaced("\"m\": 300", "\"m\": -3"), "positive");
  refused(replaced("\"ta\": false", "\"ta\": 7"), "products[0]");
  std::filesystem::remove(path);
  try {
    (void)cuda::GemmAlgoTable::load(path);
    ADD_FAILURE() << "a missing file loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mamba3::test
