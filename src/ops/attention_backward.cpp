#include "ops/attention_backward.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/parallel_work.h"

namespace mamba3 {

void attention_backward(const AttentionShape& s, const float* q, int64_t Lq, int64_t pos0, const float* k,
                        const float* v, int64_t Lk, const float* out, const float* dout, float* dq, float* dk,
                        float* dv) {
  const int64_t H = s.heads, Hkv = s.kv_heads, hd = s.head_dim, group = H / Hkv;
  // Per query head partial dk/dv (Lk, hd), summed over the group afterwards in head order (deterministic).
  std::vector<float> pk(size_t(H * Lk * hd)), pv(size_t(H * Lk * hd));
  parallel_for_work(H, 4 * Lq * Lk * hd, [&](int64_t h) {
    const int64_t kvh = h / group;
    float* dkh = pk.data() + h * Lk * hd;
    float* dvh = pv.data() + h * Lk * hd;
    std::fill_n(dkh, Lk * hd, 0.0f);
    std::fill_n(dvh, Lk * hd, 0.0f);
    std::vector<float> p(size_t(std::max<int64_t>(Lk, 1)));
    for (int64_t t = 0; t < Lq; ++t) {
      const int64_t nk = s.causal ? std::min(Lk, pos0 + t + 1) : Lk;
      const float* qv = q + (t * H + h) * hd;
      const float* ov = out + (t * H + h) * hd;
      const float* gv = dout + (t * H + h) * hd;
      float* dqv = dq + (t * H + h) * hd;
      float mx = -INFINITY;
      for (int64_t j = 0; j < nk; ++j) {
        const float* kv = k + (j * Hkv + kvh) * hd;
        float dot = 0;
        for (int64_t d = 0; d < hd; ++d) dot += qv[d] * kv[d];
        p[size_t(j)] = dot * s.scale;
        mx = std::max(mx, p[size_t(j)]);
      }
      float denom = 0;
      for (int64_t j = 0; j < nk; ++j) denom += (p[size_t(j)] = std::exp(p[size_t(j)] - mx));
      float go = 0;  // do_t · o_t
      for (int64_t d = 0; d < hd; ++d) go += gv[d] * ov[d];
      for (int64_t d = 0; d < hd; ++d) dqv[d] = 0;
      for (int64_t j = 0; j < nk; ++j) {
        const float pj = p[size_t(j)] / denom;
        const float* kv = k + (j * Hkv + kvh) * hd;
        const float* vv = v + (j * Hkv + kvh) * hd;
        float gvj = 0;
        for (int64_t d = 0; d < hd; ++d) gvj += gv[d] * vv[d];
        const float ds = pj * (gvj - go) * s.scale;
        float* dkj = dkh + j * hd;
        float* dvj = dvh + j * hd;
        for (int64_t d = 0; d < hd; ++d) {
          dqv[d] += ds * kv[d];
          dkj[d] += ds * qv[d];
          dvj[d] += pj * gv[d];
        }
      }
    }
  });
  parallel_for_work(Hkv, 2 * Lk * group * hd, [&](int64_t kvh) {
    for (int64_t j = 0; j < Lk; ++j) {
      float* dkj = dk + (j * Hkv + kvh) * hd;
      float* dvj = dv + (j * Hkv + kvh) * hd;
      std::fill_n(dkj, hd, 0.0f);
      std::fill_n(dvj, hd, 0.0f);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        for (int64_t d = 0; d < hd; ++d) {
          dkj[d] += pk[size_t((h * Lk + j) * hd + d)];
          dvj[d] += pv[size_t((h * Lk + j) * hd + d)];
        }
    }
  });
}

void rotary_backward(float* dx, int64_t heads, int64_t head_dim, int64_t dim, double base, bool interleaved,
                     int64_t position) {
  rotary(dx, heads, head_dim, dim, base, interleaved, -position);  // a rotation's transpose is the opposite rotation
}

}  // namespace mamba3
