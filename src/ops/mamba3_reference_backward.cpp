#include "ops/mamba3_reference_backward.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace mamba3 {

std::vector<std::pair<std::string, Shape>> mamba3_parameter_shapes(const Mamba3Config& c) {
  const int64_t H = c.nheads(), R = c.rank(), N = c.d_state, P = c.headdim;
  std::vector<std::pair<std::string, Shape>> out = {{"dt_bias", {H}}, {"B_bias", {H, R, N}}, {"C_bias", {H, R, N}}};
  if (c.is_mimo) {
    out.push_back({"mimo_x", {H, R, P}});
    out.push_back({"mimo_z", {H, R, P}});
    out.push_back({"mimo_o", {H, R, P}});
  }
  out.push_back({"D", {H}});
  out.push_back({"in_proj.weight", {c.d_in_proj(), c.d_model}});
  out.push_back({"B_norm.weight", {N}});
  out.push_back({"C_norm.weight", {N}});
  if (c.is_outproj_norm) out.push_back({"norm.weight", {c.d_inner()}});
  out.push_back({"out_proj.weight", {c.d_model, c.d_inner()}});
  return out;
}

Mamba3Params64 Mamba3Params64::zeros(const Mamba3Config& c) {
  Mamba3Params64 p;
  for (const auto& [name, shape] : mamba3_parameter_shapes(c)) p.tensors[name] = Tensor::zeros(DType::F64, shape);
  return p;
}

Mamba3Params64 Mamba3Params64::from(const Mamba3Config& c, const TensorMap& weights, const std::string& prefix) {
  Mamba3Params64 p;
  for (const auto& [name, shape] : mamba3_parameter_shapes(c)) {
    auto it = weights.find(prefix + name);
    MAMBA3_CHECK(it != weights.end(), "Mamba3Params64: missing parameter '{}'", prefix + name);
    MAMBA3_CHECK(it->second.shape() == shape, "Mamba3Params64: '{}' has shape {}, expected {}", prefix + name,
                 shape_str(it->second.shape()), shape_str(shape));
    p.tensors[name] = it->second.to(DType::F64);
  }
  return p;
}

double* Mamba3Params64::data(const std::string& name) {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : it->second.data<double>();
}

const double* Mamba3Params64::data(const std::string& name) const {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : it->second.data<double>();
}

Mamba3State64 Mamba3State64::zeros(const Mamba3Config& c, int64_t batch) {
  const int64_t H = c.nheads();
  return {Tensor::zeros(DType::F64, {batch, H, c.num_angles()}),
          Tensor::zeros(DType::F64, {batch, H, c.headdim, c.d_state}),
          Tensor::zeros(DType::F64, {batch, c.rank(), H, c.d_state}),
          Tensor::zeros(DType::F64, {batch, H, c.headdim})};
}

namespace {

constexpr double kEps = 1e-5;  // every RMSNorm of the mixer
constexpr double kPi = std::numbers::pi;

double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }
double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }
double softplus_grad(double x) { return x > 20 ? 1.0 : sigmoid(x); }  // PyTorch's threshold rule
double silu(double x) { return x * sigmoid(x); }
double silu_grad(double x) {
  const double s = sigmoid(x);
  return s * (1 + x * (1 - s));
}

// Sizes and raw parameter pointers, looked up once.
struct Layer {
  int64_t D, di, din, H, P, N, R, G, S;
  bool mimo;
  double A_floor;
  AActivation act;
  const Mamba3Config* c;
  const double *dt_bias, *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *Dskip, *in_proj, *B_norm, *C_norm, *norm,
      *out_proj;

  Layer(const Mamba3Config& cfg, const Mamba3Params64& p)
      : D(cfg.d_model), di(cfg.d_inner()), din(cfg.d_in_proj()), H(cfg.nheads()), P(cfg.headdim), N(cfg.d_state),
        R(cfg.rank()), G(cfg.ngroups), S(cfg.num_angles()), mimo(cfg.is_mimo), A_floor(cfg.A_floor),
        act(cfg.a_activation), c(&cfg) {
    for (const auto& [name, shape] : mamba3_parameter_shapes(cfg)) {
      const double* d = p.data(name);
      MAMBA3_CHECK(d != nullptr, "Mamba3 reference backward: parameter '{}' missing", name);
      MAMBA3_CHECK(p.tensors.at(name).shape() == shape && p.tensors.at(name).dtype() == DType::F64,
                   "Mamba3 reference backward: parameter '{}' must be F64 of shape {}", name, shape_str(shape));
    }
    dt_bias = p.data("dt_bias"), B_bias = p.data("B_bias"), C_bias = p.data("C_bias");
    mimo_x = p.data("mimo_x"), mimo_z = p.data("mimo_z"), mimo_o = p.data("mimo_o"), Dskip = p.data("D");
    in_proj = p.data("in_proj.weight"), B_norm = p.data("B_norm.weight"), C_norm = p.data("C_norm.weight");
    norm = p.data("norm.weight"), out_proj = p.data("out_proj.weight");
  }
  // Rotary pair i: SISO (2i, 2i+1), MIMO (i, i + N/2) (spec §3).
  int64_t pair_a(int64_t i) const { return mimo ? i : 2 * i; }
  int64_t pair_b(int64_t i) const { return mimo ? i + N / 2 : 2 * i + 1; }
  double mx(int64_t h, int64_t r, int64_t p) const { return mimo ? mimo_x[(h * R + r) * P + p] : 1.0; }
};

