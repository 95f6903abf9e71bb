#include "model/init_weights.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

namespace mamba3 {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

double unit_of(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }  // [0, 1), same on every platform

// Values [0, n) of a random tensor from `rng`: uniform in ±bound, or normal (Box–Muller pairs: portable, unlike
// std::normal_distribution) with standard deviation `std`.
void fill_uniform(std::mt19937_64& rng, float* d, int64_t n, double bound) {
  for (int64_t i = 0; i < n; ++i) d[i] = float((unit_of(rng) * 2 - 1) * bound);
}
void fill_normal(std::mt19937_64& rng, float* d, int64_t n, double std) {
  for (int64_t i = 0; i < n; i += 2) {
    const double r = std::sqrt(-2 * std::log(1 - unit_of(rng))), a = 2 * M_PI * unit_of(rng);
    d[i] = float(std * r * std::cos(a));
    if (i + 1 < n) d[i + 1] = float(std * r * std::sin(a));
  }
}

class Init {
 public:
  Init(uint64_t seed, InitStreams streams) : rng_(seed), seed_(seed), parallel_(streams == InitStreams::Parallel) {}

  Tensor uniform(Shape shape, double bound) { return random(std::move(shape), false, bound); }
  Tensor normal(Shape shape, double std) { return random(std::move(shape), true, std); }
  static Tensor constant(Shape shape, float v) {
    Tensor t = Tensor::empty(DType::F32, std::move(shape));
    float* d = t.data<float>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) d[i] = v;
    return t;
  }
  double unit() { return unit_of(rng_); }

  // Parallel streams: the random tensors are filled here, in blocks of kBlock values, each block from its own
  // generator seeded by (seed, tensor, block), so the result depends on neither the thread count nor the order.
  void finish() {
    std::vector<std::pair<size_t, int64_t>> tasks;  // (fill, first value)
    for (size_t f = 0; f < fills_.size(); ++f)
      for (int64_t i0 = 0; i0 < fills_[f].n; i0 += kBlock) tasks.emplace_back(f, i0);
#pragma omp parallel for schedule(dynamic)
    for (int64_t t = 0; t < int64_t(tasks.size()); ++t) {
      const Fill& f = fills_[tasks[size_t(t)].first];
      const int64_t i0 = tasks[size_t(t)].second, n = std::min(kBlock, f.n - i0);
      std::mt19937_64 rng(splitmix64(seed_ ^ splitmix64((uint64_t(tasks[size_t(t)].first) << 32) + uint64_t(i0))));
      if (f.normal)
        fill_normal(rng, f.data + i0, n, f.scale);
      else
        fill_uniform(rng, f.data + i0, n, f.scale);
    }
    fills_.clear();
  }

 private:
  static constexpr int64_t kBlock = int64_t(1) << 20;  // even: Box–Muller pairs never straddle blocks
  struct Fill {
    float* data;
    int64_t n;
    bool normal;
    double scale;
  };

  Tensor random(Shape shape, bool normal, double scale) {
    Tensor t = Tensor::empty(DType::F32, std::move(shape));
    if (parallel_)
      fills_.push_back({t.data<float>(), t.numel(), normal, scale});  // the buffer is shared, so it outlives `t`
    else if (normal)
      fill_normal(rng_, t.data<float>(), t.numel(), scale);
    else
      fill_uniform(rng_, t.data<float>(), t.numel(), scale);
    return t;
  }

  std::mt19937_64 rng_;
  uint64_t seed_;
  bool parallel_;
  std::vector<Fill> fills_;
};

}  // namespace

