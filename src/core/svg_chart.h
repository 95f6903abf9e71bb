#pragma once
// A line chart as a self-contained SVG page (800 × 480), shared by the training loss curve and the task accuracy
// plots: the title, a framed plot area, grid lines with labels, axis titles, polylines, point markers and legend
// entries. Callers map their data to pixels with the plot area's geometry (left(), top(), plot_width(),
// plot_height()); every text is XML-escaped here.
#include <string>
#include <utility>
#include <vector>

namespace mamba3 {

class SvgChart {
 public:
  explicit SvgChart(const std::string& title);

  static constexpr double kWidth = 800, kHeight = 480;
  double left() const { return kLeft; }
  double top() const { return kTop; }
  double plot_width() const { return kWidth - kLeft - kRight; }
  double plot_height() const { return kHeight - kTop - kBottom; }

  void frame();                                                   // the plot area's border
  void message(const std::string& text);                          // centred text (a chart with no data)
  void hgrid(double y, const std::string& label);                 // grid line across the plot area, label at the left
  void vgrid(double x, const std::string& label, const char* stroke = "#ddd");  // grid line up the area, label below
  void axis_titles(const std::string& x_title, const std::string& y_title);
  // A dashed line across (horizontal at y) or up (vertical at x) the plot area with a grey note.
  void hline_note(double y, const std::string& note, const char* dash);
  void vline_note(double x, const std::string& note, const char* dash);
  void polyline(const std::vector<std::pair<double, double>>& points, const char* color, double stroke_width);
  // A filled circle; a non-empty tooltip becomes its <title>.
  void marker(double x, double y, double radius, const char* color, const std::string& tooltip = {});
  void legend_entry(double x, double y, const char* color, const std::string& label);
  std::string finish();  // the page, closed

  static std::string escape(const std::string& s);

 private:
  static constexpr double kLeft = 70, kRight = 20, kTop = 40, kBottom = 50;
  std::string svg_;
};

}  // namespace mamba3