// Everything about one token that the recurrence needs, recomputed from its raw in_proj row and the angles before it.
struct Token {
  const double* zx = nullptr;                             // (din) raw in_proj output
  std::vector<double> Bn, Cn, rB, rC;                     // (R·G·N) normalised·weight; (R·G) reciprocal RMS
  std::vector<double> dt, A, dA_dlogit, lam, alpha, beta, gamma;  // (H)
  std::vector<double> th;                                 // (S) tanh θ
  std::vector<double> cs, sn;                             // (H, S) cos/sin of φ_t
  std::vector<double> q, k;                               // (H, R, N) biased and rotated
  std::vector<double> v;                                  // (H, R, P) = mimo_x ⊙ x

  explicit Token(const Layer& l)
      : Bn(size_t(l.R * l.G * l.N)), Cn(Bn.size()), rB(size_t(l.R * l.G)), rC(rB.size()), dt(size_t(l.H)),
        A(dt.size()), dA_dlogit(dt.size()), lam(dt.size()), alpha(dt.size()), beta(dt.size()), gamma(dt.size()),
        th(size_t(l.S)), cs(size_t(l.H * l.S)), sn(cs.size()), q(size_t(l.H * l.R * l.N)), k(q.size()),
        v(size_t(l.H * l.R * l.P)) {}

  const double* x(const Layer& l, int64_t h) const { return zx + l.c->off_x() + h * l.P; }
  const double* z(const Layer& l, int64_t h) const { return zx + h * l.P; }
};

// Fills `tk` for the token whose raw row is `zx`; phi_before (H, S) are the angles before it, phi_after receives φ_t.
void prepare(const Layer& l, const double* zx, const double* phi_before, double* phi_after, Token& tk) {
  const Mamba3Config& c = *l.c;
  tk.zx = zx;
  for (int64_t rg = 0; rg < l.R * l.G; ++rg) {
    for (int which = 0; which < 2; ++which) {
      const double* src = zx + (which == 0 ? c.off_B() : c.off_C()) + rg * l.N;
      const double* w = which == 0 ? l.B_norm : l.C_norm;
      double* dst = (which == 0 ? tk.Bn : tk.Cn).data() + rg * l.N;
      double ss = 0;
      for (int64_t n = 0; n < l.N; ++n) ss += src[n] * src[n];
      const double r = 1 / std::sqrt(ss / double(l.N) + kEps);
      (which == 0 ? tk.rB : tk.rC)[size_t(rg)] = r;
      for (int64_t n = 0; n < l.N; ++n) dst[n] = src[n] * r * w[n];
    }
  }
  // Ablation switches (spec §15): no_rotary makes every angle increment 0 (tanh θ taken as 0, and θ gets no
  // gradient below); euler fixes λ = 1 (the trap logit gets no gradient).
  for (int64_t i = 0; i < l.S; ++i) tk.th[size_t(i)] = c.no_rotary ? 0.0 : std::tanh(zx[c.off_angles() + i]);
  for (int64_t h = 0; h < l.H; ++h) {
    const double dt = softplus(zx[c.off_dt() + h] + l.dt_bias[h]);
    const double a = zx[c.off_A() + h];
    double f, df;
    if (l.act == AActivation::HeavyTail) {
      f = a >= 0 ? 1 + a : 1 / (1 - a);
      df = a >= 0 ? 1.0 : 1 / ((1 - a) * (1 - a));
    } else {
      f = softplus(a);
      df = softplus_grad(a);
    }
    const bool clamped = -f > -l.A_floor;  // A = min(−f, −A_floor) takes the constant
    const double A = clamped ? -l.A_floor : -f;
    const double lam = c.euler ? 1.0 : sigmoid(zx[c.off_trap() + h]);
    const double alpha = std::exp(A * dt);
    tk.dt[size_t(h)] = dt, tk.A[size_t(h)] = A, tk.dA_dlogit[size_t(h)] = clamped ? 0.0 : -df;
    tk.lam[size_t(h)] = lam, tk.alpha[size_t(h)] = alpha;
    tk.beta[size_t(h)] = (1 - lam) * dt * alpha, tk.gamma[size_t(h)] = lam * dt;
    for (int64_t i = 0; i < l.S; ++i) {
      const double phi = phi_before[h * l.S + i] + kPi * tk.th[size_t(i)] * dt;
      phi_after[h * l.S + i] = phi;
      tk.cs[size_t(h * l.S + i)] = std::cos(phi), tk.sn[size_t(h * l.S + i)] = std::sin(phi);
    }
    const int64_t g = h / (l.H / l.G);
    for (int64_t r = 0; r < l.R; ++r) {
      double* q = tk.q.data() + (h * l.R + r) * l.N;
      double* k = tk.k.data() + (h * l.R + r) * l.N;
      for (int64_t n = 0; n < l.N; ++n) {
        q[n] = tk.Cn[size_t((r * l.G + g) * l.N + n)] + l.C_bias[(h * l.R + r) * l.N + n];
        k[n] = tk.Bn[size_t((r * l.G + g) * l.N + n)] + l.B_bias[(h * l.R + r) * l.N + n];
      }
      for (int64_t i = 0; i < l.S; ++i) {
        const double cs = tk.cs[size_t(h * l.S + i)], sn = tk.sn[size_t(h * l.S + i)];
        for (double* vec : {q, k}) {
          const double va = vec[l.pair_a(i)], vb = vec[l.pair_b(i)];
          vec[l.pair_a(i)] = va * cs - vb * sn;
          vec[l.pair_b(i)] = va * sn + vb * cs;
        }
      }
      const double* x = tk.x(l, h);
      double* v = tk.v.data() + (h * l.R + r) * l.P;
      for (int64_t p = 0; p < l.P; ++p) v[p] = l.mx(h, r, p) * x[p];
    }
  }
}

