#include "tasks/accuracy_plot.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "core/atomic_file.h"
#include "core/svg_chart.h"

namespace mamba3::tasks {

namespace {

constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};

}  // namespace

std::string accuracy_plot_svg(const std::vector<AccuracySeries>& series, const std::string& title, double chance,
                              int64_t train_max) {
  SvgChart chart(title);
  // x: log2(length) over the lengths shown (and the training length); y: accuracy 0 … 1.
  double x0 = train_max > 0 ? std::log2(double(train_max)) : 0, x1 = x0;
  bool any = false;
  for (const AccuracySeries& s : series)
    for (const auto& [len, acc] : s.points) {
      const double lx = std::log2(double(std::max<int64_t>(len, 1)));
      if (!any && train_max <= 0) x0 = x1 = lx;
      x0 = std::min(x0, lx), x1 = std::max(x1, lx), any = true;
    }
  if (x1 - x0 < 1e-9) x0 -= 0.5, x1 += 0.5;
  const double span = x1 - x0;
  x0 -= 0.05 * span, x1 += 0.05 * span;
  auto px = [&](double len) { return chart.left() + (std::log2(len) - x0) / (x1 - x0) * chart.plot_width(); };
  auto py = [&](double acc) { return chart.top() + (1 - acc) * chart.plot_height(); };

  chart.frame();
  for (int i = 0; i <= 5; ++i) chart.hgrid(py(i / 5.0), fmt::format("{:.0f}%", 100 * (i / 5.0)));
  // Ticks at the lengths that occur.
  std::vector<int64_t> ticks;
  for (const AccuracySeries& s : series)
    for (const auto& p : s.points) ticks.push_back(p.first);
  std::sort(ticks.begin(), ticks.end());
  ticks.erase(std::unique(ticks.begin(), ticks.end()), ticks.end());
  for (int64_t t : ticks) chart.vgrid(px(double(t)), fmt::format("{}", t), "#eee");
  chart.axis_titles("sequence length (log scale)", "accuracy");
  // Chance and the training range.
  chart.hline_note(py(chance), "chance", "6,4");
  if (train_max > 0) chart.vline_note(px(double(train_max)), "longest training length", "2,3");

  for (size_t k = 0; k < series.size(); ++k) {
    const AccuracySeries& s = series[k];
    const char* color = kColors[k % (sizeof(kColors) / sizeof(kColors[0]))];
    std::vector<std::pair<double, double>> pts;
    for (const auto& [len, acc] : s.points) pts.emplace_back(px(double(len)), py(acc));
    chart.polyline(pts, color, 2);
    for (const auto& [len, acc] : s.points)
      chart.marker(px(double(len)), py(acc), 3.5, color, fmt::format("{}: length {}, {:.1f}%", s.label, len, 100 * acc));
    // Legend top right: at the longest lengths accuracy is rarely near 100 %.
    chart.legend_entry(chart.left() + chart.plot_width() - 190, chart.top() + 30 + 18 * double(k), color, s.label);
  }
  return chart.finish();
}

void write_accuracy_plot(const std::string& path, const std::vector<AccuracySeries>& series, const std::string& title,
                         double chance, int64_t train_max) {
  AtomicFile f(path);
  f.write(accuracy_plot_svg(series, title, chance, train_max));
  f.commit();
}

}  // namespace mamba3::tasks
