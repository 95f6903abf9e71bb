#include "ops/mamba3_reference.h"

#include <cmath>
#include <numbers>
#include <vector>

namespace mamba3 {

namespace {

double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }
double silu(double x) { return x * sigmoid(x); }

void rmsnorm(std::vector<double>& v, size_t off, int64_t n, const float* w) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += v[off + i] * v[off + i];
  double r = 1 / std::sqrt(ss / double(n) + 1e-5);
  for (int64_t i = 0; i < n; ++i) v[off + i] *= r * w[i];
}

// Rot(v, φ) in place with the SISO (interleaved) or MIMO (halves) pairing.
void rotate(double* v, const double* phi, int64_t N, int64_t S, bool halves) {
  for (int64_t i = 0; i < S; ++i) {
    int64_t a = halves ? i : 2 * i, b = halves ? i + N / 2 : 2 * i + 1;
    double c = std::cos(phi[i]), s = std::sin(phi[i]);
    double va = v[a], vb = v[b];
    v[a] = va * c - vb * s;
    v[b] = va * s + vb * c;
  }
}

}  // namespace

void mamba3_reference(const Mamba3Config& c, const Mamba3ReferenceWeights& w, int64_t batch, int64_t L,
                      const float* u, Mamba3StateView state, float* out) {
  const int64_t D = c.d_model, di = c.d_inner(), din = c.d_in_proj(), H = c.nheads(), P = c.headdim, N = c.d_state;
  const int64_t R = c.rank(), G = c.ngroups, S = c.num_angles();
  const Mamba3HeadParams& p = w.head;
  const double two_pi = 2 * std::numbers::pi;
  for (int64_t b = 0; b < batch; ++b) {
    // The state in float64 for the whole call.
    std::vector<double> phi(size_t(H * S)), h(size_t(H * P * N)), kprev(size_t(R * H * N)), xprev(size_t(H * P));
    for (size_t i = 0; i < phi.size(); ++i) phi[i] = state.angle[b * H * S + int64_t(i)];
    for (size_t i = 0; i < h.size(); ++i) h[i] = state.ssm[b * H * P * N + int64_t(i)];
    for (size_t i = 0; i < kprev.size(); ++i) kprev[i] = state.k[b * R * H * N + int64_t(i)];
    for (size_t i = 0; i < xprev.size(); ++i) xprev[i] = state.v[b * H * P + int64_t(i)];

    std::vector<double> zx(static_cast<size_t>(din)), o(static_cast<size_t>(di)), knew(static_cast<size_t>(R * H * N));
    for (int64_t t = 0; t < L; ++t) {
      const float* ut = u + (b * L + t) * D;
      for (int64_t j = 0; j < din; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < D; ++k) acc += double(w.in_proj[j * D + k]) * ut[k];
        zx[size_t(j)] = acc;
      }
      for (int64_t rg = 0; rg < R * G; ++rg) {
        rmsnorm(zx, size_t(c.off_B() + rg * N), N, w.B_norm);
        rmsnorm(zx, size_t(c.off_C() + rg * N), N, w.C_norm);
      }
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t g = hh / (H / G);
        const double dt = softplus(zx[size_t(c.off_dt() + hh)] + p.dt_bias[hh]);
        const double al = zx[size_t(c.off_A() + hh)];
        const double f = c.a_activation == AActivation::HeavyTail ? (al >= 0 ? 1 + al : 1 / (1 - al)) : softplus(al);
        const double A = std::min(-f, -c.A_floor);
        // Ablation switches (spec §15): euler forces λ = 1; no_rotary forces the angle increments to 0.
        const double lam = c.euler ? 1.0 : sigmoid(zx[size_t(c.off_trap() + hh)]);
        const double alpha = std::exp(A * dt), beta = (1 - lam) * dt * alpha, gamma = lam * dt;
        double* ph = &phi[size_t(hh * S)];
        if (!c.no_rotary)
          for (int64_t i = 0; i < S; ++i) ph[i] += std::numbers::pi * std::tanh(zx[size_t(c.off_angles() + i)]) * dt;

        std::vector<double> q(size_t(R * N)), k(size_t(R * N)), v(size_t(R * P)), vp(size_t(R * P));
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t n = 0; n < N; ++n) {
            q[size_t(r * N + n)] = zx[size_t(c.off_C() + (r * G + g) * N + n)] + p.C_bias[(hh * R + r) * N + n];
            k[size_t(r * N + n)] = zx[size_t(c.off_B() + (r * G + g) * N + n)] + p.B_bias[(hh * R + r) * N + n];
          }
          rotate(&q[size_t(r * N)], ph, N, S, c.is_mimo);
          rotate(&k[size_t(r * N)], ph, N, S, c.is_mimo);
          for (int64_t pp = 0; pp < P; ++pp) {
            const double mx = c.is_mimo ? p.mimo_x[(hh * R + r) * P + pp] : 1.0;
            v[size_t(r * P + pp)] = mx * zx[size_t(c.off_x() + hh * P + pp)];
            vp[size_t(r * P + pp)] = mx * xprev[size_t(hh * P + pp)];
          }
        }
        double* hs = &h[size_t(hh * P * N)];
        for (int64_t pp = 0; pp < P; ++pp)
          for (int64_t n = 0; n < N; ++n) {
            double acc = alpha * hs[pp * N + n];
            for (int64_t r = 0; r < R; ++r)
              acc += beta * vp[size_t(r * P + pp)] * kprev[size_t((r * H + hh) * N + n)] +
                     gamma * v[size_t(r * P + pp)] * k[size_t(r * N + n)];
            hs[pp * N + n] = acc;
          }
        // y_r = h·q_r + D·v_r, then the output stage of §7.
        for (int64_t pp = 0; pp < P; ++pp) o[size_t(hh * P + pp)] = 0;
        for (int64_t r = 0; r < R; ++r) {
          std::vector<double> y(static_cast<size_t>(P));
          for (int64_t pp = 0; pp < P; ++pp) {
            double acc = 0;
            for (int64_t n = 0; n < N; ++n) acc += hs[pp * N + n] * q[size_t(r * N + n)];
            y[size_t(pp)] = acc + p.D[hh] * v[size_t(r * P + pp)];
          }
          if (p.norm) {
            double ss = 0;
            for (double yy : y) ss += yy * yy;
            const double rstd = 1 / std::sqrt(ss / double(P) + 1e-5);
            for (int64_t pp = 0; pp < P; ++pp) y[size_t(pp)] *= rstd * p.norm[hh * P + pp];
          }
          for (int64_t pp = 0; pp < P; ++pp) {
            const double z = zx[size_t(hh * P + pp)];
            if (c.is_mimo) {
              const int64_t i = (hh * R + r) * P + pp;
              o[size_t(hh * P + pp)] += p.mimo_o[i] * y[size_t(pp)] * silu(p.mimo_z[i] * z);
            } else {
              o[size_t(hh * P + pp)] = y[size_t(pp)] * silu(z);
            }
          }
        }
        for (int64_t r = 0; r < R; ++r)
          for (int64_t n = 0; n < N; ++n) knew[size_t((r * H + hh) * N + n)] = k[size_t(r * N + n)];
      }
      kprev = knew;
      for (int64_t i = 0; i < H * P; ++i) xprev[size_t(i)] = zx[size_t(c.off_x() + i)];
      float* ot = out + (b * L + t) * D;
      for (int64_t j = 0; j < D; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < di; ++k) acc += double(w.out_proj[j * di + k]) * o[size_t(k)];
        ot[j] = float(acc);
      }
    }
    for (size_t i = 0; i < phi.size(); ++i)
      state.angle[b * H * S + int64_t(i)] = float(phi[i] - two_pi * std::floor(phi[i] / two_pi));
    for (size_t i = 0; i < h.size(); ++i) state.ssm[b * H * P * N + int64_t(i)] = float(h[i]);
    for (size_t i = 0; i < kprev.size(); ++i) state.k[b * R * H * N + int64_t(i)] = float(kprev[i]);
    for (size_t i = 0; i < xprev.size(); ++i) state.v[b * H * P + int64_t(i)] = float(xprev[i]);
  }
}

}  // namespace mamba3
