#include "train/loss_curve.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "core/atomic_file.h"

namespace mamba3 {

namespace {

std::string escape_xml(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

}  // namespace

std::string loss_curve_svg(const std::vector<StepRecord>& records, const std::string& title) {
  const double width = 800, height = 480, left = 70, right = 20, top = 40, bottom = 50;
  const double pw = width - left - right, ph = height - top - bottom;
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
      width, height, width, height, width / 2, escape_xml(title));
  std::vector<const StepRecord*> finite;
  for (const StepRecord& r : records)
    if (std::isfinite(r.loss)) finite.push_back(&r);
  if (finite.empty()) {
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no steps logged yet</text>\n</svg>\n",
                       width / 2, height / 2);
    return svg;
  }
  double x0 = double(finite.front()->step), x1 = x0, y0 = finite.front()->loss, y1 = y0;
  for (const StepRecord* r : finite) {
    x0 = std::min(x0, double(r->step));
    x1 = std::max(x1, double(r->step));
    y0 = std::min(y0, r->loss);
    y1 = std::max(y1, r->loss);
    if (r->val_loss && std::isfinite(*r->val_loss)) {
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
  auto px = [&](double x) { return left + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return top + (1 - (y - y0) / (y1 - y0)) * ph; };

  // Axes, grid and tick labels (5 ticks on each axis).
  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n", left, top,
                     pw, ph);
  for (int i = 0; i <= 4; ++i) {
    const double fy = y0 + (y1 - y0) * i / 4, fx = x0 + (x1 - x0) * i / 4;
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
        "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5:.3g}</text>\n",
        left, py(fy), left + pw, left - 6, py(fy) + 4, fy);
    svg += fmt::format(
        "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#ddd\"/>"
        "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n",
        px(fx), top, top + ph, top + ph + 16, std::llround(fx));
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", left + pw / 2, height - 10);
  svg += fmt::format("<text x=\"16\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {0})\">loss</text>\n",
                     top + ph / 2);

  std::string train_pts, val_pts;
  for (const StepRecord* r : finite) {
    train_pts += fmt::format("{:.1f},{:.1f} ", px(double(r->step)), py(r->loss));
    if (r->val_loss && std::isfinite(*r->val_loss))
      val_pts += fmt::format("{:.1f},{:.1f} ", px(double(r->step)), py(*r->val_loss));
  }
  svg += fmt::format("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n", train_pts);
  if (!val_pts.empty())
    svg += fmt::format(
        "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" marker-mid=\"none\" points=\"{}\"/>\n",
        val_pts);
  for (const StepRecord* r : finite)
    if (r->val_loss && std::isfinite(*r->val_loss))
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"#d62728\"/>\n", px(double(r->step)),
                         py(*r->val_loss));
  // Legend.
  const double lx = left + pw - 150, ly = top + 14;
  svg += fmt::format(
      "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#1f77b4\" stroke-width=\"2\"/>"
      "<text x=\"{3}\" y=\"{4}\">training loss</text>\n",
      lx, ly, lx + 24, lx + 30, ly + 4);
  if (!val_pts.empty())
    svg += fmt::format(
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#d62728\" stroke-width=\"2\"/>"
        "<text x=\"{3}\" y=\"{4}\">validation loss</text>\n",
        lx, ly + 18, lx + 24, lx + 30, ly + 22);
  svg += "</svg>\n";
  return svg;
}

void write_loss_curve(const std::string& path, const std::vector<StepRecord>& records, const std::string& title) {
  AtomicFile f(path);
  f.write(loss_curve_svg(records, title));
  f.commit();
}

}  // namespace mamba3
