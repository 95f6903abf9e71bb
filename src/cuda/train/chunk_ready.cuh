#pragma once
// Per-chunk readiness counters between a kernel that produces chunks in order and a kernel launched beside it that
// reads them (BatchedParams::chain_ready: the reverse chain's dH for the fused core). The producer's block raises a
// chunk's counter once every thread's stores of that chunk are behind a block barrier; the reader's thread 0 waits
// for the counter and the block passes a barrier before any thread reads the chunk. The counters only grow (the
// caller counts launches), so nothing is reset between launches.
#include <cstdint>

namespace mamba3::cuda::train_detail {

// By one thread, after a block barrier that follows the block's stores of the chunk: those stores are visible to a
// reader that sees the new count (release at GPU scope, cumulative over what the barrier ordered).
__device__ __forceinline__ void chunk_ready_publish(unsigned* counter) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}

// By one thread, before a block barrier after which the block reads the chunk: waits until the counter reaches
// `target` (wrap-safe comparison). A producer that never gets there is a bug, not a state to wait out: after ~10 s the
// kernel traps (the launch fails with an error) instead of hanging the process.
__device__ __forceinline__ void chunk_ready_wait(const unsigned* counter, unsigned target) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
  if (int(v - target) >= 0) return;
  uint64_t start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    __nanosleep(200);
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
    if (int(v - target) >= 0) return;
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > 10'000'000'000ull) __trap();
  }
}

}  // namespace mamba3::cuda::train_detail
