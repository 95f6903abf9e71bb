#include "core/heap_retention.h"

#include <climits>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace mamba3 {

void retain_freed_heap_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
#endif
}

}  // namespace mamba3
