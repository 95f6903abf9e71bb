// The one-launch AdamW over a flat parameter store (adamw_update_flat_gpu) against the per-tensor update after
// scaling the gradients (scale_gpu then adamw_update_gpu per tensor): the same bits for the weights and both
// moments, with weight decay on some tensors only, a clipping factor of 1 and below 1, awkward tensor sizes, and
// the gaps between tensors left at zero. With p16 it also writes the new weights' bf16 rounding (the parameter
// store's mirror): the host's rounding of the weights it wrote, bit for bit.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "cuda/train/adamw_gpu.h"
#include "gpu_test_util.h"

namespace mamba3::test {
namespace {

using cuda::DeviceBuffer;

TEST(AdamWFlatGpu, MatchesPerTensorUpdatesBitForBit) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  const std::vector<int64_t> sizes = {1, 63, 64, 65, 1000, 4097, 7};
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (int64_t n : sizes) {
    offsets.push_back(total);
    total += (n + cuda::kAdamWGranule - 1) / cuda::kAdamWGranule * cuda::kAdamWGranule;
  }
  std::mt19937 rng(31);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<float> p(size_t(total), 0.0f), g(p), m(p), v(p);
  std::vector<uint8_t> granules(size_t(total / cuda::kAdamWGranule), 0);
  for (size_t t = 0; t < sizes.size(); ++t) {
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const size_t k = size_t(offsets[t] + i);
      p[k] = uni(rng), g[k] = uni(rng), m[k] = 0.1f * uni(rng), v[k] = 0.01f * (uni(rng) + 1.0f);
    }
    if (t % 2 == 0)
      for (int64_t q = offsets[t] / cuda::kAdamWGranule; q * cuda::kAdamWGranule < offsets[t] + sizes[t]; ++q)
        granules[size_t(q)] = 1;
  }
  auto up = [](const std::vector<float>& x) {
    DeviceBuffer b(x.size() * 4);
    b.upload(x.data(), x.size() * 4);
    return b;
  };
  auto down = [](const DeviceBuffer& b) {
    std::vector<float> x(b.bytes() / 4);
    MAMBA3_CUDA_CHECK(cudaMemcpy(x.data(), b.raw(), b.bytes(), cudaMemcpyDeviceToHost));
    return x;
  };
  DeviceBuffer dgran(granules.size());
  dgran.upload(granules.data(), granules.size());
  for (const float factor : {1.0f, 0.37f}) {
    SCOPED_TRACE(fmt::format("grad factor {}", factor));
    cuda::AdamWStepParams a;
    a.lr = 3e-3, a.weight_decay = 0.1, a.t = 3;
    DeviceBuffer p1 = up(p), g1 = up(g), m1 = up(m), v1 = up(v);
    DeviceBuffer p2 = up(p), g2 = up(g), m2 = up(m), v2 = up(v);
    MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
    cuda::adamw_update_flat_gpu(ctx.stream(), p1.as<float>(), g1.as<float>(), m1.as<float>(), v1.as<float>(), total,
                                dgran.as<uint8_t>(), a, factor);
    if (factor != 1.0f) cuda::scale_gpu(ctx.stream(), g2.as<float>(), total, factor);
    for (size_t t = 0; t < sizes.size(); ++t) {
      cuda::AdamWStepParams at = a;
      at.weight_decay = t % 2 == 0 ? a.weight_decay : 0.0;
      const int64_t o = offsets[t];
      cuda::adamw_update_gpu(ctx.stream(), p2.as<float>() + o, g2.as<float>() + o, m2.as<float>() + o,
                             v2.as<float>() + o, sizes[t], at);
    }
    ctx.sync();
    const std::vector<float> pa = down(p1), pb = down(p2), ma = down(m1), mb = down(m2), va = down(v1), vb = down(v2);
    EXPECT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * 4), 0) << "weights";
    EXPECT_EQ(std::memcmp(ma.data(), mb.data(), ma.size() * 4), 0) << "first moment";
    EXPECT_EQ(std::memcmp(va.data(), vb.data(), va.size() * 4), 0) << "second moment";
    EXPECT_NE(std::memcmp(pa.data(), p.data(), pa.size() * 4), 0) << "the update changed nothing";
    for (size_t t = 0; t < sizes.size(); ++t)
      for (int64_t i = offsets[t] + sizes[t]; i < (t + 1 < sizes.size() ? offsets[t + 1] : total); ++i)
        ASSERT_TRUE(pa[size_t(i)] == 0.0f && ma[size_t(i)] == 0.0f && va[size_t(i)] == 0.0f) << "gap " << i;
  }
  // Weight decay must matter where the granules say so: the same update without any decay differs on tensor 0 only
  // among a decayed and an undecayed tensor.
  {
    cuda::AdamWStepParams a;
    a.lr = 3e-3, a.weight_decay = 0.1, a.t = 3;
    std::vector<uint8_t> none(granules.size(), 0);
    DeviceBuffer dnone(none.size());
    dnone.upload(none.data(), none.size());
    DeviceBuffer p1 = up(p), g1 = up(g), m1 = up(m), v1 = up(v), p2 = up(p), m2 = up(m), v2 = up(v);
    MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
    cuda::adamw_update_flat_gpu(ctx.stream(), p1.as<float>(), g1.as<float>(), m1.as<float>(), v1.as<float>(), total,
                                dgran.as<uint8_t>(), a);
    cuda::adamw_update_flat_gpu(ctx.stream(), p2.as<float>(), g1.as<float>(), m2.as<float>(), v2.as<float>(), total,
                                dnone.as<uint8_t>(), a);
    ctx.sync();
    const std::vector<float> pa = down(p1), pb = down(p2);
    EXPECT_NE(std::memcmp(pa.data() + offsets[0], pb.data() + offsets[0], size_t(sizes[0]) * 4), 0) << "decayed";
    EXPECT_EQ(std::memcmp(pa.data() + offsets[1], pb.data() + offsets[1], size_t(sizes[1]) * 4), 0) << "undecayed";
  }
}

