#include "ops/blas_kernels.h"

#include <cstdlib>
#include <initializer_list>
#include <strings.h>
#include <unistd.h>

extern "C" char* openblas_get_corename(void);

namespace mamba3 {

const char* blas_core_to_force() {
#if defined(__linux__) && defined(__x86_64__)
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return nullptr;
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return nullptr;
  const char* core = openblas_get_corename();
  // Cores whose kernels use AVX2 or better: OpenBLAS's own choice stands.
  for (const char* good : {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids", "Excavator", "Steamroller"})
    if (core != nullptr && strcasecmp(core, good) == 0) return nullptr;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? "SkylakeX" : "Haswell";
#else
  return nullptr;
#endif
}

void reexec_with_blas_core(char** argv) {
  const char* core = blas_core_to_force();
  if (core == nullptr || argv == nullptr || argv[0] == nullptr) return;
  if (setenv("OPENBLAS_CORETYPE", core, 1) != 0) return;
  execv("/proc/self/exe", argv);
  execvp(argv[0], argv);          // no /proc: the path this program was started by
  unsetenv("OPENBLAS_CORETYPE");  // both failed: carry on with OpenBLAS's own kernels
}

}  // namespace mamba3
