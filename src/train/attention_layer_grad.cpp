#include "train/attention_layer_grad.h"

#include <algorithm>
#include <cmath>

#include "ops/parallel_work.h"
#include "ops/attention.h"
#include "ops/attention_backward.h"
#include "ops/linear.h"
#include "ops/linear_backward.h"
#include "ops/mamba3_common.h"

namespace mamba3 {

namespace {

struct Dims {
  int64_t H, Hkv, hd, qkv, mlp, width, ctx_w;
  explicit Dims(const AttentionConfig& a)
      : H(a.num_heads), Hkv(a.kv_heads()), hd(a.head_dim), qkv(a.qkv_dim()), mlp(a.mlp_dim ? a.mlp_width() : 0),
        width(qkv + mlp), ctx_w(H * hd + mlp / 2) {}
};

AttentionShape shape_of(const AttentionConfig& a) {
  const float scale = a.softmax_scale != 0 ? float(a.softmax_scale) : float(1.0 / std::sqrt(double(a.head_dim)));
  return {a.num_heads, a.kv_heads(), a.head_dim, scale, a.causal};
}

}  // namespace

void attention_train_forward(const AttentionConfig& a, int64_t d_model, const AttentionParamViews& p, const float* x,
                             int64_t B, int64_t L, AttentionActivations& act, float* out) {
  const Dims d(a);
  const int64_t N = B * L, K = a.d_conv;
  act.proj.resize(size_t(N * d.width));
  act.q.resize(size_t(N * d.H * d.hd));
  act.k.resize(size_t(N * d.Hkv * d.hd));
  act.v.resize(size_t(N * d.Hkv * d.hd));
  act.att.resize(size_t(N * d.H * d.hd));
  act.ctx.resize(size_t(N * d.ctx_w));
  linear(x, N, d_model, p.in_w, d.width, act.proj.data());  // (N, qkv + mlp)
  if (p.in_b)
    parallel_for_work(N, d.width + d.ctx_w, [&](int64_t r) {
      for (int64_t j = 0; j < d.width; ++j) act.proj[size_t(r * d.width + j)] += p.in_b[j];
    });
  // Causal depthwise conv per sequence: out[t] = b + Σ_k w[k]·in[t − (K−1) + k], zero before the sequence start.
  const float* qkv_src = act.proj.data();
  int64_t qkv_ld = d.width;
  if (K > 0) {
    act.qkv.resize(size_t(N * d.qkv));
    parallel_for_work(N, d.width + d.ctx_w, [&](int64_t r) {
      const int64_t t = r % L;
      float* o = act.qkv.data() + r * d.qkv;
      for (int64_t ch = 0; ch < d.qkv; ++ch) {
        float acc = p.conv_b[ch];
        for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k)
          acc += p.conv_w[ch * K + k] * act.proj[size_t((r - (K - 1) + k) * d.width + ch)];
        o[ch] = acc;
      }
    });
    qkv_src = act.qkv.data();
    qkv_ld = d.qkv;
  }
  parallel_for_work(N, d.width + d.ctx_w, [&](int64_t r) {
    const int64_t t = r % L;
    const float* row = qkv_src + r * qkv_ld;
    float* qt = act.q.data() + r * d.H * d.hd;
    float* kt = act.k.data() + r * d.Hkv * d.hd;
    std::copy_n(row, d.H * d.hd, qt);
    std::copy_n(row + d.H * d.hd, d.Hkv * d.hd, kt);
    std::copy_n(row + (d.H + d.Hkv) * d.hd, d.Hkv * d.hd, act.v.data() + r * d.Hkv * d.hd);
    if (a.rotary_emb_dim > 0) {
      rotary(qt, d.H, d.hd, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved, t);
      rotary(kt, d.Hkv, d.hd, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved, t);
    }
  });
  const AttentionShape s = shape_of(a);
  for (int64_t b = 0; b < B; ++b)
    attention(s, act.q.data() + b * L * d.H * d.hd, L, 0, act.k.data() + b * L * d.Hkv * d.hd,
              act.v.data() + b * L * d.Hkv * d.hd, L, act.att.data() + b * L * d.H * d.hd);
  parallel_for_work(N, d.width + d.ctx_w, [&](int64_t r) {
    float* c = act.ctx.data() + r * d.ctx_w;
    std::copy_n(act.att.data() + r * d.H * d.hd, d.H * d.hd, c);
    const float* m = act.proj.data() + r * d.width + d.qkv;  // MLP branch: up ⊙ silu(gate)
    for (int64_t j = 0; j < d.mlp / 2; ++j) c[d.H * d.hd + j] = m[j] * detail::silu(m[d.mlp / 2 + j]);
  });
  linear(act.ctx.data(), N, d.ctx_w, p.out_w, d_model, out);
  if (p.out_b)
    parallel_for_work(N, d.width + d.ctx_w, [&](int64_t r) {
      for (int64_t j = 0; j < d_model; ++j) out[r * d_model + j] += p.out_b[j];
    });
}