// With p16 the update writes its new weights rounded to bf16 (nearest even) beside them: the host's rounding of the
// f32 weights it wrote, bit for bit over the whole flat buffer (the zero gaps included; p16 starts poisoned), and p,
// m, v are the bits of the same update without p16. A second update with lr 0 keeps weights whose low halves are
// exact ties (0x8000 below bf16 values of both parities), which must round to even.
TEST(AdamWFlatGpu, WritesTheWeightsBf16RoundingInTheSamePass) {
  MAMBA3_REQUIRE_GPU();
  cuda::Context ctx;
  const std::vector<int64_t> sizes = {1, 63, 64, 65, 1000, 4097, 7};
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (int64_t n : sizes) {
    offsets.push_back(total);
    total += (n + cuda::kAdamWGranule - 1) / cuda::kAdamWGranule * cuda::kAdamWGranule;
  }
  std::mt19937 rng(47);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<float> p(size_t(total), 0.0f), g(p), m(p), v(p);
  std::vector<uint8_t> granules(size_t(total / cuda::kAdamWGranule), 0);
  for (size_t t = 0; t < sizes.size(); ++t) {
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const size_t k = size_t(offsets[t] + i);
      p[k] = 4.0f * uni(rng), g[k] = uni(rng), m[k] = 0.1f * uni(rng), v[k] = 0.01f * (uni(rng) + 1.0f);
    }
    if (t % 2 == 0)
      for (int64_t q = offsets[t] / cuda::kAdamWGranule; q * cuda::kAdamWGranule < offsets[t] + sizes[t]; ++q)
        granules[size_t(q)] = 1;
  }
  auto up = [](const std::vector<float>& x) {
    DeviceBuffer b(x.size() * 4);
    b.upload(x.data(), x.size() * 4);
    return b;
  };
  auto down = [](const DeviceBuffer& b) {
    std::vector<float> x(b.bytes() / 4);
    MAMBA3_CUDA_CHECK(cudaMemcpy(x.data(), b.raw(), b.bytes(), cudaMemcpyDeviceToHost));
    return x;
  };
  auto down16 = [](const DeviceBuffer& b) {
    std::vector<uint16_t> x(b.bytes() / 2);
    MAMBA3_CUDA_CHECK(cudaMemcpy(x.data(), b.raw(), b.bytes(), cudaMemcpyDeviceToHost));
    return x;
  };
  auto round_host = [](const std::vector<float>& x) {
    std::vector<uint16_t> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = f32_to_bf16(x[i]);
    return r;
  };
  DeviceBuffer dgran(granules.size());
  dgran.upload(granules.data(), granules.size());
  for (const float factor : {1.0f, 0.37f}) {
    SCOPED_TRACE(fmt::format("grad factor {}", factor));
    cuda::AdamWStepParams a;
    a.lr = 3e-3, a.weight_decay = 0.1, a.t = 2;
    DeviceBuffer p1 = up(p), g1 = up(g), m1 = up(m), v1 = up(v), p2 = up(p), m2 = up(m), v2 = up(v);
    DeviceBuffer p16(size_t(total) * 2);
    poison(p16.raw(), p16.bytes());
    MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
    cuda::adamw_update_flat_gpu(ctx.stream(), p1.as<float>(), g1.as<float>(), m1.as<float>(), v1.as<float>(), total,
                                dgran.as<uint8_t>(), a, factor, p16.as<uint16_t>());
    cuda::adamw_update_flat_gpu(ctx.stream(), p2.as<float>(), g1.as<float>(), m2.as<float>(), v2.as<float>(), total,
                                dgran.as<uint8_t>(), a, factor);
    ctx.sync();
    const std::vector<float> pa = down(p1), pb = down(p2), ma = down(m1), mb = down(m2), va = down(v1), vb = down(v2);
    EXPECT_EQ(std::memcmp(pa.data(), pb.data(), pa.size() * 4), 0) << "weights";
    EXPECT_EQ(std::memcmp(ma.data(), mb.data(), ma.size() * 4), 0) << "first moment";
    EXPECT_EQ(std::memcmp(va.data(), vb.data(), va.size() * 4), 0) << "second moment";
    EXPECT_NE(std::memcmp(pa.data(), p.data(), pa.size() * 4), 0) << "the update changed nothing";
    const std::vector<uint16_t> got = down16(p16), want = round_host(pa);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], want[i]) << "element " << i << " (weight " << pa[i] << ")";
  }
  {
    SCOPED_TRACE("exact ties, lr 0");
    std::vector<float> ties(p);
    for (size_t t = 0; t < sizes.size(); ++t)
      for (int64_t i = 0; i < sizes[t]; ++i) {
        const size_t k = size_t(offsets[t] + i);
        const uint32_t bits = (uint32_t(f32_to_bf16(p[k])) << 16) | 0x8000u;
        std::memcpy(&ties[k], &bits, 4);
      }
    cuda::AdamWStepParams a;
    a.lr = 0.0, a.weight_decay = 0.1, a.t = 1;
    DeviceBuffer p1 = up(ties), g1 = up(g), m1 = up(m), v1 = up(v), p16(size_t(total) * 2);
    poison(p16.raw(), p16.bytes());
    MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
    cuda::adamw_update_flat_gpu(ctx.stream(), p1.as<float>(), g1.as<float>(), m1.as<float>(), v1.as<float>(), total,
                                dgran.as<uint8_t>(), a, 1.0f, p16.as<uint16_t>());
    ctx.sync();
    const std::vector<float> pa = down(p1);
    ASSERT_EQ(std::memcmp(pa.data(), ties.data(), pa.size() * 4), 0) << "lr 0 changed the weights";
    const std::vector<uint16_t> got = down16(p16), want = round_host(ties);
    int odd_below = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i], want[i]) << "element " << i << " (weight " << ties[i] << ")";
      uint32_t bits;
      std::memcpy(&bits, &ties[i], 4);
      if ((bits & 0xffffu) == 0x8000u) {
        ASSERT_EQ(got[i] & 1u, 0u) << "element " << i << ": a tie not rounded to even";
        odd_below += (bits >> 16) & 1u;
      }
    }
    EXPECT_GT(odd_below, 0) << "no tie above an odd bf16 value (rounded up)";
  }
}

}  // namespace
}  // namespace mamba3::test
