// Mamba-3 mixer on CPU: prefill tokens/s and decode-step time for a 130M-class layer (d_model 768, d_state 128,
// headdim 64, expand 2), SISO and MIMO R=4, each against its floor:
//   prefill floor = in_proj + out_proj GEMM FLOPs / measured sgemm rate (the scan adds work on top),
//   decode floor  = (weight bytes + 2·state bytes·batch) / measured read bandwidth.
#include <cstdio>
#include <random>

#include "ops/machine.h"
#include "core/parallel.h"
#include "model/mamba3_mixer.h"

using namespace mamba3;

namespace {

Tensor random_tensor(std::mt19937& rng, Shape shape, float scale) {
  std::uniform_real_distribution<float> d(-scale, scale);
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = d(rng);
  return t;
}

TensorMap random_weights(const Mamba3Config& c, std::mt19937& rng) {
  const int64_t H = c.nheads(), R = c.rank(), N = c.d_state, P = c.headdim;
  TensorMap w;
  w["dt_bias"] = random_tensor(rng, {H}, 1.0f);
  w["B_bias"] = random_tensor(rng, {H, R, N}, 1.0f);
  w["C_bias"] = random_tensor(rng, {H, R, N}, 1.0f);
  if (c.is_mimo) {
    w["mimo_x"] = random_tensor(rng, {H, R, P}, 0.5f);
    w["mimo_z"] = random_tensor(rng, {H, R, P}, 1.0f);
    w["mimo_o"] = random_tensor(rng, {H, R, P}, 0.5f);
  }
  w["D"] = random_tensor(rng, {H}, 1.0f);
  w["in_proj.weight"] = random_tensor(rng, {c.d_in_proj(), c.d_model}, 0.03f);
  w["B_norm.weight"] = random_tensor(rng, {N}, 1.0f);
  w["C_norm.weight"] = random_tensor(rng, {N}, 1.0f);
  w["out_proj.weight"] = random_tensor(rng, {c.d_model, c.d_inner()}, 0.02f);
  return w;
}

}  // namespace

int main() {
  std::printf("mamba3 bench_mixer: %d threads\n", max_threads());
  const double bw = mamba3::measure_read_bandwidth();
  std::printf("measured read bandwidth: %.1f GB/s\n", bw / 1e9);
  std::mt19937 rng(0);

  std::printf("\n%-12s %-22s %12s %12s %12s %8s\n", "layer", "shape", "time", "rate", "floor", "of floor");
  for (int64_t rank : {int64_t(0), int64_t(4)}) {
    Mamba3Config c;
    c.d_model = 768, c.d_state = 128, c.headdim = 64, c.expand = 2;
    c.is_mimo = rank > 0, c.mimo_rank = rank > 0 ? rank : 4, c.chunk_size = rank > 0 ? 16 : 64;
    Mamba3Mixer mixer(c, random_weights(c, rng));
    const char* name = rank ? "MIMO R=4" : "SISO";
    const double gemm_flops_per_token = 2.0 * double(c.d_model) * double(c.d_in_proj() + c.d_inner());
    const double sgemm_rate = mamba3::measure_linear_flops(2048, c.d_model, c.d_in_proj());

    {  // prefill, batch 1, seqlen 2048
      const int64_t L = 2048;
      Tensor u = random_tensor(rng, {1, L, c.d_model}, 1.0f);
      double s = mamba3::median_seconds(5, [&] {
        Mamba3State st = mixer.new_state(1);
        mixer.prefill(u, st);
      });
      const double tps = double(L) / s, floor_tps = sgemm_rate / gemm_flops_per_token;
      std::printf("%-12s %-22s %9.2f ms %8.0f t/s %8.0f t/s %7.0f%%\n", name, "prefill b1 L2048", s * 1e3, tps,
                  floor_tps, 100.0 * tps / floor_tps);
    }
    for (int64_t batch : {int64_t(1), int64_t(16)}) {  // decode
      Tensor u = random_tensor(rng, {batch, c.d_model}, 1.0f);
      Tensor out = Tensor::empty(DType::F32, {batch, c.d_model});
      Mamba3State st = mixer.new_state(batch);
      double s = mamba3::median_seconds(50, [&] { mixer.step(u, st, out); });
      const double weight_bytes = 4.0 * double(c.d_model) * double(c.d_in_proj() + c.d_inner());
      const double floor_s = (weight_bytes + 2.0 * double(st.nbytes())) / bw;
      char shape[32];
      std::snprintf(shape, sizeof shape, "decode step b%ld", long(batch));
      std::printf("%-12s %-22s %9.3f ms %8.0f t/s %8.3f ms %7.0f%%\n", name, shape, s * 1e3, double(batch) / s,
                  floor_s * 1e3, 100.0 * floor_s / s);
    }
    std::printf("%-12s sgemm rate at (2048 x %ld x %ld): %.1f GFLOP/s\n", name, long(c.d_model),
                long(c.d_in_proj()), sgemm_rate / 1e9);
  }
  return 0;
}
