// retain_freed_heap_memory: a block freed and allocated again at the same size must not fault its pages in again
// (the point of the tuning); without it glibc unmaps blocks above its mmap threshold on free.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>

#include <sys/resource.h>

#include "core/heap_retention.h"

namespace mamba3::test {
namespace {

long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// Page faults of allocating, touching and freeing `bytes`.
long faults_of_cycle(size_t bytes) {
  const long before = minor_faults();
  auto* p = static_cast<char*>(std::malloc(bytes));
  EXPECT_NE(p, nullptr);
  if (p) std::memset(p, 1, bytes);
  std::free(p);
  return minor_faults() - before;
}

TEST(HeapRetention, ReallocatedBlockFaultsNoPagesIn) {
#if !defined(__GLIBC__)
  GTEST_SKIP() << "glibc only";
#elif defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's allocator quarantines freed blocks: glibc's thresholds do not apply";
#endif
  retain_freed_heap_memory();
  const size_t bytes = size_t(16) << 20;  // above glibc's default 128 KiB mmap threshold
  const long first = faults_of_cycle(bytes);  // first touch: the pages fault in (4 KiB or transparent huge pages)
  const long again = faults_of_cycle(bytes);
  ASSERT_GT(first, 0);
  EXPECT_LT(4 * again, first) << "a freed 16 MiB block was returned to the system and faulted in again (" << again
                              << " faults, first time " << first << ")";
}

}  // namespace
}  // namespace mamba3::test