// y_r = h_t·q_r + D·v_r for one head: hs (P, N) → y (R, P).
void head_y(const Layer& l, const Token& tk, int64_t h, const double* hs, double* y) {
  for (int64_t r = 0; r < l.R; ++r) {
    const double* q = tk.q.data() + (h * l.R + r) * l.N;
    const double* v = tk.v.data() + (h * l.R + r) * l.P;
    for (int64_t p = 0; p < l.P; ++p) {
      double acc = 0;
      for (int64_t n = 0; n < l.N; ++n) acc += hs[p * l.N + n] * q[n];
      y[r * l.P + p] = acc + l.Dskip[h] * v[p];
    }
  }
}

// 1/RMS of one rank's y (P) for the per-head output norm, 1 without it.
double output_rstd(const Layer& l, const double* yr) {
  if (!l.norm) return 1;
  double ss = 0;
  for (int64_t p = 0; p < l.P; ++p) ss += yr[p] * yr[p];
  return 1 / std::sqrt(ss / double(l.P) + kEps);
}

// Output stage of spec §7 for one head: y (R, P), z (P) → o (P).
void output_forward(const Layer& l, int64_t h, const double* y, const double* z, double* o) {
  const int64_t P = l.P;
  for (int64_t p = 0; p < P; ++p) o[p] = 0;
  for (int64_t r = 0; r < l.R; ++r) {
    const double* yr = y + r * P;
    const double rstd = output_rstd(l, yr);
    for (int64_t p = 0; p < P; ++p) {
      const double yn = l.norm ? yr[p] * rstd * l.norm[h * P + p] : yr[p];
      if (l.mimo) {
        const int64_t i = (h * l.R + r) * P + p;
        o[p] += l.mimo_o[i] * yn * silu(l.mimo_z[i] * z[p]);
      } else {
        o[p] = yn * silu(z[p]);
      }
    }
  }
}

// Reverse of output_forward: dO (P) → dy (R, P), dz (P, accumulated), parameter gradients (accumulated).
void output_backward(const Layer& l, int64_t h, const double* y, const double* z, const double* dO, double* dy,
                     double* dz, double* g_mimo_z, double* g_mimo_o, double* g_norm) {
  const int64_t P = l.P;
  std::vector<double> dyn(static_cast<size_t>(P)), xhat(static_cast<size_t>(P));
  for (int64_t r = 0; r < l.R; ++r) {
    const double* yr = y + r * P;
    const double rstd = output_rstd(l, yr);
    for (int64_t p = 0; p < P; ++p) {
      xhat[size_t(p)] = yr[p] * rstd;
      const double yn = l.norm ? xhat[size_t(p)] * l.norm[h * P + p] : yr[p];
      if (l.mimo) {
        const int64_t i = (h * l.R + r) * P + p;
        const double zz = l.mimo_z[i] * z[p], s = silu(zz), mo = l.mimo_o[i];
        g_mimo_o[i] += dO[p] * yn * s;
        dyn[size_t(p)] = dO[p] * mo * s;
        const double dzz = dO[p] * mo * yn * silu_grad(zz);
        g_mimo_z[i] += dzz * z[p];
        dz[p] += dzz * l.mimo_z[i];
      } else {
        dyn[size_t(p)] = dO[p] * silu(z[p]);
        dz[p] += dO[p] * yn * silu_grad(z[p]);
      }
    }
    double* dyr = dy + r * P;
    if (l.norm) {
      // yn = x̂·w with x̂ = y·rstd: dy = rstd·(g − x̂·mean(g·x̂)), g = dyn·w.
      double mean = 0;
      for (int64_t p = 0; p < P; ++p) {
        g_norm[h * P + p] += dyn[size_t(p)] * xhat[size_t(p)];
        mean += dyn[size_t(p)] * l.norm[h * P + p] * xhat[size_t(p)];
      }
      mean /= double(P);
      for (int64_t p = 0; p < P; ++p)
        dyr[p] = rstd * (dyn[size_t(p)] * l.norm[h * P + p] - xhat[size_t(p)] * mean);
    } else {
      for (int64_t p = 0; p < P; ++p) dyr[p] = dyn[size_t(p)];
    }
  }
}

