#include "model/init_weights.h"

#include <cmath>
#include <random>

namespace mamba3 {

namespace {

class Init {
 public:
  explicit Init(uint64_t seed) : rng_(seed) {}

  Tensor uniform(Shape shape, double bound) {
    Tensor t = Tensor::empty(DType::F32, std::move(shape));
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = float((unit() * 2 - 1) * bound);
    return t;
  }
  Tensor normal(Shape shape, double std) {
    Tensor t = Tensor::empty(DType::F32, std::move(shape));
    for (int64_t i = 0; i < t.numel(); i += 2) {  // Box–Muller: portable, unlike std::normal_distribution
      const double r = std::sqrt(-2 * std::log(1 - unit())), a = 2 * M_PI * unit();
      t.data<float>()[i] = float(std * r * std::cos(a));
      if (i + 1 < t.numel()) t.data<float>()[i + 1] = float(std * r * std::sin(a));
    }
    return t;
  }
  static Tensor constant(Shape shape, float v) {
    Tensor t = Tensor::empty(DType::F32, std::move(shape));
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = v;
    return t;
  }
  double unit() { return double(rng_() >> 11) * 0x1.0p-53; }  // [0, 1), same on every platform

 private:
  std::mt19937_64 rng_;
};

}  // namespace

TensorMap init_weights(const ModelConfig& c, uint64_t seed) {
  Init init(seed);
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
  return w;
}

}  // namespace mamba3
