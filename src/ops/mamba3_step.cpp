#include "ops/mamba3_step.h"

#include <algorithm>

#include "core/parallel.h"

namespace mamba3 {

using namespace detail;

void Mamba3StepScratch::reserve(const Mamba3Config& c, int threads) {
  const size_t R = size_t(c.rank()), N = size_t(c.d_state), P = size_t(c.headdim), S = size_t(c.num_angles());
  if (per_thread.size() >= size_t(threads) && !per_thread.empty() && per_thread[0].q.size() == R * N &&
      per_thread[0].v.size() == R * P && per_thread[0].cs.size() == S)
    return;
  per_thread.assign(size_t(threads), {});
  for (auto& t : per_thread) {
    t.q.resize(R * N), t.k.resize(R * N), t.v.resize(R * P), t.vprev.resize(R * P), t.y.resize(R * P);
    t.cs.resize(S), t.sn.resize(S);
  }
}

void mamba3_step(const Mamba3Config& c, const Mamba3HeadParams& p, int64_t batch, const float* zx,
                 Mamba3StateView state, float* o, Mamba3StepScratch& scratch) {
  const int64_t H = c.nheads(), P = c.headdim, N = c.d_state, R = c.rank(), S = c.num_angles(), G = c.ngroups;
  const int64_t d_in = c.d_in_proj(), d_inner = c.d_inner();
  const bool mimo = c.is_mimo;
  scratch.reserve(c, max_threads());
  parallel_for(batch * H, [&](int64_t task) {
    const int64_t b = task / H, h = task % H, g = h / (H / G);
    auto& s = scratch.per_thread[size_t(thread_index())];
    const float* row = zx + b * d_in;
    float* phi = state.angle + (b * H + h) * S;
    float* hs = state.ssm + (b * H + h) * P * N;
    float* kst = state.k + b * R * H * N;  // (R, H, N) of this row
    float* xst = state.v + (b * H + h) * P;
    const float* x = row + c.off_x() + h * P;

    HeadScalars sc = head_scalars(c, row, h, p.dt_bias);
    const float alpha = std::exp(sc.adt), beta = (1.0f - sc.lam) * sc.dt * alpha, gamma = sc.lam * sc.dt;
    advance_angles(c, row + c.off_angles(), sc.dt, phi, s.cs.data(), s.sn.data());
    for (int64_t r = 0; r < R; ++r) {
      bias_rotate(row + c.off_C() + (r * G + g) * N, p.C_bias + (h * R + r) * N, s.cs.data(), s.sn.data(), N, S,
                  mimo, s.q.data() + r * N);
      bias_rotate(row + c.off_B() + (r * G + g) * N, p.B_bias + (h * R + r) * N, s.cs.data(), s.sn.data(), N, S,
                  mimo, s.k.data() + r * N);
      const float* mx = mimo ? p.mimo_x + (h * R + r) * P : nullptr;
      for (int64_t q = 0; q < P; ++q) {
        // β and γ are folded into the values so the state pass is one fused multiply-add per rank.
        s.vprev[r * P + q] = beta * (mx ? mx[q] * xst[q] : xst[q]);
        s.v[r * P + q] = mx ? mx[q] * x[q] : x[q];
      }
    }
    for (int64_t q = 0; q < P; ++q) {
      float* hrow = hs + q * N;
      for (int64_t n = 0; n < N; ++n) hrow[n] *= alpha;
      for (int64_t r = 0; r < R; ++r) {
        const float a = s.vprev[r * P + q], bcoef = gamma * s.v[r * P + q];
        const float* kp = kst + (r * H + h) * N;
        const float* kn = s.k.data() + r * N;
        for (int64_t n = 0; n < N; ++n) hrow[n] += a * kp[n] + bcoef * kn[n];
      }
      for (int64_t r = 0; r < R; ++r) {
        const float* qr = s.q.data() + r * N;
        float dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t n = 0; n < N; ++n) dot += hrow[n] * qr[n];
        s.y[r * P + q] = dot + p.D[h] * s.v[r * P + q];
      }
    }
    output_stage(c, p, h, s.y.data(), row + h * P, o + b * d_inner + h * P);
    for (int64_t r = 0; r < R; ++r) std::copy_n(s.k.data() + r * N, N, kst + (r * H + h) * N);
    std::copy_n(x, P, xst);
  });
}

}  // namespace mamba3
