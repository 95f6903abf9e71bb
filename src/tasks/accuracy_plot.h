#pragma once
// Accuracy against sequence length as a self-contained SVG: one polyline with markers per series (a model or an
// ablation), the chance level as a dashed line and the longest training length as a dotted vertical line. Lengths
// are on a log2 axis (test lengths usually double); the legend sits in the top right corner. Written atomically.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mamba3::tasks {

struct AccuracySeries {
  std::string label;
  std::vector<std::pair<int64_t, double>> points;  // (length, accuracy in [0, 1])
};

std::string accuracy_plot_svg(const std::vector<AccuracySeries>& series, const std::string& title, double chance,
                              int64_t train_max);
void write_accuracy_plot(const std::string& path, const std::vector<AccuracySeries>& series, const std::string& title,
                         double chance, int64_t train_max);

}  // namespace mamba3::tasks
