#include "support/test_support.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numbers>

namespace mamba3::test {

namespace fs = std::filesystem;

fs::path golden_dir() {
  const char* env = std::getenv("MAMBA3_GOLDEN_DIR");
  return env && *env ? fs::path(env) : fs::path(MAMBA3_DEFAULT_GOLDEN_DIR);
}

std::vector<fs::path> golden_cases(const std::string& prefix) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(golden_dir(), ec)) {
    if (entry.path().filename().string().rfind(prefix, 0) == 0) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<fs::path> golden_mixer_files() {
  auto out = golden_cases("mixer_");
  std::erase_if(out, [](const fs::path& p) { return p.extension() != ".safetensors"; });
  return out;
}

namespace {
std::vector<double> as_f64(const Tensor& t) {
  std::vector<double> v(size_t(t.numel()));
  convert_floats(t.raw(), t.dtype(), v.data(), DType::F64, v.size());
  return v;
}
void require_same_size(const Tensor& a, const Tensor& b) {
  MAMBA3_CHECK(a.numel() == b.numel(), "compare: shapes {} and {} differ", shape_str(a.shape()), shape_str(b.shape()));
}
}  // namespace

double rel_l2(const Tensor& out, const Tensor& ref) {
  require_same_size(out, ref);
  auto o = as_f64(out), r = as_f64(ref);
  double num = 0, den = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    num += (o[i] - r[i]) * (o[i] - r[i]);
    den += r[i] * r[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

double rel_l2_angles(const Tensor& out, const Tensor& ref) {
  require_same_size(out, ref);
  const double two_pi = 2 * std::numbers::pi;
  auto o = as_f64(out), r = as_f64(ref);
  double num = 0, den = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    double d = std::remainder(o[i] - r[i], two_pi);  // in [-π, π]
    double w = r[i] - two_pi * std::floor(r[i] / two_pi);
    num += d * d;
    den += w * w;
  }
  if (std::isnan(num)) return num;
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

double rel_max(const Tensor& out, const Tensor& ref) {
  require_same_size(out, ref);
  auto o = as_f64(out), r = as_f64(ref);
  double num = 0, den = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    double d = std::abs(o[i] - r[i]);
    if (std::isnan(d)) return d;
    num = std::max(num, d);
    den = std::max(den, std::abs(r[i]));
  }
  return num / std::max(den, 1e-300);
}

Tensor random_tensor(std::mt19937& rng, Shape shape, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

}  // namespace mamba3::test