// What the forward keeps for one batch row.
struct Tape {
  std::vector<double> zx;   // (L, din) raw in_proj rows
  std::vector<double> phi;  // (L + 1, H, S): phi[0] initial, phi[t + 1] after token t
  std::vector<double> hs;   // (L, H, P, N) state after each token
};

// Forward for one batch row. init_* may be null (zeros). out (L, D) written when non-null; tape filled when non-null.
// The final state goes to fin_* when non-null.
void forward_row(const Layer& l, int64_t L, const double* u, const double* init_angle, const double* init_ssm,
                 const double* init_k, const double* init_v, double* out, Tape* tape, double* fin_angle,
                 double* fin_ssm, double* fin_k, double* fin_v) {
  const int64_t H = l.H, P = l.P, N = l.N, R = l.R, S = l.S;
  std::vector<double> h(size_t(H * P * N), 0.0), kprev(size_t(H * R * N), 0.0), xprev(size_t(H * P), 0.0);
  std::vector<double> phi0(size_t(H * S), 0.0), phi1(size_t(H * S));
  if (init_ssm) std::copy_n(init_ssm, H * P * N, h.begin());
  if (init_angle) std::copy_n(init_angle, H * S, phi0.begin());
  if (init_v) std::copy_n(init_v, H * P, xprev.begin());
  if (init_k)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t hh = 0; hh < H; ++hh)
        for (int64_t n = 0; n < N; ++n) kprev[size_t((hh * R + r) * N + n)] = init_k[(r * H + hh) * N + n];
  if (tape) {
    tape->zx.assign(size_t(L * l.din), 0.0);
    tape->phi.assign(size_t((L + 1) * H * S), 0.0);
    tape->hs.assign(size_t(L * H * P * N), 0.0);
    std::copy(phi0.begin(), phi0.end(), tape->phi.begin());
  }
  std::vector<double> zx(size_t(l.din)), y(size_t(R * P)), o(size_t(l.di));
  Token tk(l);
  for (int64_t t = 0; t < L; ++t) {
    const double* ut = u + t * l.D;
    for (int64_t j = 0; j < l.din; ++j) {
      double acc = 0;
      for (int64_t d = 0; d < l.D; ++d) acc += l.in_proj[j * l.D + d] * ut[d];
      zx[size_t(j)] = acc;
    }
    prepare(l, zx.data(), phi0.data(), phi1.data(), tk);
    for (int64_t hh = 0; hh < H; ++hh) {
      double* hs = h.data() + hh * P * N;
      const double al = tk.alpha[size_t(hh)], be = tk.beta[size_t(hh)], ga = tk.gamma[size_t(hh)];
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) {
          double acc = al * hs[p * N + n];
          for (int64_t r = 0; r < R; ++r)
            acc += be * l.mx(hh, r, p) * xprev[size_t(hh * P + p)] * kprev[size_t((hh * R + r) * N + n)] +
                   ga * tk.v[size_t((hh * R + r) * P + p)] * tk.k[size_t((hh * R + r) * N + n)];
          hs[p * N + n] = acc;
        }
      head_y(l, tk, hh, hs, y.data());
      output_forward(l, hh, y.data(), tk.z(l, hh), o.data() + hh * P);
    }
    if (out)
      for (int64_t j = 0; j < l.D; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < l.di; ++k) acc += l.out_proj[j * l.di + k] * o[size_t(k)];
        out[t * l.D + j] = acc;
      }
    if (tape) {
      std::copy(zx.begin(), zx.end(), tape->zx.begin() + t * l.din);
      std::copy(phi1.begin(), phi1.end(), tape->phi.begin() + (t + 1) * H * S);
      std::copy(h.begin(), h.end(), tape->hs.begin() + t * H * P * N);
    }
    kprev = tk.k;
    std::copy_n(tk.x(l, 0), H * P, xprev.begin());
    std::swap(phi0, phi1);
  }
  if (fin_angle) std::copy(phi0.begin(), phi0.end(), fin_angle);
  if (fin_ssm) std::copy(h.begin(), h.end(), fin_ssm);
  if (fin_v) std::copy(xprev.begin(), xprev.end(), fin_v);
  if (fin_k)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t hh = 0; hh < H; ++hh)
        for (int64_t n = 0; n < N; ++n) fin_k[(r * H + hh) * N + n] = kprev[size_t((hh * R + r) * N + n)];
}