void attention_train_backward(const AttentionConfig& a, int64_t d_model, const AttentionParamViews& p, const float* x,
                              int64_t B, int64_t L, const AttentionActivations& act, const float* dout, float* dx,
                              const AttentionGradViews& g) {
  const Dims d(a);
  const int64_t N = B * L, K = a.d_conv;
  // out_proj.
  std::vector<float> dctx(size_t(N * d.ctx_w));
  linear_backward_weight(dout, N, d_model, act.ctx.data(), d.ctx_w, g.out_w);
  if (g.out_b) bias_backward(dout, N, d_model, g.out_b);
  linear_backward_input(dout, N, d_model, p.out_w, d.ctx_w, dctx.data());

  // MLP branch and the attention output's gradient.
  std::vector<float> dproj(size_t(N * d.width), 0.0f), datt(size_t(N * d.H * d.hd));
  parallel_for_work(N, d.width + d.ctx_w, [&](int64_t r) {
    const float* dc = dctx.data() + r * d.ctx_w;
    std::copy_n(dc, d.H * d.hd, datt.data() + r * d.H * d.hd);
    const float* m = act.proj.data() + r * d.width + d.qkv;
    float* dm = dproj.data() + r * d.width + d.qkv;
    const int64_t half = d.mlp / 2;
    for (int64_t j = 0; j < half; ++j) {
      const float up = m[j], gate = m[half + j], sg = detail::sigmoid(gate), gj = dc[d.H * d.hd + j];
      dm[j] = gj * gate * sg;
      dm[half + j] = gj * up * sg * (1.0f + gate * (1.0f - sg));
    }
  });

  // Attention, then undo the rotary on dq and dk.
  std::vector<float> dq(size_t(N * d.H * d.hd)), dk(size_t(N * d.Hkv * d.hd)), dv(size_t(N * d.Hkv * d.hd));
  const AttentionShape s = shape_of(a);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t qo = b * L * d.H * d.hd, ko = b * L * d.Hkv * d.hd;
    attention_backward(s, act.q.data() + qo, L, 0, act.k.data() + ko, act.v.data() + ko, L, act.att.data() + qo,
                       datt.data() + qo, dq.data() + qo, dk.data() + ko, dv.data() + ko);
  }
  // Gradient of the q, k, v columns (after the conv when there is one).
  std::vector<float> dqkv_conv;
  float* dqkv = dproj.data();
  int64_t dqkv_ld = d.width;
  if (K > 0) {
    dqkv_conv.assign(size_t(N * d.qkv), 0.0f);
    dqkv = dqkv_conv.data();
    dqkv_ld = d.qkv;
  }
  parallel_for_work(N, d.width + d.ctx_w, [&](int64_t r) {
    const int64_t t = r % L;
    float* qt = dq.data() + r * d.H * d.hd;
    float* kt = dk.data() + r * d.Hkv * d.hd;
    if (a.rotary_emb_dim > 0) {
      rotary_backward(qt, d.H, d.hd, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved, t);
      rotary_backward(kt, d.Hkv, d.hd, a.rotary_emb_dim, a.rotary_emb_base, a.rotary_emb_interleaved, t);
    }
    float* row = dqkv + r * dqkv_ld;
    std::copy_n(qt, d.H * d.hd, row);
    std::copy_n(kt, d.Hkv * d.hd, row + d.H * d.hd);
    std::copy_n(dv.data() + r * d.Hkv * d.hd, d.Hkv * d.hd, row + (d.H + d.Hkv) * d.hd);
  });
  if (K > 0) {
    // in[t'] feeds out[t' + (K−1) − k] through tap k. Channels are independent: parallel over channel blocks.
    constexpr int64_t kCh = 16;
    parallel_for_work((d.qkv + kCh - 1) / kCh, kCh * N * K, [&](int64_t cb) {
      for (int64_t ch = cb * kCh; ch < std::min(d.qkv, (cb + 1) * kCh); ++ch) {
        double db = 0;
        std::vector<double> dw(size_t(K), 0.0);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t t = 0; t < L; ++t) {
            const int64_t r = b * L + t;
            const float go = dqkv[r * d.qkv + ch];
            db += go;
            for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
              const int64_t src = r - (K - 1) + k;
              dw[size_t(k)] += double(go) * act.proj[size_t(src * d.width + ch)];
              dproj[size_t(src * d.width + ch)] += go * p.conv_w[ch * K + k];
            }
          }
        g.conv_b[ch] += float(db);
        for (int64_t k = 0; k < K; ++k) g.conv_w[ch * K + k] += float(dw[size_t(k)]);
      }
    });
  }

  // in_proj.
  linear_backward_weight(dproj.data(), N, d.width, x, d_model, g.in_w);
  if (g.in_b) bias_backward(dproj.data(), N, d.width, g.in_b);
  linear_backward_input(dproj.data(), N, d.width, p.in_w, d_model, dx);
}

}  // namespace mamba3