TensorMap init_weights(const ModelConfig& c, uint64_t seed, InitStreams streams) {
  Init init(seed, streams);
  TensorMap w;
  const int64_t D = c.d_model, V = c.vocab_padded();
  const double out_scale = 1.0 / std::sqrt(double(c.n_layer));
  w["backbone.embedding.weight"] = init.normal({V, D}, 0.02);
  if (!c.tie_embeddings) w["lm_head.weight"] = init.uniform({V, D}, 1 / std::sqrt(double(D)));
  auto norm = [&](const std::string& p) {
    w[p + ".weight"] = Init::constant({D}, 1.0f);
    if (!c.rms_norm) w[p + ".bias"] = Init::constant({D}, 0.0f);
  };
  const Mamba3Config& m = c.ssm;
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "backbone.layers." + std::to_string(i) + ".";
    norm(p + "norm");
    if (c.is_attention_layer(i)) {
      const AttentionConfig& a = c.attn;
      const int64_t mlp = a.mlp_dim ? a.mlp_width() : 0, width = a.qkv_dim() + mlp;
      const int64_t ctx = a.num_heads * a.head_dim + mlp / 2;
      w[p + "mixer.in_proj.weight"] = init.uniform({width, D}, 1 / std::sqrt(double(D)));
      if (a.qkv_proj_bias) w[p + "mixer.in_proj.bias"] = Init::constant({width}, 0.0f);
      if (a.d_conv > 0) {
        w[p + "mixer.conv1d.weight"] = init.uniform({a.qkv_dim(), 1, a.d_conv}, 1 / std::sqrt(double(a.d_conv)));
        w[p + "mixer.conv1d.bias"] = init.uniform({a.qkv_dim()}, 1 / std::sqrt(double(a.d_conv)));
      }
      w[p + "mixer.out_proj.weight"] = init.uniform({D, ctx}, out_scale / std::sqrt(double(ctx)));
      if (a.out_proj_bias) w[p + "mixer.out_proj.bias"] = Init::constant({D}, 0.0f);
    } else {
      const int64_t H = m.nheads(), R = m.rank(), N = m.d_state, P = m.headdim;
      Tensor dt_bias = Tensor::empty(DType::F32, {H});
      const double lo = std::log(m.dt_min), hi = std::log(m.dt_max);
      for (int64_t h = 0; h < H; ++h) {
        const double dt = std::max(std::exp(init.unit() * (hi - lo) + lo), m.dt_init_floor);
        dt_bias.data<float>()[h] = float(dt + std::log(-std::expm1(-dt)));  // softplus⁻¹(dt)
      }
      const std::string q = p + "mixer.";
      w[q + "dt_bias"] = dt_bias;
      w[q + "B_bias"] = Init::constant({H, R, N}, 1.0f);
      w[q + "C_bias"] = Init::constant({H, R, N}, 1.0f);
      if (m.is_mimo) {
        w[q + "mimo_x"] = Init::constant({H, R, P}, 1.0f / float(R));
        w[q + "mimo_z"] = Init::constant({H, R, P}, 1.0f);
        w[q + "mimo_o"] = Init::constant({H, R, P}, 1.0f / float(R));
      }
      w[q + "D"] = Init::constant({H}, 1.0f);
      w[q + "in_proj.weight"] = init.uniform({m.d_in_proj(), D}, 1 / std::sqrt(double(D)));
      w[q + "B_norm.weight"] = Init::constant({N}, 1.0f);
      w[q + "C_norm.weight"] = Init::constant({N}, 1.0f);
      if (m.is_outproj_norm) w[q + "norm.weight"] = Init::constant({m.d_inner()}, 1.0f);
      w[q + "out_proj.weight"] = init.uniform({D, m.d_inner()}, out_scale / std::sqrt(double(m.d_inner())));
    }
    if (c.d_intermediate > 0) {
      norm(p + "norm2");
      w[p + "mlp.fc1.weight"] = init.uniform({2 * c.d_ff(), D}, 1 / std::sqrt(double(D)));
      w[p + "mlp.fc2.weight"] = init.uniform({D, c.d_ff()}, out_scale / std::sqrt(double(c.d_ff())));
    }
  }
  norm("backbone.norm_f");
  init.finish();
  return w;
}

}  // namespace mamba3