// Parameter-gradient pointers (accumulated over batch rows and tokens).
struct Grads {
  double *dt_bias, *B_bias, *C_bias, *mimo_x, *mimo_z, *mimo_o, *Dskip, *in_proj, *B_norm, *C_norm, *norm, *out_proj;
  explicit Grads(Mamba3Params64& g)
      : dt_bias(g.data("dt_bias")), B_bias(g.data("B_bias")), C_bias(g.data("C_bias")), mimo_x(g.data("mimo_x")),
        mimo_z(g.data("mimo_z")), mimo_o(g.data("mimo_o")), Dskip(g.data("D")), in_proj(g.data("in_proj.weight")),
        B_norm(g.data("B_norm.weight")), C_norm(g.data("C_norm.weight")), norm(g.data("norm.weight")),
        out_proj(g.data("out_proj.weight")) {}
};

// RMSNorm backward for one vector: v (n) raw input, r its reciprocal RMS, w weight, dv_hat = d(normalised·w).
void rmsnorm_backward(const double* v, double r, const double* w, const double* dout, int64_t n, double* dv,
                      double* dw) {
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) {
    dw[i] += dout[i] * v[i] * r;
    mean += dout[i] * w[i] * v[i] * r;
  }
  mean /= double(n);
  for (int64_t i = 0; i < n; ++i) dv[i] += r * (dout[i] * w[i] - v[i] * r * mean);
}

