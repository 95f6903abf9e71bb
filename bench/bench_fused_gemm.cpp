// The fused training products (src/cuda/train/fused_gemm.cu) against cuBLAS and the element-wise kernels they
// replace, at the GatedMLP's shapes (default: 125M, 16384 rows, D 768, d_ff 1536). Prints µs per call (CUDA events,
// the median of 5 runs of 20 calls) and TFLOP/s of the product, then the step's other bf16-result A·Bᵀ products
// against the plain kernel. Usage: bench_fused_gemm [rows] [D] [d_ff]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/train/fused_gemm.h"
#include "cuda/train/gated_mlp_train_gpu.h"
#include "cuda/train/train_gemm.h"

using namespace mamba3;

namespace {

double time_us(cudaStream_t s, const std::function<void()>& call) {
  cudaEvent_t a, b;
  MAMBA3_CUDA_CHECK(cudaEventCreate(&a));
  MAMBA3_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) call();  // warm-up
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    MAMBA3_CUDA_CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < 20; ++i) call();
    MAMBA3_CUDA_CHECK(cudaEventRecord(b, s));
    MAMBA3_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    MAMBA3_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    runs.push_back(1e3 * ms / 20);
  }
  std::sort(runs.begin(), runs.end());
  MAMBA3_CUDA_CHECK(cudaEventDestroy(a));
  MAMBA3_CUDA_CHECK(cudaEventDestroy(b));
  return runs[2];
}

cuda::DeviceBuffer random_bf16(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint16_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = f32_to_bf16(u(rng));
  cuda::DeviceBuffer b(v.size() * 2);
  b.upload(v.data(), v.size() * 2);
  return b;
}

constexpr cuda::FusedGemmSchedule kSchedules[] = {
    cuda::FusedGemmSchedule::kCooperative, cuda::FusedGemmSchedule::kPingPong, cuda::FusedGemmSchedule::kMulticast};
