#include "core/svg_chart.h"

#include <fmt/format.h>

namespace mamba3 {

std::string SvgChart::escape(const std::string& s) {
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

SvgChart::SvgChart(const std::string& title)
    : svg_(fmt::format(
          "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" "
          "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
          "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
          kWidth, kHeight, kWidth, kHeight, kWidth / 2, escape(title))) {}

void SvgChart::frame() {
  svg_ += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n", kLeft,
                      kTop, plot_width(), plot_height());
}

void SvgChart::message(const std::string& text) {
  svg_ += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", kWidth / 2, kHeight / 2,
                      escape(text));
}

void SvgChart::hgrid(double y, const std::string& label) {
  svg_ += fmt::format(
      "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/>"
      "<text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5}</text>\n",
      kLeft, y, kLeft + plot_width(), kLeft - 6, y + 4, escape(label));
}

void SvgChart::vgrid(double x, const std::string& label, const char* stroke) {
  svg_ += fmt::format(
      "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"{5}\"/>"
      "<text x=\"{0:.1f}\" y=\"{3}\" text-anchor=\"middle\">{4}</text>\n",
      x, kTop, kTop + plot_height(), kTop + plot_height() + 16, escape(label), stroke);
}

void SvgChart::axis_titles(const std::string& x_title, const std::string& y_title) {
  svg_ += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", kLeft + plot_width() / 2,
                      kHeight - 10, escape(x_title));
  svg_ += fmt::format("<text x=\"16\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {0})\">{1}</text>\n",
                      kTop + plot_height() / 2, escape(y_title));
}

void SvgChart::hline_note(double y, const std::string& note, const char* dash) {
  svg_ += fmt::format(
      "<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#888\" stroke-dasharray=\"{5}\"/>"
      "<text x=\"{3}\" y=\"{4:.1f}\" fill=\"#888\">{6}</text>\n",
      kLeft, y, kLeft + plot_width(), kLeft + 6, y - 4, dash, escape(note));
}

void SvgChart::vline_note(double x, const std::string& note, const char* dash) {
  svg_ += fmt::format(
      "<line x1=\"{0:.1f}\" y1=\"{1}\" x2=\"{0:.1f}\" y2=\"{2}\" stroke=\"#888\" stroke-dasharray=\"{5}\"/>"
      "<text x=\"{3:.1f}\" y=\"{4}\" fill=\"#888\">{6}</text>\n",
      x, kTop, kTop + plot_height(), x + 4, kTop + 14, dash, escape(note));
}

void SvgChart::polyline(const std::vector<std::pair<double, double>>& points, const char* color, double stroke_width) {
  std::string pts;
  for (const auto& [x, y] : points) pts += fmt::format("{:.1f},{:.1f} ", x, y);
  svg_ += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{}\" points=\"{}\"/>\n", color,
                      stroke_width, pts);
}

void SvgChart::marker(double x, double y, double radius, const char* color, const std::string& tooltip) {
  if (tooltip.empty())
    svg_ += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"{}\" fill=\"{}\"/>\n", x, y, radius, color);
  else
    svg_ += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"{}\" fill=\"{}\"><title>{}</title></circle>\n", x, y,
                        radius, color, escape(tooltip));
}

void SvgChart::legend_entry(double x, double y, const char* color, const std::string& label) {
  svg_ += fmt::format(
      "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"2\"/>"
      "<text x=\"{4}\" y=\"{5}\">{6}</text>\n",
      x, y, x + 24, color, x + 30, y + 4, escape(label));
}

std::string SvgChart::finish() {
  svg_ += "</svg>\n";
  return std::move(svg_);
}

}  // namespace mamba3
