// What programmatic dependent launch saves at a kernel boundary on this GPU: a chain of dependent kernels (each reads
// the buffer the one before wrote) launched plainly, with the PDL attribute and griddepcontrol.wait at the top of
// every block, and with both that and griddepcontrol.launch_dependents right after the wait. Shapes like the training
// step's: a streaming kernel of a few waves at three sizes, and a core-like kernel of many blocks with large shared
// memory. The training step has ~500 kernel boundaries, so a microsecond per boundary is ~0.5 ms of a 40 ms step.
// Usage: bench_pdl_chain [launches per chain]   (a table on stdout; needs a Hopper device)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "bench_cuda_check.h"

namespace {

enum Mode { kPlain, kWait, kWaitTrigger, kModes };

__device__ __forceinline__ void wait_and_trigger(int mode) {
  if (mode != kPlain) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (mode == kWaitTrigger) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// out = in · 1.0001 + 1 over n float4s, grid-stride.
__global__ void stream_kernel(const float4* in, float4* out, long n, int mode) {
  wait_and_trigger(mode);
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x) {
    float4 v = in[i];
    v.x = v.x * 1.0001f + 1.f, v.y = v.y * 1.0001f + 1.f, v.z = v.z * 1.0001f + 1.f, v.w = v.w * 1.0001f + 1.f;
    out[i] = v;
  }
}

// A block per 16 KB tile staged through 64 KB of shared memory (three blocks per SM), as the chunk cores hold theirs.
__global__ void core_like_kernel(const float4* in, float4* out, int mode) {
  extern __shared__ float4 tile[];
  wait_and_trigger(mode);
  const long base = long(blockIdx.x) * 1024;
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) tile[i] = in[base + i];
  __syncthreads();
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) {
    float4 v = tile[1023 - i];
    v.x += 1.f;
    out[base + i] = v;
  }
}

struct Shape {
  const char* name;
  bool core;
  long float4s;  // per buffer
  int blocks, threads, shared;
};

template <typename Kernel, typename... Args>
void launch(Kernel kernel, const Shape& sh, int mode, cudaStream_t s, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(sh.blocks);
  config.blockDim = dim3(sh.threads);
  config.dynamicSmemBytes = sh.shared;
  config.stream = s;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = mode != kPlain;
  config.attrs = attribute;
  config.numAttrs = 1;
  BENCH_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

}  // namespace

int main(int argc, char** argv) {
  const int chain = argc > 1 ? std::atoi(argv[1]) : 200;
  if (chain < 2) {
    std::fprintf(stderr, "bench_pdl_chain: launches per chain must be ≥ 2\n");
    return 2;
  }
  int sms = 0;
  BENCH_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  BENCH_CUDA_CHECK(cudaFuncSetAttribute(core_like_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
  const Shape shapes[] = {
      {"stream 0.5 MB, 1 wave", false, (1L << 19) / 16, sms, 256, 0},
      {"stream 8 MB, 4 blocks/SM", false, (8L << 20) / 16, 4 * sms, 256, 0},
      {"stream 64 MB, 4 blocks/SM", false, (64L << 20) / 16, 4 * sms, 256, 0},
      {"core-like 6144 × 16 KB (96 MB)", true, 6144L * 1024, 6144, 128, 64 * 1024},
      {"core-like 264 × 16 KB (4 MB)", true, 264L * 1024, 264, 128, 64 * 1024},
  };
  long most = 0;
  for (const Shape& sh : shapes) most = std::max(most, sh.float4s);
  float4 *a = nullptr, *b = nullptr;
  BENCH_CUDA_CHECK(cudaMalloc(&a, most * 16));
  BENCH_CUDA_CHECK(cudaMalloc(&b, most * 16));
  BENCH_CUDA_CHECK(cudaMemset(a, 0, most * 16));
  BENCH_CUDA_CHECK(cudaMemset(b, 0, most * 16));
  cudaStream_t s;
  BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t t0, t1;
  BENCH_CUDA_CHECK(cudaEventCreate(&t0));
  BENCH_CUDA_CHECK(cudaEventCreate(&t1));
  std::printf("%d launches per chain, best of 7; µs per launch\n", chain);
  std::printf("%-34s %10s %10s %12s %10s %12s\n", "kernel", "plain", "PDL wait", "saved/launch", "PDL w+t",
              "saved/launch");
  for (const Shape& sh : shapes) {
    float best[kModes];
    for (int mode = 0; mode < kModes; ++mode) {
      best[mode] = 1e30f;
      for (int rep = 0; rep < 8; ++rep) {
        BENCH_CUDA_CHECK(cudaEventRecord(t0, s));
        for (int i = 0; i < chain; ++i) {
          const float4* in = i % 2 ? b : a;
          float4* out = i % 2 ? a : b;
          if (sh.core)
            launch(core_like_kernel, sh, mode, s, in, out, mode);
          else
            launch(stream_kernel, sh, mode, s, in, out, sh.float4s, mode);
        }
        BENCH_CUDA_CHECK(cudaEventRecord(t1, s));
        BENCH_CUDA_CHECK(cudaEventSynchronize(t1));
        float ms = 0;
        BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
        if (rep > 0) best[mode] = std::min(best[mode], ms * 1000.f / chain);  // rep 0 warms up
      }
    }
    std::printf("%-34s %10.2f %10.2f %12.2f %10.2f %12.2f\n", sh.name, best[kPlain], best[kWait],
                best[kPlain] - best[kWait], best[kWaitTrigger], best[kPlain] - best[kWaitTrigger]);
  }
  BENCH_CUDA_CHECK(cudaGetLastError());
  return 0;
}
