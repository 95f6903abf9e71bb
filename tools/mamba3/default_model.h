#pragma once
// Where the embedded default model (models/default) is when `generate` or `eval` get no -m: in order,
//   1. $MAMBA3_MODEL_DIR (when set it is the answer, even if it is not a model directory: a typo must not fall
//      back silently to another model);
//   2. models/default in the folders above the running executable (/proc/self/exe), e.g. build/tools/mamba3/mamba3
//      inside a clone finds <clone>/models/default, wherever the command is run from;
//   3. models/default beside this source file's repository, as compiled (__FILE__), for an executable copied away.
// A model directory is one with config.json. Throws naming every place looked at when none has one.
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "core/error.h"

namespace mamba3::cli {

inline std::string find_default_model() {
  namespace fs = std::filesystem;
  const auto is_model = [](const fs::path& p) {
    std::error_code ec;
    return fs::is_regular_file(p / "config.json", ec);
  };
  if (const char* env = std::getenv("MAMBA3_MODEL_DIR"); env != nullptr && *env != '\0') {
    MAMBA3_CHECK(is_model(env), "MAMBA3_MODEL_DIR={} is not a model directory (no config.json there)", env);
    return env;
  }
  std::vector<std::string> looked;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path dir = exe.parent_path(); !dir.empty(); dir = dir.parent_path()) {
      const fs::path candidate = dir / "models" / "default";
      if (is_model(candidate)) return candidate.string();
      looked.push_back(candidate.string());
      if (dir == dir.root_path()) break;
    }
  }
  // This header sits at <repository>/tools/mamba3/default_model.h.
  const fs::path source_repo = fs::path(__FILE__).parent_path().parent_path().parent_path();
  const fs::path compiled = source_repo / "models" / "default";
  if (is_model(compiled)) return compiled.string();
  looked.push_back(compiled.string());
  std::string where;
  for (const std::string& p : looked) where += "\n  " + p;
  fail("no model given (-m DIR) and no default model found: set MAMBA3_MODEL_DIR or pass -m; looked in:{}", where);
}

}  // namespace mamba3::cli
