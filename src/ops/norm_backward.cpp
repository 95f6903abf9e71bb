#include "ops/norm_backward.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/parallel_work.h"

namespace mamba3 {

namespace {

constexpr int64_t kRowBlock = 32;

// Runs row_fn(r, dw_partial, db_partial) over blocks of rows in parallel, then adds the per-block partial sums
// into dw/db in block order.
template <typename RowFn>
void blocked_rows(int64_t rows, int64_t D, float* dw, float* db, RowFn&& row_fn) {
  const int64_t nblocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<double> pw(size_t(nblocks * D), 0.0), pb(db ? size_t(nblocks * D) : 0, 0.0);
  parallel_for_work(nblocks, 4 * kRowBlock * D, [&](int64_t blk) {
    double* w = pw.data() + blk * D;
    double* b = db ? pb.data() + blk * D : nullptr;
    for (int64_t r = blk * kRowBlock; r < std::min(rows, (blk + 1) * kRowBlock); ++r) row_fn(r, w, b);
  });
  parallel_for_work((D + 63) / 64, 64 * nblocks, [&](int64_t cb) {
    for (int64_t i = cb * 64; i < std::min(D, (cb + 1) * 64); ++i) {
      double sw = 0, sb = 0;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        sw += pw[size_t(blk * D + i)];
        if (db) sb += pb[size_t(blk * D + i)];
      }
      dw[i] += float(sw);
      if (db) db[i] += float(sb);
    }
  });
}

}  // namespace

void rmsnorm_backward(const float* x, const float* dy, int64_t rows, int64_t D, const float* w, float eps, float* dx,
                      float* dw, bool accumulate) {
  blocked_rows(rows, D, dw, nullptr, [&](int64_t r, double* pw, double*) {
    const float* xr = x + r * D;
    const float* gr = dy + r * D;
    float* dxr = dx + r * D;
    double ss = 0, gx = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
    const double s = 1.0 / std::sqrt(ss / double(D) + eps);
    for (int64_t i = 0; i < D; ++i) {
      gx += double(gr[i]) * w[i] * xr[i];
      pw[i] += double(gr[i]) * xr[i] * s;
    }
    const double c = s * s * s * gx / double(D);
    for (int64_t i = 0; i < D; ++i) {
      const float v = float(s * double(gr[i]) * w[i] - c * xr[i]);
      dxr[i] = accumulate ? dxr[i] + v : v;
    }
  });
}

void layernorm_backward(const float* x, const float* dy, int64_t rows, int64_t D, const float* w, float eps, float* dx,
                        float* dw, float* db, bool accumulate) {
  blocked_rows(rows, D, dw, db, [&](int64_t r, double* pw, double* pb) {
    const float* xr = x + r * D;
    const float* gr = dy + r * D;
    float* dxr = dx + r * D;
    double sum = 0, ss = 0;
    for (int64_t i = 0; i < D; ++i) sum += xr[i];
    const double mean = sum / double(D);
    for (int64_t i = 0; i < D; ++i) ss += (xr[i] - mean) * (xr[i] - mean);
    const double s = 1.0 / std::sqrt(ss / double(D) + eps);
    double mg = 0, mgx = 0;
    for (int64_t i = 0; i < D; ++i) {
      const double xh = (xr[i] - mean) * s, g = double(gr[i]) * w[i];
      mg += g;
      mgx += g * xh;
      pw[i] += double(gr[i]) * xh;
      pb[i] += gr[i];
    }
    mg /= double(D);
    mgx /= double(D);
    for (int64_t i = 0; i < D; ++i) {
      const double xh = (xr[i] - mean) * s, g = double(gr[i]) * w[i];
      const float v = float(s * (g - mg - xh * mgx));
      dxr[i] = accumulate ? dxr[i] + v : v;
    }
  });
}

}  // namespace mamba3
