#include "tasks/accuracy_plot.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "core/atomic_file.h"

namespace mamba3::tasks {

namespace {

std::string escape_xml(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '&') out += "&amp;";
    else if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};

}  // namespace

std::string accuracy_plot_svg(const std::vector<AccuracySeries>& series, const std::string& title, double chance,
                              int64_t train_max) {
  const double width = 800, height = 480, left = 70, right = 20, top = 40, bottom = 50;
  const double pw = width - left - right, ph = height - top - bottom;
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
      width, height, width, height, width / 2, escape_xml(title));
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
  auto px = [&](double len) { return left + (std::log2(len) - x0) / (x1 - x0) * pw; };
  auto py = [&](double acc) { return top + (1 - acc) * ph; };

  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n", left, top,
                     pw, ph);
  for (int i = 0; i <= 5; ++i) {
    const double a = i / 5.0;
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
        "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5:.0f}%</text>\n",
        left, py(a), left + pw, left - 6, py(a) + 4, 100 * a);
  }
  // Ticks at the lengths that occur.
  std::vector<int64_t> ticks;
  for (const AccuracySeries& s : series)
    for (const auto& p : s.points) ticks.push_back(p.first);
  std::sort(ticks.begin(), ticks.end());
  ticks.erase(std::unique(ticks.begin(), ticks.end()), ticks.end());
  for (int64_t t : ticks)
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#eee\"/>"
        "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n",
        px(double(t)), top, top + ph, top + ph + 16, t);
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">sequence length (log scale)</text>\n",
                     left + pw / 2, height - 10);
  svg += fmt::format(
      "<text x=\"16\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {0})\">accuracy</text>\n",
      top + ph / 2);
  // Chance and the training range.
  svg += fmt::format(
      "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#888\" stroke-dasharray=\"6,4\"/>"
      "<text x=\"{3}\" y=\"{4:.1f}\" fill=\"#888\">chance</text>\n",
      left, py(chance), left + pw, left + 6, py(chance) - 4);
  if (train_max > 0)
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#888\" stroke-dasharray=\"2,3\"/>"
        "<text x=\"{3:.1f}\" y=\"{4}\" fill=\"#888\">longest training length</text>\n",
        px(double(train_max)), top, top + ph, px(double(train_max)) + 4, top + 14);

  for (size_t k = 0; k < series.size(); ++k) {
    const AccuracySeries& s = series[k];
    const char* color = kColors[k % (sizeof(kColors) / sizeof(kColors[0]))];
    std::string pts;
    for (const auto& [len, acc] : s.points) pts += fmt::format("{:.1f},{:.1f} ", px(double(len)), py(acc));
    svg += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n", color, pts);
    for (const auto& [len, acc] : s.points)
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3.5\" fill=\"{}\"><title>{}: length {}, {:.1f}%"
                         "</title></circle>\n",
                         px(double(len)), py(acc), color, escape_xml(s.label), len, 100 * acc);
    // Legend top right: at the longest lengths accuracy is rarely near 100 %.
    const double lx = left + pw - 190, ly = top + 30 + 18 * double(k);
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"2\"/>"
        "<text x=\"{4}\" y=\"{5}\">{6}</text>\n",
        lx, ly, lx + 24, color, lx + 30, ly + 4, escape_xml(s.label));
  }
  svg += "</svg>\n";
  return svg;
}

void write_accuracy_plot(const std::string& path, const std::vector<AccuracySeries>& series, const std::string& title,
                         double chance, int64_t train_max) {
  AtomicFile f(path);
  f.write(accuracy_plot_svg(series, title, chance, train_max));
  f.commit();
}

}  // namespace mamba3::tasks