void backward_row(const Layer& l, int64_t L, const double* u, const double* dout, const double* init_angle,
                  const double* init_ssm, const double* init_k, const double* init_v, Grads& g, double* du,
                  double* d_angle, double* d_ssm, double* d_k, double* d_v, double* out) {
  const Mamba3Config& c = *l.c;
  const int64_t H = l.H, P = l.P, N = l.N, R = l.R, S = l.S, G = l.G, PN = P * N;
  Tape tape;
  forward_row(l, L, u, init_angle, init_ssm, init_k, init_v, out, &tape, nullptr, nullptr, nullptr, nullptr);

  // The token before the sequence: the initial k (transposed to (H, R, N)) and x.
  std::vector<double> k_init(size_t(H * R * N), 0.0), x_init(size_t(H * P), 0.0), h_init(size_t(H * PN), 0.0);
  if (init_k)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t hh = 0; hh < H; ++hh)
        for (int64_t n = 0; n < N; ++n) k_init[size_t((hh * R + r) * N + n)] = init_k[(r * H + hh) * N + n];
  if (init_v) std::copy_n(init_v, H * P, x_init.begin());
  if (init_ssm) std::copy_n(init_ssm, H * PN, h_init.begin());

  std::vector<double> dH(size_t(H * PN), 0.0), dPhi(size_t(H * S), 0.0);
  std::vector<double> dk_pend(size_t(H * R * N), 0.0), dv_pend(size_t(H * R * P), 0.0);
  std::vector<double> dk_new(dk_pend.size()), dv_new(dv_pend.size());
  std::vector<double> dzx(size_t(l.din)), dO(size_t(l.di)), o(size_t(l.di)), dBn(size_t(R * G * N)),
      dCn(dBn.size());
  std::vector<double> y(size_t(R * P)), dy(size_t(R * P)), dq(size_t(R * N)), dk(size_t(R * N)), dv(size_t(R * P)),
      vprev(size_t(R * P)), dphi(static_cast<size_t>(S));
  std::vector<double> phi_scratch(size_t(H * S));
  Token cur(l), prv(l);
  prepare(l, tape.zx.data() + (L - 1) * l.din, tape.phi.data() + (L - 1) * H * S, phi_scratch.data(), cur);

  for (int64_t t = L - 1; t >= 0; --t) {
    if (t > 0) prepare(l, tape.zx.data() + (t - 1) * l.din, tape.phi.data() + (t - 1) * H * S, phi_scratch.data(), prv);
    const double* kprev_all = t > 0 ? prv.k.data() : k_init.data();
    const double* xprev_all = t > 0 ? prv.x(l, 0) : x_init.data();
    const double* hprev_all = t > 0 ? tape.hs.data() + (t - 1) * H * PN : h_init.data();
    const double* ht_all = tape.hs.data() + t * H * PN;
    const double* dout_t = dout + t * l.D;
    std::fill(dzx.begin(), dzx.end(), 0.0);
    std::fill(dBn.begin(), dBn.end(), 0.0);
    std::fill(dCn.begin(), dCn.end(), 0.0);
    for (int64_t k = 0; k < l.di; ++k) {
      double acc = 0;
      for (int64_t j = 0; j < l.D; ++j) acc += l.out_proj[j * l.di + k] * dout_t[j];
      dO[size_t(k)] = acc;
    }
    for (int64_t hh = 0; hh < H; ++hh) {
      const int64_t grp = hh / (H / G);
      const double* ht = ht_all + hh * PN;
      const double* hprev = hprev_all + hh * PN;
      double* dHh = dH.data() + hh * PN;
      const double* q = cur.q.data() + hh * R * N;
      const double* k = cur.k.data() + hh * R * N;
      const double* v = cur.v.data() + hh * R * P;
      const double* kprev = kprev_all + hh * R * N;
      const double* xprev = xprev_all + hh * P;
      const double* x = cur.x(l, hh);
      const double al = cur.alpha[size_t(hh)], be = cur.beta[size_t(hh)], ga = cur.gamma[size_t(hh)];
      const double dt = cur.dt[size_t(hh)], lam = cur.lam[size_t(hh)];

      // Output stage.
      head_y(l, cur, hh, ht, y.data());
      output_forward(l, hh, y.data(), cur.z(l, hh), o.data() + hh * P);
      std::fill(dy.begin(), dy.end(), 0.0);
      output_backward(l, hh, y.data(), cur.z(l, hh), dO.data() + hh * P, dy.data(), dzx.data() + hh * P, g.mimo_z,
                      g.mimo_o, g.norm);
      // y_r = h_t·q_r + D·v_r.
      for (int64_t r = 0; r < R; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0;
          for (int64_t p = 0; p < P; ++p) acc += dy[size_t(r * P + p)] * ht[p * N + n];
          dq[size_t(r * N + n)] = acc;
        }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t p = 0; p < P; ++p) {
          g.Dskip[hh] += dy[size_t(r * P + p)] * v[r * P + p];
          dv[size_t(r * P + p)] = l.Dskip[hh] * dy[size_t(r * P + p)] + dv_pend[size_t((hh * R + r) * P + p)];
        }
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0;
          for (int64_t r = 0; r < R; ++r) acc += dy[size_t(r * P + p)] * q[r * N + n];
          dHh[p * N + n] += acc;
        }
      // h_t = α·h_{t−1} + β·Σ_r v'_r k'_rᵀ + γ·Σ_r v_r k_rᵀ  (primes: the previous token).
      for (int64_t r = 0; r < R; ++r)
        for (int64_t p = 0; p < P; ++p) vprev[size_t(r * P + p)] = l.mx(hh, r, p) * xprev[p];
      double dalpha = 0, dbeta = 0, dgamma = 0;
      for (int64_t i = 0; i < PN; ++i) dalpha += dHh[i] * hprev[i];
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t p = 0; p < P; ++p) {
          double hk_prev = 0, hk = 0;  // (dH·k')_p, (dH·k)_p
          for (int64_t n = 0; n < N; ++n) {
            hk_prev += dHh[p * N + n] * kprev[r * N + n];
            hk += dHh[p * N + n] * k[r * N + n];
          }
          dbeta += vprev[size_t(r * P + p)] * hk_prev;
          dgamma += v[r * P + p] * hk;
          dv_new[size_t((hh * R + r) * P + p)] = be * hk_prev;
          dv[size_t(r * P + p)] += ga * hk;
        }
        for (int64_t n = 0; n < N; ++n) {
          double vh_prev = 0, vh = 0;  // (dHᵀ·v')_n, (dHᵀ·v)_n
          for (int64_t p = 0; p < P; ++p) {
            vh_prev += dHh[p * N + n] * vprev[size_t(r * P + p)];
            vh += dHh[p * N + n] * v[r * P + p];
          }
          dk_new[size_t((hh * R + r) * N + n)] = be * vh_prev;
          dk[size_t(r * N + n)] = ga * vh + dk_pend[size_t((hh * R + r) * N + n)];
        }
      }
      for (int64_t i = 0; i < PN; ++i) dHh[i] *= al;

      // Scalars: α = e^{AΔ}, β = (1−λ)Δα, γ = λΔ.
      const double dADT = dalpha * al + dbeta * be;
      double ddt = dADT * cur.A[size_t(hh)] + dbeta * (1 - lam) * al + dgamma * lam;
      const double dlam = -dbeta * dt * al + dgamma * dt;
      dzx[size_t(c.off_A() + hh)] += dADT * dt * cur.dA_dlogit[size_t(hh)];
      if (!c.euler) dzx[size_t(c.off_trap() + hh)] += dlam * lam * (1 - lam);

      // Rotation: (a, b) ↦ (a c − b s, a s + b c); dφ = −d(out_a)·out_b + d(out_b)·out_a.
      std::fill(dphi.begin(), dphi.end(), 0.0);
      for (int64_t r = 0; r < R; ++r) {
        for (int which = 0; which < 2; ++which) {
          double* dvec = (which == 0 ? dq : dk).data() + r * N;
          const double* vec = (which == 0 ? q : k) + r * N;
          for (int64_t i = 0; i < S; ++i) {
            const int64_t a = l.pair_a(i), b = l.pair_b(i);
            const double cs = cur.cs[size_t(hh * S + i)], sn = cur.sn[size_t(hh * S + i)];
            const double da = dvec[a], db = dvec[b];
            dphi[size_t(i)] += -da * vec[b] + db * vec[a];
            dvec[a] = da * cs + db * sn;
            dvec[b] = -da * sn + db * cs;
          }
          // Bias and group: q̃ = Ĉ_{r,g} + C_bias[h, r].
          double* dnorm = (which == 0 ? dCn : dBn).data() + (r * G + grp) * N;
          double* dbias = (which == 0 ? g.C_bias : g.B_bias) + (hh * R + r) * N;
          for (int64_t n = 0; n < N; ++n) dnorm[n] += dvec[n], dbias[n] += dvec[n];
        }
      }
      // φ_t = φ_{t−1} + π·tanh(θ)·Δ: dΦ is the reverse cumulative sum of the per-token dφ.
      for (int64_t i = 0; i < S; ++i) {
        double& dP = dPhi[size_t(hh * S + i)];
        dP += dphi[size_t(i)];
        const double th = cur.th[size_t(i)];
        if (c.no_rotary) continue;
        ddt += dP * kPi * th;
        dzx[size_t(c.off_angles() + i)] += dP * kPi * dt * (1 - th * th);
      }
      const double dsp = ddt * softplus_grad(cur.zx[c.off_dt() + hh] + l.dt_bias[hh]);
      dzx[size_t(c.off_dt() + hh)] += dsp;
      g.dt_bias[hh] += dsp;
      // v_r = mimo_x[h, r] ⊙ x.
      for (int64_t r = 0; r < R; ++r)
        for (int64_t p = 0; p < P; ++p) {
          dzx[size_t(c.off_x() + hh * P + p)] += dv[size_t(r * P + p)] * l.mx(hh, r, p);
          if (l.mimo) g.mimo_x[(hh * R + r) * P + p] += dv[size_t(r * P + p)] * x[p];
        }
    }
    // B/C RMSNorms.
    for (int64_t rg = 0; rg < R * G; ++rg) {
      rmsnorm_backward(cur.zx + c.off_B() + rg * N, cur.rB[size_t(rg)], l.B_norm, dBn.data() + rg * N, N,
                       dzx.data() + c.off_B() + rg * N, g.B_norm);
      rmsnorm_backward(cur.zx + c.off_C() + rg * N, cur.rC[size_t(rg)], l.C_norm, dCn.data() + rg * N, N,
                       dzx.data() + c.off_C() + rg * N, g.C_norm);
    }
    // in_proj and out_proj.
    const double* ut = u + t * l.D;
    for (int64_t d = 0; d < l.D; ++d) {
      double acc = 0;
      for (int64_t j = 0; j < l.din; ++j) acc += l.in_proj[j * l.D + d] * dzx[size_t(j)];
      du[t * l.D + d] = acc;
    }
    for (int64_t j = 0; j < l.din; ++j)
      for (int64_t d = 0; d < l.D; ++d) g.in_proj[j * l.D + d] += dzx[size_t(j)] * ut[d];
    for (int64_t j = 0; j < l.D; ++j)
      for (int64_t k = 0; k < l.di; ++k) g.out_proj[j * l.di + k] += dout_t[j] * o[size_t(k)];

    std::swap(dk_pend, dk_new);
    std::swap(dv_pend, dv_new);
    std::swap(cur, prv);
  }
  // Gradients of the initial state: what reaches token −1.
  std::copy(dH.begin(), dH.end(), d_ssm);
  std::copy(dPhi.begin(), dPhi.end(), d_angle);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t hh = 0; hh < H; ++hh)
      for (int64_t n = 0; n < N; ++n) d_k[(r * H + hh) * N + n] = dk_pend[size_t((hh * R + r) * N + n)];
  for (int64_t hh = 0; hh < H; ++hh)
    for (int64_t p = 0; p < P; ++p) {
      double acc = 0;
      for (int64_t r = 0; r < R; ++r) {
        const double dvp = dv_pend[size_t((hh * R + r) * P + p)];
        acc += dvp * l.mx(hh, r, p);
        if (l.mimo) g.mimo_x[(hh * R + r) * P + p] += dvp * x_init[size_t(hh * P + p)];
      }
      d_v[hh * P + p] = acc;
    }
}