std::string label(const char* what, cuda::FusedGemmSchedule s) {
  return std::string(what) + (s == cuda::FusedGemmSchedule::kPingPong    ? " (ping-pong)"
                              : s == cuda::FusedGemmSchedule::kMulticast ? " (multicast)"
                                                                         : " (cooperative)");
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t M = argc > 1 ? std::atoll(argv[1]) : 16384, D = argc > 2 ? std::atoll(argv[2]) : 768,
                F = argc > 3 ? std::atoll(argv[3]) : 1536;
  if (!cuda::fused_gemm_device_supported()) {
    std::printf("bench_fused_gemm: needs an sm_90 device\n");
    return 0;
  }
  // (the cuBLAS rows are TrainGemm's products: kept on cuBLAS whatever the caller's environment says)
  unsetenv("MAMBA3_TRAIN_FUSED_GEMM_PLAIN");
  cuda::Context ctx;
  cuda::TrainGemm gemm(cuda::Precision::BF16);
  const cudaStream_t s = ctx.stream();
  std::mt19937 rng(1);
  cuda::DeviceBuffer x = random_bf16(M * D, rng), w1 = random_bf16(2 * F * D, rng), w2 = random_bf16(D * F, rng),
                     w2t = random_bf16(F * D, rng), dy = random_bf16(M * D, rng), h = random_bf16(M * 2 * F, rng),
                     o(size_t(M * F) * 2), dh(size_t(M * 2 * F) * 2), do16(size_t(M * F) * 2);
  const auto* X = x.as<uint16_t>();
  const auto* W1 = w1.as<uint16_t>();
  const auto* W2 = w2.as<uint16_t>();
  const auto* W2T = w2t.as<uint16_t>();
  const auto* DY = dy.as<uint16_t>();
  auto* H = h.as<uint16_t>();
  auto* O = o.as<uint16_t>();
  auto* DH = dh.as<uint16_t>();
  auto* DO = do16.as<uint16_t>();
  const double f1 = 2.0 * M * D * 2 * F, f2 = 2.0 * M * D * F;
  std::printf("rows %lld, D %lld, d_ff %lld (%s)\n", (long long)M, (long long)D, (long long)F,
              cuda::device_info().name.c_str());
  std::printf("multicast: %d clusters of two blocks (%d SMs)\n", cuda::fused_gemm_multicast_clusters(),
              cuda::device_info().sm_count);
  std::printf("%-44s %9s %9s\n", "", "µs", "TFLOP/s");
  auto row = [&](const char* label, double us, double flops) {
    std::printf("%-44s %9.1f %9.1f\n", label, us, flops / us * 1e-6);
  };
  // Forward: fc1's product (+ the activation).
  const double c1 = time_us(s, [&] {
    gemm.run_mixed_bf16_out(ctx, false, true, M, 2 * F, D, 1.0f, nullptr, X, D, nullptr, W1, D, H, 2 * F);
  });
  const double a1 = time_us(s, [&] { cuda::gated_silu_forward_gpu(s, nullptr, M, F, nullptr, O, H); });
  row("fc1: cuBLAS", c1, f1);
  row("fc1: activation kernel", a1, 0);
  row("fc1: cuBLAS + activation", c1 + a1, f1);
  for (const auto sch : kSchedules) {
    // (the mainloop alone first: the cooperative one is then the first fused launch, for ncu --launch-skip)
    const double m1 = time_us(s, [&] { cuda::fused_gemm_mainloop_only(s, X, D, W1, D, M, 2 * F, D, sch); });
    const double p1 = time_us(s, [&] { cuda::fused_gemm_plain(s, X, D, W1, D, M, 2 * F, D, H, 2 * F, sch); });
    const double g1 = time_us(s, [&] { cuda::fused_gemm_gated_forward(s, X, D, W1, M, D, F, H, O, sch); });
    row(label("fc1: fused mainloop alone (nothing stored)", sch).c_str(), m1, f1);
    row(label("fc1: fused product, plain epilogue", sch).c_str(), p1, f1);
    row(label("fc1: fused product with the activation", sch).c_str(), g1, f1);
  }
  // Backward: the do product (+ the activation's backward).
  const double c2 = time_us(
      s, [&] { gemm.run_mixed_bf16_out(ctx, false, false, M, F, D, 1.0f, nullptr, DY, D, nullptr, W2, F, DO, F); });
  const double a2 = time_us(s, [&] { cuda::gated_silu_backward_bf16_gpu(s, DO, H, M, F, DH); });
  const double t2 = time_us(s, [&] { cuda::transpose_bf16_gpu(s, W2, D, F, const_cast<uint16_t*>(W2T)); });
  row("do: cuBLAS", c2, f2);
  row("do: activation backward kernel", a2, 0);
  row("do: cuBLAS + activation backward", c2 + a2, f2);
  row("do: fc2 transposed (per call)", t2, 0);
  for (const auto sch : kSchedules) {
    const double p2 = time_us(s, [&] { cuda::fused_gemm_plain(s, DY, D, W2T, D, M, F, D, DO, F, sch); });
    const double g2 = time_us(s, [&] { cuda::fused_gemm_gated_backward(s, DY, D, W2T, M, D, F, H, DH, sch); });
    row(label("do: fused product, plain epilogue", sch).c_str(), p2, f2);
    row(label("do: fused product with the activation bwd", sch).c_str(), g2, f2);
    row(label("do: fused, with the transpose", sch).c_str(), g2 + t2, f2);
  }
  // The step's other A·Bᵀ products with a bf16 result, which MAMBA3_TRAIN_FUSED_GEMM_PLAIN=1 moves onto the plain
  // kernel (the 125M shapes at D 768: in_proj's 3432 columns, out_proj and fc2 over K 1536, the lm_head's 50280
  // logits), the default schedule.
  struct Product {
    const char* name;
    int64_t n, k;
  };
  for (const Product& pr :
       {Product{"in_proj", 3432, D}, Product{"out_proj / fc2", D, 2 * D}, Product{"lm_head logits", 50280, D}}) {
    cuda::DeviceBuffer a = random_bf16(M * pr.k, rng), b = random_bf16(pr.n * pr.k, rng), c(size_t(M * pr.n) * 2);
    const auto* A = a.as<uint16_t>();
    const auto* B = b.as<uint16_t>();
    auto* C = c.as<uint16_t>();
    const double fl = 2.0 * M * pr.n * pr.k;
    const double cb =
        time_us(s, [&] { gemm.run_bf16_out(ctx, false, true, M, pr.n, pr.k, 1.0f, A, pr.k, B, pr.k, C, pr.n); });
    const double fu = time_us(s, [&] { cuda::fused_gemm_plain(s, A, pr.k, B, pr.k, M, pr.n, pr.k, C, pr.n); });
    row((std::string(pr.name) + ": cuBLAS").c_str(), cb, fl);
    row((std::string(pr.name) + ": fused plain").c_str(), fu, fl);
  }
  return 0;
}
