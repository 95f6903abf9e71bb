// libFuzzer target for the safetensors reader: any byte string must either open cleanly (and then every tensor's
// bytes lie inside the file) or throw mamba3::Error; never crash, hang, leak or read out of bounds.
// Build: cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DMAMBA3_FUZZ=ON && ninja -C build-fuzz fuzz_safetensors
// Run:   build-fuzz/fuzz_safetensors -max_len=4096 corpus_dir/
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"

namespace {

// The reader takes a path (it memory-maps), so each input goes through one scratch file per process.
const std::string& scratch_path() {
  static const std::string path = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir && *dir ? dir : "/tmp") + "/fuzz_safetensors." + std::to_string(::getpid()) + ".bin";
  }();
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = scratch_path();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  try {
    auto file = mamba3::SafetensorsFile::open(path);
    // Touch every byte of every tensor so ASan sees any view that points outside the mapping.
    size_t checksum = 0;
    for (const auto& name : file.names()) {
      const mamba3::Tensor& t = file.get(name);
      if (t.numel() < 0) std::abort();
      const auto* bytes = static_cast<const unsigned char*>(t.raw());
      for (size_t i = 0; i < t.nbytes(); ++i) checksum += bytes[i];
    }
    for (const auto& [k, v] : file.metadata()) checksum += k.size() + v.size();
    volatile size_t sink = checksum;
    (void)sink;
  } catch (const mamba3::Error&) {
    // Malformed input is expected; anything other than mamba3::Error escapes and is reported by libFuzzer.
  }
  std::remove(path.c_str());
  return 0;
}
