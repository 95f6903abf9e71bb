#include "ops/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/parallel.h"

namespace mamba3 {

void attention(const AttentionShape& s, const float* q, int64_t Lq, int64_t pos0, const float* k, const float* v,
               int64_t Lk, float* out) {
  const int64_t H = s.heads, Hkv = s.kv_heads, hd = s.head_dim, group = H / Hkv;
  parallel_for(Lq * H, [&](int64_t task) {
    const int64_t t = task / H, h = task % H, kvh = h / group;
    const int64_t nk = s.causal ? std::min(Lk, pos0 + t + 1) : Lk;
    const float* qv = q + (t * H + h) * hd;
    thread_local std::vector<float> scores;
    scores.resize(size_t(std::max<int64_t>(nk, 1)));
    float mx = -INFINITY;
    for (int64_t j = 0; j < nk; ++j) {
      const float* kv = k + (j * Hkv + kvh) * hd;
      float dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < hd; ++d) dot += qv[d] * kv[d];
      scores[size_t(j)] = dot * s.scale;
      mx = std::max(mx, scores[size_t(j)]);
    }
    float denom = 0;
    for (int64_t j = 0; j < nk; ++j) denom += (scores[size_t(j)] = std::exp(scores[size_t(j)] - mx));
    float* o = out + (t * H + h) * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] = 0;
    for (int64_t j = 0; j < nk; ++j) {
      const float p = scores[size_t(j)] / denom;
      const float* vv = v + (j * Hkv + kvh) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] += p * vv[d];
    }
  });
}

void rotary(float* x, int64_t heads, int64_t head_dim, int64_t dim, double base, bool interleaved, int64_t position) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    // Official: inv_freq and the angle in fp32; computed here in double and rounded once (same up to rounding).
    const double angle = double(position) * std::pow(base, -2.0 * double(i) / double(dim));
    const float c = float(std::cos(angle)), sn = float(std::sin(angle));
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + h * head_dim;
      float& a = interleaved ? xh[2 * i] : xh[i];
      float& b = interleaved ? xh[2 * i + 1] : xh[i + half];
      const float a0 = a, b0 = b;
      a = a0 * c - b0 * sn;
      b = b0 * c + a0 * sn;
    }
  }
}

}  // namespace mamba3
