#include "train/loss_curve.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "core/atomic_file.h"
#include "core/svg_chart.h"

namespace mamba3 {

namespace {
constexpr const char* kTrainColor = "#1f77b4";
constexpr const char* kValColor = "#d62728";
}  // namespace

std::string loss_curve_svg(const std::vector<StepRecord>& records, const std::string& title) {
  SvgChart chart(title);
  std::vector<const StepRecord*> finite;
  for (const StepRecord& r : records)
    if (std::isfinite(r.loss)) finite.push_back(&r);
  if (finite.empty()) {
    chart.message("no steps logged yet");
    return chart.finish();
  }
  auto has_val = [](const StepRecord* r) { return r->val_loss && std::isfinite(*r->val_loss); };
  double x0 = double(finite.front()->step), x1 = x0, y0 = finite.front()->loss, y1 = y0;
  for (const StepRecord* r : finite) {
    x0 = std::min(x0, double(r->step));
    x1 = std::max(x1, double(r->step));
    y0 = std::min(y0, r->loss);
    y1 = std::max(y1, r->loss);
    if (has_val(r)) {
      y0 = std::min(y0, *r->val_loss);
      y1 = std::max(y1, *r->val_loss);
    }
  }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 - y0 < 1e-9) {
    y0 -= 0.5;
    y1 += 0.5;
  }
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad;
  y1 += pad;
  auto px = [&](double x) { return chart.left() + (x - x0) / (x1 - x0) * chart.plot_width(); };
  auto py = [&](double y) { return chart.top() + (1 - (y - y0) / (y1 - y0)) * chart.plot_height(); };

  // Axes, grid and tick labels (5 ticks on each axis).
  chart.frame();
  for (int i = 0; i <= 4; ++i) {
    const double fy = y0 + (y1 - y0) * i / 4, fx = x0 + (x1 - x0) * i / 4;
    chart.hgrid(py(fy), fmt::format("{:.3g}", fy));
    chart.vgrid(px(fx), fmt::format("{}", std::llround(fx)));
  }
  chart.axis_titles("step", "loss");

  std::vector<std::pair<double, double>> train_pts, val_pts;
  for (const StepRecord* r : finite) {
    train_pts.emplace_back(px(double(r->step)), py(r->loss));
    if (has_val(r)) val_pts.emplace_back(px(double(r->step)), py(*r->val_loss));
  }
  chart.polyline(train_pts, kTrainColor, 1.5);
  if (!val_pts.empty()) chart.polyline(val_pts, kValColor, 2);
  for (const auto& [x, y] : val_pts) chart.marker(x, y, 3, kValColor);
  const double lx = chart.left() + chart.plot_width() - 150, ly = chart.top() + 14;
  chart.legend_entry(lx, ly, kTrainColor, "training loss");
  if (!val_pts.empty()) chart.legend_entry(lx, ly + 18, kValColor, "validation loss");
  return chart.finish();
}

void write_loss_curve(const std::string& path, const std::vector<StepRecord>& records, const std::string& title) {
  AtomicFile f(path);
  f.write(loss_curve_svg(records, title));
  f.commit();
}

}  // namespace mamba3
