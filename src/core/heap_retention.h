#pragma once
// A training step (and a prefill) allocates its activations anew each time. glibc returns freed blocks above its
// thresholds to the operating system and faults fresh zeroed pages in on the next allocation of the same size: a 10M
// model's CPU training took 1.7 M page faults per 8 steps, 16 % of its time. Raising both thresholds keeps freed
// heap memory for reuse (resident memory then stays at the run's peak, which it reaches on every step anyway).

namespace mamba3 {

// mmap threshold 32 MiB (glibc's maximum) and trim threshold 2 GiB; a no-op outside glibc.
void retain_freed_heap_memory();

}  // namespace mamba3
