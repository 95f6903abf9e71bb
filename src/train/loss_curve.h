#pragma once
// The loss curve as a self-contained SVG: training loss per step (a polyline) and validation loss (points joined
// by a second polyline), with axes, tick labels and a legend. Written atomically.
#include <string>
#include <vector>

#include "train/trainer.h"

namespace mamba3 {

std::string loss_curve_svg(const std::vector<StepRecord>& records, const std::string& title);
void write_loss_curve(const std::string& path, const std::vector<StepRecord>& records, const std::string& title);

}  // namespace mamba3