void check_input(const Mamba3Config& c, const Tensor& u, const char* what) {
  MAMBA3_CHECK(u.ndim() == 3 && u.dim(2) == c.d_model && u.dim(1) >= 1,
               "Mamba3 reference backward: {} shape {} should be (batch, L ≥ 1, {})", what, shape_str(u.shape()),
               c.d_model);
}

void check_state(const Mamba3Config& c, const Mamba3State64& s, int64_t B) {
  const int64_t H = c.nheads();
  MAMBA3_CHECK(s.angle.shape() == Shape({B, H, c.num_angles()}) && s.ssm.shape() == Shape({B, H, c.headdim, c.d_state}) &&
                   s.k.shape() == Shape({B, c.rank(), H, c.d_state}) && s.v.shape() == Shape({B, H, c.headdim}),
               "Mamba3 reference backward: initial state shapes do not match the layer and batch {}", B);
  for (const Tensor* t : {&s.angle, &s.ssm, &s.k, &s.v})
    MAMBA3_CHECK(t->dtype() == DType::F64, "Mamba3 reference backward: initial states must be F64");
}

}  // namespace

Tensor mamba3_reference_forward64(const Mamba3Config& c, const Mamba3Params64& p, const Tensor& u,
                                  const Mamba3State64* init, Mamba3State64* final_state) {
  check_input(c, u, "u");
  const Layer l(c, p);
  const int64_t B = u.dim(0), L = u.dim(1), H = l.H;
  if (init) check_state(c, *init, B);
  if (final_state) *final_state = Mamba3State64::zeros(c, B);
  Tensor u64 = u.to(DType::F64);
  Tensor out = Tensor::empty(DType::F64, {B, L, c.d_model});
  for (int64_t b = 0; b < B; ++b) {
    auto at = [&](const Tensor& t, int64_t per) { return t.data<double>() + b * per; };
    auto at_mut = [&](Tensor& t, int64_t per) { return t.data<double>() + b * per; };
    forward_row(l, L, u64.data<double>() + b * L * l.D, init ? at(init->angle, H * l.S) : nullptr,
                init ? at(init->ssm, H * l.P * l.N) : nullptr, init ? at(init->k, l.R * H * l.N) : nullptr,
                init ? at(init->v, H * l.P) : nullptr, out.data<double>() + b * L * l.D, nullptr,
                final_state ? at_mut(final_state->angle, H * l.S) : nullptr,
                final_state ? at_mut(final_state->ssm, H * l.P * l.N) : nullptr,
                final_state ? at_mut(final_state->k, l.R * H * l.N) : nullptr,
                final_state ? at_mut(final_state->v, H * l.P) : nullptr);
  }
  return out;
}

