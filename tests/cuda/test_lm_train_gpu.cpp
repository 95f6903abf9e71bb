// GPU training of the whole language model against the CPU (train/lm_gradients.h, train/trainer.h): loss and every
// parameter gradient on the tiny models of every layer kind, labels with gaps, determinism, and whole training runs
// (the CUDA engine follows the CPU engine's losses; --resume on the GPU reproduces an uninterrupted run exactly).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "../train/lm_test_models.h"
#include "core/dtype.h"
#include "cuda/train/adamw_gpu.h"
#include "cuda/train/lm_train_gpu.h"
#include "cuda/train/train_engine_gpu.h"
#include "gpu_test_util.h"
#include "support/test_support.h"
#include "train/lm_gradients.h"
#include "train/trainer.h"

namespace mamba3 {
namespace {

using test::lm_cases;
using test::lm_test_tokens;
using test::lm_test_weights;

void split(const std::vector<int64_t>& tokens, int64_t B, int64_t L, std::vector<int64_t>& in,
           std::vector<int64_t>& tg) {
  split_windows(tokens.data(), B, L, in, tg);
}

// GPU loss and gradients vs CPU; tolerances per precision (f32: reduction order only; bf16: rounded GEMM inputs).
void check_case(const ModelConfig& c, const TensorMap& params, const std::vector<int64_t>& in,
                const std::vector<int64_t>& tg, int64_t B, int64_t L, cuda::Precision prec, const std::string& what) {
  TensorMap cpu_grads;
  const double cpu_loss = lm_loss_and_grad_labels(c, params, in.data(), tg.data(), B, L, &cpu_grads);
  cuda::GpuLmTrainer gpu(c, params, prec);
  const double scale = 0.5;  // the sum is scaled: checks that `scale` reaches every gradient
  const double gpu_loss = gpu.run(in.data(), tg.data(), B, L, true, scale);
  const bool f32 = prec == cuda::Precision::F32;
  EXPECT_NEAR(gpu_loss, cpu_loss, (f32 ? 1e-5 : 1e-2) * std::abs(cpu_loss)) << what;
  TensorMap gpu_grads;
  gpu.store().download(gpu.store().grads(), gpu_grads);
  ASSERT_EQ(gpu_grads.size(), cpu_grads.size()) << what;
  for (const auto& [name, ref] : cpu_grads) {
    // At L = 1 with the mixer's output norm the norm erases the scalar (γ·q·k + D) that multiplies x, so the
    // gradients of what feeds only that scalar are rounding noise on both sides (test_mamba3_train_gpu has the
    // same exclusion).
    const bool scalar_param = name.ends_with(".D") || name.ends_with("dt_bias") || name.ends_with("B_bias") ||
                              name.ends_with("C_bias") || name.find("B_norm") != std::string::npos ||
                              name.find("C_norm") != std::string::npos;
    if (L == 1 && c.ssm.is_outproj_norm && scalar_param) continue;
    Tensor want = ref.clone();
    for (int64_t i = 0; i < want.numel(); ++i) want.data<float>()[i] *= float(scale);
    double ref_norm = 0;
    for (int64_t i = 0; i < want.numel(); ++i) ref_norm += double(want.data<float>()[i]) * want.data<float>()[i];
    if (ref_norm == 0) {  // e.g. the stored tied lm_head copy: no gradient of its own
      const Tensor& got = gpu_grads.at(name);
      for (int64_t i = 0; i < got.numel(); ++i) ASSERT_EQ(got.data<float>()[i], 0.0f) << what << " " << name;
      continue;
    }
    // bf16: the per-head scalars and the B/C norm weights are sums over every token of terms of both signs, so the
    // bf16 rounding of the products does not average out as it does for the matrices (H200: up to 4.5e-2). f32:
    // the same sums cancel too; from a single token (B 1, L 1) the C_norm gradient came within 2.3e-5 (batched chunk
    // path, H200), so those get the golden README's f32 gradient tolerance (5e-5), everything else 2e-5.
    const double err = test::rel_l2(gpu_grads.at(name), want);
    EXPECT_LE(err, f32 ? (scalar_param ? 5e-5 : 2e-5) : (scalar_param ? 1e-1 : 4e-2)) << what << ": gradient of "
                                                                                       << name;
  }
}

TEST(LmTrainGpu, LossAndGradientsMatchCpuOnEveryLayerKind) {
  MAMBA3_REQUIRE_GPU();
  for (const auto& lc : lm_cases()) {
    const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
    const TensorMap params = lm_test_weights(c, 3);
    for (auto [B, L] : {std::pair<int64_t, int64_t>{3, 70}, {1, 1}, {2, 17}}) {
      const auto tokens = lm_test_tokens(c, B, L, uint32_t(B * 100 + L));
      std::vector<int64_t> in, tg;
      split(tokens, B, L, in, tg);
      for (cuda::Precision p : {cuda::Precision::F32, cuda::Precision::BF16})
        if (p == cuda::Precision::F32 || L > 1)  // bf16 at L = 1: three tokens, see test_mamba3_train_gpu
        check_case(c, params, in, tg, B, L, p,
                   lc.name + " B " + std::to_string(B) + " L " + std::to_string(L) + " " + cuda::precision_name(p));
    }
  }
}

TEST(LmTrainGpu, UnlabelledPositionsGetNoLoss) {
  MAMBA3_REQUIRE_GPU();
  const auto lc = lm_cases()[1];
  const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
  const TensorMap params = lm_test_weights(c, 5);
  const int64_t B = 2, L = 40;
  std::vector<int64_t> in, tg;
  split(lm_test_tokens(c, B, L, 9), B, L, in, tg);
  for (size_t i = 0; i < tg.size(); i += 3) tg[i] = -1;
  check_case(c, params, in, tg, B, L, cuda::Precision::F32, "labels with gaps");
}

TEST(LmTrainGpu, GradientsAreDeterministic) {
  MAMBA3_REQUIRE_GPU();
  for (const auto& lc : lm_cases()) {
    const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
    const TensorMap params = lm_test_weights(c, 4);
    const int64_t B = 3, L = 65;
    std::vector<int64_t> in, tg;
    split(lm_test_tokens(c, B, L, 1), B, L, in, tg);
    TensorMap g[2];
    for (int k = 0; k < 2; ++k) {
      cuda::GpuLmTrainer gpu(c, params, cuda::Precision::BF16);
      gpu.run(in.data(), tg.data(), B, L, true, 1.0);
      gpu.store().download(gpu.store().grads(), g[k]);
    }
    for (const auto& [name, t] : g[0])
      EXPECT_EQ(0, std::memcmp(t.raw(), g[1].at(name).raw(), t.nbytes())) << lc.name << ": " << name;
  }
}

TEST(LmTrainGpu, RejectsBadParametersAndTokens) {
  MAMBA3_REQUIRE_GPU();
  const auto lc = lm_cases()[0];
  const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
  TensorMap params = lm_test_weights(c, 1);
  params["stray.weight"] = Tensor::zeros(DType::F32, {2});
  EXPECT_THROW(cuda::GpuLmTrainer(c, params, cuda::Precision::F32), Error);
  params.erase("stray.weight");
  cuda::GpuLmTrainer gpu(c, params, cuda::Precision::F32);
  std::vector<int64_t> in = {1, 2, c.vocab_size}, tg = {1, 2, 3};
  EXPECT_THROW(gpu.run(in.data(), tg.data(), 1, 3, true, 1.0), Error);
}

// One training step as the CUDA engine takes it: loss and gradients, the flat AdamW (writing the store's bf16 mirror
// when there is one), the gradients zeroed. Returns the loss; grads gets the gradients before the update.
double train_step(cuda::GpuLmTrainer& gpu, const cuda::DeviceBuffer& granules, const std::vector<int64_t>& in,
                  const std::vector<int64_t>& tg, int64_t B, int64_t L, int64_t t, TensorMap& grads) {
  const double loss = gpu.run(in.data(), tg.data(), B, L, true, 1.0);
  cuda::GpuParamStore& s = gpu.store();
  s.download(s.grads(), grads);
  cuda::AdamWStepParams a;
  a.lr = 1e-2, a.weight_decay = 0.1, a.t = t;
  const cudaStream_t st = gpu.context().stream();
  cuda::adamw_update_flat_gpu(st, s.params(), s.grads(), s.exp_avg(), s.exp_avg_sq(), s.total(),
                              granules.as<uint8_t>(), a, 1.0f, s.params16());
  MAMBA3_CUDA_CHECK(cudaMemsetAsync(s.grads(), 0, size_t(s.total()) * 4, st));
  return loss;
}

// Weight decay on every granule of the store (the update's decay flags, one byte per kAdamWGranule floats).
cuda::DeviceBuffer all_decayed(const cuda::GpuParamStore& s) {
  const std::vector<uint8_t> g(size_t((s.total() + cuda::kAdamWGranule - 1) / cuda::kAdamWGranule), 1);
  cuda::DeviceBuffer b(g.size());
  b.upload(g.data(), g.size());
  return b;
}

bool identical(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Every tensor of a the same bits as b's of its name (a failure per tensor that differs).
bool same_bits(const TensorMap& a, const TensorMap& b, const std::string& what) {
  bool ok = a.size() == b.size();
  EXPECT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    const bool same = it != b.end() && identical(t, it->second);
    EXPECT_TRUE(same) << what << ": " << name;
    ok = ok && same;
  }
  return ok;
}

// The bf16 mode's weight mirror (the store's bf16 copy of the weights, written by the flat AdamW, read by every
// weight product) against the products rounding the f32 weights themselves (set_weight_mirror(false)): three
// training steps on every layer kind give the same bits — each step's loss and gradients, and the weights after the
// last update; with the mirror on, the mirror after each update is the host's rounding of the weights.
TEST(LmTrainGpu, WeightMirrorGivesTheSameBits) {
  MAMBA3_REQUIRE_GPU();
  for (const auto& lc : lm_cases()) {
    SCOPED_TRACE(lc.name);
    const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
    const TensorMap params = lm_test_weights(c, 6);
    const int64_t B = 2, L = 37, steps = 3;
    std::vector<std::vector<int64_t>> in(steps), tg(steps);
    for (int64_t k = 0; k < steps; ++k)
      split(lm_test_tokens(c, B, L, uint32_t(40 + k)), B, L, in[size_t(k)], tg[size_t(k)]);
    struct Run {
      std::vector<double> loss;
      std::vector<TensorMap> grads;
      TensorMap params;
    };
    auto train3 = [&](bool mirror) {
      cuda::GpuLmTrainer gpu(c, params, cuda::Precision::BF16);
      gpu.set_weight_mirror(mirror);
      cuda::GpuParamStore& s = gpu.store();
      const cuda::DeviceBuffer granules = all_decayed(s);
      Run r;
      for (int64_t k = 0; k < steps; ++k) {
        r.grads.emplace_back();
        r.loss.push_back(train_step(gpu, granules, in[size_t(k)], tg[size_t(k)], B, L, k + 1, r.grads.back()));
        EXPECT_EQ(s.has_mirror(), mirror) << "step " << k + 1;
        if (!mirror) continue;
        EXPECT_TRUE(s.mirror_valid()) << "step " << k + 1;
        std::vector<float> p(size_t(s.total()));
        std::vector<uint16_t> p16(p.size());
        MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
        MAMBA3_CUDA_CHECK(cudaMemcpy(p.data(), s.params(), p.size() * 4, cudaMemcpyDeviceToHost));
        MAMBA3_CUDA_CHECK(cudaMemcpy(p16.data(), s.params16(), p16.size() * 2, cudaMemcpyDeviceToHost));
        size_t bad = 0;
        for (size_t i = 0; i < p.size(); ++i) bad += p16[i] != f32_to_bf16(p[i]);
        EXPECT_EQ(bad, 0u) << "mirror elements not the rounding of the weights after step " << k + 1;
      }
      s.download(s.params(), r.params);
      return r;
    };
    const Run on = train3(true), off = train3(false);
    for (int64_t k = 0; k < steps; ++k) {
      EXPECT_EQ(on.loss[size_t(k)], off.loss[size_t(k)]) << "loss of step " << k + 1;
      same_bits(on.grads[size_t(k)], off.grads[size_t(k)], "gradients of step " + std::to_string(k + 1));
    }
    same_bits(on.params, off.params, "weights after the last update");
    bool changed = false;
    for (const auto& [name, t] : on.params) changed = changed || !identical(t, params.at(name).to(DType::F32));
    EXPECT_TRUE(changed) << "the updates changed nothing";
  }
}

// The bf16 mode's block outputs and input gradients in bf16 (set_block_io16, on by default: check_case above already
// holds it to the CPU) against f32 ones: the loss and every gradient within the bf16 mode's bounds of each other,
// the switch changing some bits on every model (each has a Mamba-3 layer), and the f32 mode ignoring it (same bits).
TEST(LmTrainGpu, BfloatBlockOutputsTrackTheF32Ones) {
  MAMBA3_REQUIRE_GPU();
  for (const auto& lc : lm_cases()) {
    SCOPED_TRACE(lc.name);
    const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
    const TensorMap params = lm_test_weights(c, 8);
    const int64_t B = 2, L = 45;
    std::vector<int64_t> in, tg;
    split(lm_test_tokens(c, B, L, 77), B, L, in, tg);
    const auto run = [&](cuda::Precision p, bool io16, TensorMap& grads) {
      cuda::GpuLmTrainer gpu(c, params, p);
      gpu.set_block_io16(io16);
      const double loss = gpu.run(in.data(), tg.data(), B, L, true, 1.0);
      gpu.store().download(gpu.store().grads(), grads);
      return loss;
    };
    TensorMap on, off;
    const double loss_on = run(cuda::Precision::BF16, true, on), loss_off = run(cuda::Precision::BF16, false, off);
    EXPECT_NEAR(loss_on, loss_off, 1e-2 * std::abs(loss_off));
    bool differs = loss_on != loss_off;
    ASSERT_EQ(on.size(), off.size());
    for (const auto& [name, ref] : off) {
      const Tensor& got = on.at(name);
      for (int64_t i = 0; i < got.numel(); ++i) ASSERT_TRUE(std::isfinite(got.data<float>()[i])) << name;
      differs = differs || !identical(got, ref);
      double ref_norm = 0;
      for (int64_t i = 0; i < ref.numel(); ++i) ref_norm += double(ref.data<float>()[i]) * ref.data<float>()[i];
      if (ref_norm == 0) continue;  // the stored tied lm_head copy
      // The per-head scalars and the B/C norm weights: sums over every token of terms of both signs (check_case).
      const bool scalar_param = name.ends_with(".D") || name.ends_with("dt_bias") || name.ends_with("B_bias") ||
                                name.ends_with("C_bias") || name.find("B_norm") != std::string::npos ||
                                name.find("C_norm") != std::string::npos;
      EXPECT_LE(test::rel_l2(got, ref), scalar_param ? 1e-1 : 4e-2) << "gradient of " << name;
    }
    EXPECT_TRUE(differs) << "the switch changed nothing";
    TensorMap f_on, f_off;
    EXPECT_EQ(run(cuda::Precision::F32, true, f_on), run(cuda::Precision::F32, false, f_off));
    same_bits(f_on, f_off, "f32 mode with and without the switch");
  }
}

// New weights uploaded into the store (GpuParamStore::upload) make the mirror stale; the next step rounds them again
// and reads them: its loss and gradients are the bits of a fresh trainer made from those weights (bf16, mirror on).
TEST(LmTrainGpu, WeightMirrorFollowsAnUpload) {
  MAMBA3_REQUIRE_GPU();
  for (const auto& lc : lm_cases()) {
    SCOPED_TRACE(lc.name);
    const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
    const TensorMap first = lm_test_weights(c, 7), second = lm_test_weights(c, 8);
    const int64_t B = 2, L = 29;
    std::vector<int64_t> in, tg;
    split(lm_test_tokens(c, B, L, 12), B, L, in, tg);
    cuda::GpuLmTrainer used(c, first, cuda::Precision::BF16);
    used.set_weight_mirror(true);
    cuda::GpuParamStore& s = used.store();
    const double loss_first = used.run(in.data(), tg.data(), B, L, true, 1.0);
    ASSERT_TRUE(s.mirror_valid());
    s.upload(s.params(), second, "", "second weights");
    EXPECT_FALSE(s.mirror_valid()) << "an upload into the weights left the mirror valid";
    MAMBA3_CUDA_CHECK(cudaMemsetAsync(s.grads(), 0, size_t(s.total()) * 4, used.context().stream()));
    const double loss_used = used.run(in.data(), tg.data(), B, L, true, 1.0);
    EXPECT_TRUE(s.mirror_valid());
    TensorMap grads_used, grads_fresh;
    s.download(s.grads(), grads_used);
    cuda::GpuLmTrainer fresh(c, second, cuda::Precision::BF16);
    fresh.set_weight_mirror(true);
    const double loss_fresh = fresh.run(in.data(), tg.data(), B, L, true, 1.0);
    fresh.store().download(fresh.store().grads(), grads_fresh);
    EXPECT_NE(loss_first, loss_fresh) << "the two weight sets give the same loss: the test cannot tell them apart";
    EXPECT_EQ(loss_used, loss_fresh);
    same_bits(grads_used, grads_fresh, "gradients after the upload");
  }
}

// A short run of the trainer with the CUDA engine follows the CPU engine's losses; killing and resuming on the GPU
// reproduces the uninterrupted GPU run exactly.
TEST(LmTrainGpu, TrainerRunsFollowTheCpuAndResumeExactly) {
  MAMBA3_REQUIRE_GPU();
  const auto lc = lm_cases()[0];
  const ModelConfig c = ModelConfig::from_json(lc.config, lc.name);
  TokenData data;
  std::mt19937 rng(7);
  for (int i = 0; i < 4000; ++i) data.train.push_back(uint32_t(rng() % 40));
  for (int i = 0; i < 600; ++i) data.val.push_back(uint32_t(rng() % 40));
  data.vocab_size = 40;
  data.source = "random tokens";
  TrainOptions o;
  o.steps = 12, o.batch = 3, o.seq_len = 33, o.accum = 2, o.lr = 3e-3, o.warmup = 2, o.eval_every = 6;
  o.eval_windows = 4, o.save_every = 4, o.clip = 0.5;
  const auto root = std::filesystem::temp_directory_path() / ("mamba3_gpu_train_" + std::to_string(::getpid()));
  std::filesystem::remove_all(root);
  auto job = [&](const std::string& dir, bool gpu) {
    TrainJob j;
    j.config = c;
    j.params = lm_test_weights(c, 2);
    j.data = &data;
    j.options = o;
    j.out_dir = (root / dir).string();
    j.loss = lm_loss_and_grad;
    if (gpu) j.engine = cuda::cuda_train_engine_factory(cuda::Precision::F32);
    return j;
  };
  const TrainResult cpu = train(job("cpu", false));
  const TrainResult gpu = train(job("gpu", true));
  ASSERT_EQ(cpu.records.size(), gpu.records.size());
  for (size_t i = 0; i < cpu.records.size(); ++i) {
    EXPECT_NEAR(gpu.records[i].loss, cpu.records[i].loss, 1e-4 * std::abs(cpu.records[i].loss)) << "step " << i + 1;
    EXPECT_NEAR(gpu.records[i].grad_norm, cpu.records[i].grad_norm, 1e-3 * cpu.records[i].grad_norm);
    if (cpu.records[i].val_loss) {
      ASSERT_TRUE(gpu.records[i].val_loss.has_value());
      EXPECT_NEAR(*gpu.records[i].val_loss, *cpu.records[i].val_loss, 1e-4 * *cpu.records[i].val_loss);
    }
  }
  EXPECT_LT(gpu.records.back().loss, gpu.records.front().loss);
  // Kill after step 6 (checkpoint at 4), resume: the same losses as the uninterrupted GPU run, bit for bit.
  TrainJob killed = job("resume", true);
  killed.stop_after = 6;
  train(std::move(killed));
  TrainJob resumed = job("resume", true);
  resumed.resume = true;
  const TrainResult rest = train(std::move(resumed));
  ASSERT_EQ(rest.first_step, 4);
  for (const StepRecord& r : rest.records) EXPECT_EQ(r.loss, gpu.records[size_t(r.step - 1)].loss) << "step " << r.step;
  for (const auto& [name, t] : gpu.params)
    EXPECT_EQ(0, std::memcmp(t.raw(), rest.params.at(name).raw(), t.nbytes())) << name;
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace mamba3
