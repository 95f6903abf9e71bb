// `mamba3 info FILE.safetensors`: lists the tensors of a safetensors file (names, dtypes, shapes).
#include <cstdio>

#include "commands.h"
#include "io/safetensors.h"

namespace mamba3::cli {

void register_info(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Describe a safetensors file");
  static std::string path;
  cmd->add_option("path", path, "a .safetensors file")->required();
  cmd->callback([] {
    auto file = SafetensorsFile::open(path);
    size_t total = 0;
    for (const auto& name : file.names()) {
      const Tensor& t = file.get(name);
      std::printf("%-48s %-5s %s\n", name.c_str(), std::string(dtype_name(t.dtype())).c_str(),
                  shape_str(t.shape()).c_str());
      total += size_t(t.numel());
    }
    std::printf("%zu tensors, %zu values\n", file.names().size(), total);
  });
}

}  // namespace mamba3::cli