Mamba3Gradients64 mamba3_reference_backward(const Mamba3Config& c, const Mamba3Params64& p, const Tensor& u,
                                            const Tensor& dout, const Mamba3State64* init) {
  check_input(c, u, "u");
  check_input(c, dout, "dout");
  MAMBA3_CHECK(u.shape() == dout.shape(), "Mamba3 reference backward: u {} and dout {} differ",
               shape_str(u.shape()), shape_str(dout.shape()));
  const Layer l(c, p);
  const int64_t B = u.dim(0), L = u.dim(1), H = l.H;
  if (init) check_state(c, *init, B);
  Mamba3Gradients64 res{Mamba3Params64::zeros(c), Tensor::zeros(DType::F64, u.shape()), Mamba3State64::zeros(c, B),
                        Tensor::zeros(DType::F64, u.shape())};
  Grads g(res.params);
  Tensor u64 = u.to(DType::F64), d64 = dout.to(DType::F64);
  const int64_t per_a = H * l.S, per_h = H * l.P * l.N, per_k = l.R * H * l.N, per_v = H * l.P;
  for (int64_t b = 0; b < B; ++b) {
    const double* ia = init ? init->angle.data<double>() + b * per_a : nullptr;
    const double* ih = init ? init->ssm.data<double>() + b * per_h : nullptr;
    const double* ik = init ? init->k.data<double>() + b * per_k : nullptr;
    const double* iv = init ? init->v.data<double>() + b * per_v : nullptr;
    backward_row(l, L, u64.data<double>() + b * L * l.D, d64.data<double>() + b * L * l.D, ia, ih, ik, iv, g,
                 res.u.data<double>() + b * L * l.D, res.init.angle.data<double>() + b * per_a,
                 res.init.ssm.data<double>() + b * per_h, res.init.k.data<double>() + b * per_k,
                 res.init.v.data<double>() + b * per_v, res.out.data<double>() + b * L * l.D);
  }
  return res;
}

}  // namespace mamba3
