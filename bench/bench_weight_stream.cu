// How fast can a decode step's weights stream into shared memory, and what does a product boundary cost? The 1.5B
// model's b128 step spends ≈ 1.55 ms on its 96 layer products (2.46 GB of bf16 weights: 54 % of the copy bandwidth on
// an H100) while its state kernels stream at 95 % (docs/kernels/stream_gemm.md, "Forty-first session"). This program
// moves weights the way the stream GEMM does, without the arithmetic, to separate two suspects:
//  1. the access pattern: boxes of 128 rows × 128 bytes from a row-major matrix (each weight row visited once per
//     k-block) against contiguous chunks (a weight layout stored tile by tile), on one long product (the lm_head);
//  2. the boundary: a layer's four products as four kernels under programmatic dependent launch (the first stages
//     requested before the wait, an epilogue writing each tile's f32 part, as the stream GEMM does) against one
//     persistent kernel per layer whose blocks wait at a grid barrier between products while their next product's
//     first stages already stream; each with whole tiles per block (the stream GEMM's unsplit grid) or with every
//     block taking an equal share of (tile, k-block) units (stream-K).
// One block per SM: a producer lane issues the copies into a ring of stages, a consumer warp waits for each stage and
// releases it. Usage: bench_weight_stream [replays]   (tables on stdout; needs a Hopper device)
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_cuda_check.h"
#include "cuda/bulk_copy.cuh"

namespace {

using namespace mamba3::cuda;

constexpr int kMaxSegments = 4;
constexpr int kRingBytes = 192 * 1024;
constexpr int kThreads = 64;           // warp 0: the producer (lane 0); warp 1: the consumer
constexpr int kEpilogueCols = 128;     // a tile's part: tile rows × 128 batch rows of f32
constexpr int kXBoxBytes = 128 * 128;  // 128 batch rows × 64 bf16 columns

enum Assign { kTiles = 0, kBalanced = 1, kContiguous = 2 };

// One launch: up to four products ("segments") in order, each a (rows × k) bf16 matrix read as tiles of box_rows
// rows and k-blocks of `boxes` 64-column boxes (kTiles, kBalanced), or as contiguous chunks of stage_bytes
// (kContiguous, from base).
struct Launch {
  CUtensorMap map[kMaxSegments];
  CUtensorMap xmap[kMaxSegments];  // with_x: the 128 activation rows (128 × k bf16, L2-resident), one box per stage
  const char* base[kMaxSegments];
  int tiles[kMaxSegments], kblocks[kMaxSegments];
  long chunks[kMaxSegments];
  int segments, assign, box_rows, boxes, stage_bytes, stages;
  int with_x;         // 1: each stage also loads the k-block's 128 × 64 x box (16 KB), as the wide class does
  int epilogue;       // 1: write each finished tile's part (tile rows × 128 f32) to out
  float* out;         // ≥ tile rows × 128 floats per block
  unsigned* barrier;  // this launch's grid-barrier counters (one per segment boundary), zero before it
  int pdl_prefill;    // 1: the first `stages` copies before griddepcontrol.wait (separate kernels under PDL)
};

__device__ __forceinline__ void bulk_1d(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// The units block b takes of segment j: [first, last) in the segment's unit order (tile-major, k-blocks inner) for
// kBalanced and kContiguous; kTiles takes tiles b, b + G, … whole, enumerated by index below.
struct Range {
  long first, last;
};
__device__ __forceinline__ long units_of(const Launch& p, int j) {
  return p.assign == kContiguous ? p.chunks[j] : long(p.tiles[j]) * p.kblocks[j];
}
__device__ __forceinline__ Range range_of(const Launch& p, int j, int b, int g) {
  if (p.assign == kTiles) {
    const long mine = b < p.tiles[j] ? (p.tiles[j] - 1 - b) / g + 1 : 0;
    return {0, mine * p.kblocks[j]};
  }
  const long u = units_of(p, j);
  return {u * b / g, u * (b + 1) / g};
}
// Unit i (i in the block's range) → (tile, k-block).
__device__ __forceinline__ void unit_at(const Launch& p, int j, int b, int g, long i, int& tile, int& kb) {
  if (p.assign == kTiles) {
    tile = b + int(i / p.kblocks[j]) * g;
    kb = int(i % p.kblocks[j]);
  } else {
    tile = int(i / p.kblocks[j]);
    kb = int(i % p.kblocks[j]);
  }
}

__global__ void __launch_bounds__(kThreads, 1) stream_kernel(const __grid_constant__ Launch p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* ring = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + p.stages * p.stage_bytes);
  uint64_t* empty = full + p.stages;
  const int b = blockIdx.x, g = gridDim.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < p.stages; ++s) mbar_init(&full[s]), mbar_init(&empty[s]);
    mbar_init_fence();
  }
  __syncthreads();
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (warp == 0) {
    if (lane == 0) {
      long issued = 0;  // copies over all segments: stage issued % stages, phase issued / stages
      for (int j = 0; j < p.segments; ++j) {
        const Range r = range_of(p, j, b, g);
        for (long i = r.first; i < r.last; ++i, ++issued) {
          if (p.pdl_prefill && issued == p.stages) asm volatile("griddepcontrol.wait;" ::: "memory");
          const int s = int(issued % p.stages);
          if (issued >= p.stages) mbar_wait(&empty[s], unsigned((issued / p.stages - 1) & 1));
          expect_bytes(&full[s], unsigned(p.stage_bytes));
          uint8_t* dst = ring + size_t(s) * p.stage_bytes;
          if (p.assign == kContiguous) {
            bulk_1d(dst, p.base[j] + size_t(i) * p.stage_bytes, unsigned(p.stage_bytes), &full[s]);
          } else {
            int tile, kb;
            unit_at(p, j, b, g, i, tile, kb);
            const int w_bytes = p.stage_bytes - (p.with_x ? kXBoxBytes : 0);
            for (int x = 0; x < p.boxes; ++x)
              tma_load_2d(dst + x * (w_bytes / p.boxes), &p.map[j], (kb * p.boxes + x) * 64, tile * p.box_rows,
                          &full[s]);
            if (p.with_x) tma_load_2d(dst + w_bytes, &p.xmap[j], kb * 64, 0, &full[s]);
          }
        }
      }
      if (p.pdl_prefill && issued < p.stages) asm volatile("griddepcontrol.wait;" ::: "memory");
    }
    return;
  }
  // Consumer warp.
  if (p.pdl_prefill) asm volatile("griddepcontrol.wait;" ::: "memory");
  long taken = 0;
  for (int j = 0; j < p.segments; ++j) {
    if (j > 0) {  // the grid barrier: every block's part of segment j - 1 is written
      if (lane == 0) {
        volatile unsigned* count = p.barrier + (j - 1);
        while (*count < unsigned(g)) {
        }
      }
      __syncwarp();
    }
    const Range r = range_of(p, j, b, g);
    for (long i = r.first; i < r.last; ++i, ++taken) {
      const int s = int(taken % p.stages);
      mbar_wait(&full[s], unsigned((taken / p.stages) & 1));
      __syncwarp();
      if (lane == 0) arrive(&empty[s]);
      if (!p.epilogue || p.assign == kContiguous) continue;
      // A tile's part is written when the block leaves the tile (its last unit here).
      int tile, kb, next_tile = -1, next_kb;
      unit_at(p, j, b, g, i, tile, kb);
      if (i + 1 < r.last) unit_at(p, j, b, g, i + 1, next_tile, next_kb);
      if (next_tile != tile) {
        float4* dst = reinterpret_cast<float4*>(p.out + size_t(b) * p.box_rows * kEpilogueCols);
        const float4 v = make_float4(float(tile), float(j), 0.f, 1.f);
        for (int e = lane; e < p.box_rows * kEpilogueCols / 4; e += 32) dst[e] = v;
      }
    }
    if (j + 1 < p.segments) {
      __syncwarp();
      if (lane == 0) {
        __threadfence();
        atomicAdd(p.barrier + j, 1u);
      }
    }
  }
}

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status{};
  BENCH_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status));
  if (status != cudaDriverEntryPointSuccess || !fn) {
    std::fprintf(stderr, "bench_weight_stream: the driver has no cuTensorMapEncodeTiled\n");
    std::exit(1);
  }
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
}

// A rows × k bf16 row-major matrix in boxes of box_rows × 64 columns, 128-byte swizzled (the stream GEMM's map).
CUtensorMap tensor_map(const void* base, long rows, long k, int box_rows) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cuuint64_t(k), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(k) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides,
                                    box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "bench_weight_stream: cuTensorMapEncodeTiled failed (%d)\n", int(r));
    std::exit(1);
  }
  return map;
}

struct Matrix {
  long rows, k;
};

struct Device {
  int sms = 0;
  cudaStream_t stream = nullptr;
  float* out = nullptr;
  unsigned* barriers = nullptr;
  size_t barrier_slots = 0;
};

size_t smem_bytes(const Launch& p) { return size_t(p.stages) * p.stage_bytes + 1024 + 2 * 8 * p.stages; }

void enqueue(const Device& d, const Launch& p, bool pdl) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(d.sms));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem_bytes(p);
  config.stream = d.stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  config.attrs = &attribute;
  config.numAttrs = 1;
  BENCH_CUDA_CHECK(cudaLaunchKernelEx(&config, stream_kernel, p));
}

// Times `replays` replays of a graph built by `build` (which enqueues on d.stream); ms per replay.
template <class Build>
double time_graph(const Device& d, int replays, Build build) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  BENCH_CUDA_CHECK(cudaStreamBeginCapture(d.stream, cudaStreamCaptureModeThreadLocal));
  build();
  BENCH_CUDA_CHECK(cudaStreamEndCapture(d.stream, &graph));
  BENCH_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  BENCH_CUDA_CHECK(cudaGraphLaunch(exec, d.stream));  // warm-up
  BENCH_CUDA_CHECK(cudaStreamSynchronize(d.stream));
  cudaEvent_t start, stop;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&stop));
  BENCH_CUDA_CHECK(cudaEventRecord(start, d.stream));
  for (int r = 0; r < replays; ++r) BENCH_CUDA_CHECK(cudaGraphLaunch(exec, d.stream));
  BENCH_CUDA_CHECK(cudaEventRecord(stop, d.stream));
  BENCH_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  BENCH_CUDA_CHECK(cudaGetLastError());
  BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
  BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(stop));
  return ms / replays;
}

Launch base_launch(const Device& d, int assign, int box_rows, int boxes, bool with_x = false) {
  Launch p{};
  p.assign = assign;
  p.box_rows = box_rows;
  p.boxes = boxes;
  p.with_x = with_x;
  p.stage_bytes = box_rows * 128 * boxes + (with_x ? kXBoxBytes : 0);
  // 12 stages of 16 KB, or the ring's 192 KB (the stream GEMM's wide class: 7 stages of 16 + 16 KB in 227 KB)
  p.stages = std::min(12, kRingBytes / p.stage_bytes);
  p.out = d.out;
  return p;
}
const void* g_x = nullptr;  // 128 × 4096 bf16 activation rows (with_x)
void add_segment(Launch& p, const void* w, const Matrix& m) {
  const int j = p.segments++;
  if (p.with_x) p.xmap[j] = tensor_map(g_x, 128, m.k, 128);
  p.base[j] = static_cast<const char*>(w);
  if (p.assign == kContiguous) {
    p.chunks[j] = long(m.rows) * m.k * 2 / p.stage_bytes;
  } else {
    p.map[j] = tensor_map(w, m.rows, m.k, p.box_rows);
    p.tiles[j] = int((m.rows + p.box_rows - 1) / p.box_rows);
    p.kblocks[j] = int((m.k + 64 * p.boxes - 1) / (64 * p.boxes));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int replays = argc > 1 ? std::max(1, std::atoi(argv[1])) : 20;
  Device d;
  cudaDeviceProp prop{};
  BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  if (prop.major != 9) {
    std::fprintf(stderr, "bench_weight_stream: needs a Hopper device (found %s, cc %d.%d)\n", prop.name, prop.major,
                 prop.minor);
    return 1;
  }
  d.sms = prop.multiProcessorCount;
  BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
  BENCH_CUDA_CHECK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRingBytes + 2048));
  BENCH_CUDA_CHECK(cudaMalloc(&d.out, size_t(d.sms) * 256 * kEpilogueCols * 4));
  constexpr int kLayers = 24;
  d.barrier_slots = kLayers * kMaxSegments;
  BENCH_CUDA_CHECK(cudaMalloc(&d.barriers, d.barrier_slots * 4));

  // The copy bandwidth (read + write bytes), as `mamba3 bench` reports it.
  const size_t copy_bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  BENCH_CUDA_CHECK(cudaMalloc(&src, copy_bytes));
  BENCH_CUDA_CHECK(cudaMalloc(&dst, copy_bytes));
  BENCH_CUDA_CHECK(cudaMemset(src, 1, copy_bytes));
  const double copy_ms = time_graph(
      d, 10, [&] { BENCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, d.stream)); });
  const double copy_gbs = 2.0 * copy_bytes / copy_ms / 1e6;
  BENCH_CUDA_CHECK(cudaFree(src));
  BENCH_CUDA_CHECK(cudaFree(dst));
  std::printf("%s, %d SMs: device-to-device copy %.0f GB/s (read + write)\n", prop.name, d.sms, copy_gbs);

  void* x_rows = nullptr;
  BENCH_CUDA_CHECK(cudaMalloc(&x_rows, size_t(128) * 4096 * 2));
  BENCH_CUDA_CHECK(cudaMemset(x_rows, 0, size_t(128) * 4096 * 2));
  g_x = x_rows;

  // 1. One long product's weights (the 1.5B lm_head, 128256 × 2048 bf16), 1 block per SM.
  const Matrix head{128256, 2048};
  const size_t head_bytes = size_t(head.rows) * head.k * 2;
  void* w_head = nullptr;
  BENCH_CUDA_CHECK(cudaMalloc(&w_head, head_bytes));
  BENCH_CUDA_CHECK(cudaMemset(w_head, 0, head_bytes));
  std::printf("\n1. %.0f MB of weights (%ld × %ld bf16) into shared memory, one launch, µs and GB/s (%% of copy)\n",
              head_bytes / 1e6, head.rows, head.k);
  struct Pattern {
    const char* what;
    int assign, box_rows, boxes;
    bool with_x = false;
  };
  const Pattern patterns[] = {
      {"boxes 128 rows x 128 B, whole tiles (the wide class)", kTiles, 128, 1},
      {"boxes 128 rows x 128 B, balanced units", kBalanced, 128, 1},
      {"boxes 128 rows x 256 B (2 per stage), whole tiles", kTiles, 128, 2},
      {"boxes 256 rows x 128 B, whole tiles", kTiles, 256, 1},
      {"boxes 64 rows x 512 B (4 per stage), whole tiles", kTiles, 64, 4},
      {"contiguous chunks of 16 KB", kContiguous, 128, 1},
      {"contiguous chunks of 32 KB", kContiguous, 128, 2},
      {"boxes 128 rows x 128 B + x box, whole tiles (6 stages)", kTiles, 128, 1, true},
      {"boxes 128 rows x 128 B + x box, balanced units (6 stages)", kBalanced, 128, 1, true},
  };
  for (const Pattern& pat : patterns) {
    Launch p = base_launch(d, pat.assign, pat.box_rows, pat.boxes, pat.with_x);
    add_segment(p, w_head, head);
    const double ms = time_graph(d, replays,
                                 [&] {
                                   for (int r = 0; r < 4; ++r) enqueue(d, p, false);
                                 }) /
                      4;
    std::printf("  %-56s %8.1f µs %7.0f GB/s (%3.0f %%)\n", pat.what, ms * 1e3, head_bytes / ms / 1e6,
                100.0 * head_bytes / ms / 1e6 / copy_gbs);
  }
  BENCH_CUDA_CHECK(cudaFree(w_head));

  // 2. 24 layers of four products (in_proj, out_proj, fc1, fc2 of the 1.5B SISO model), every layer its own weights.
  const Matrix layer[4] = {{8672, 2048}, {2048, 4096}, {8192, 2048}, {2048, 4096}};
  size_t layer_bytes = 0;
  for (const Matrix& m : layer) layer_bytes += size_t(m.rows) * m.k * 2;
  std::vector<char*> weights(kLayers * 4);
  for (int l = 0; l < kLayers; ++l)
    for (int j = 0; j < 4; ++j) {
      const size_t bytes = size_t(layer[j].rows) * layer[j].k * 2;
      BENCH_CUDA_CHECK(cudaMalloc(&weights[l * 4 + j], bytes));
      BENCH_CUDA_CHECK(cudaMemset(weights[l * 4 + j], 0, bytes));
    }
  const double total = double(layer_bytes) * kLayers;
  std::printf(
      "\n2. %d layers × 4 products (%.1f MB per layer), ms per 24 layers and GB/s (%% of copy); 128-row boxes "
      "of 128 B\n",
      kLayers, layer_bytes / 1e6);
  struct Chain {
    const char* what;
    int assign;
    bool persistent, epilogue, with_x = false;
  };
  const Chain chains[] = {
      {"4 kernels per layer under PDL, whole tiles, epilogue", kTiles, false, true},
      {"4 kernels per layer under PDL, whole tiles, no epilogue", kTiles, false, false},
      {"4 kernels per layer under PDL, balanced units, epilogue", kBalanced, false, true},
      {"4 kernels per layer under PDL, balanced units, no epilogue", kBalanced, false, false},
      {"4 kernels per layer under PDL, balanced units, no epilogue, x", kBalanced, false, false, true},
      {"4 kernels per layer under PDL, balanced units, epilogue, x", kBalanced, false, true, true},
      {"1 kernel per layer, grid barriers, whole tiles, epilogue", kTiles, true, true},
      {"1 kernel per layer, grid barriers, balanced units, epilogue", kBalanced, true, true},
      {"1 kernel per layer, grid barriers, balanced units, no epilogue", kBalanced, true, false},
  };
  for (const Chain& c : chains) {
    const double ms = time_graph(d, std::max(1, replays / 4), [&] {
      BENCH_CUDA_CHECK(cudaMemsetAsync(d.barriers, 0, d.barrier_slots * 4, d.stream));
      for (int l = 0; l < kLayers; ++l) {
        if (c.persistent) {
          Launch p = base_launch(d, c.assign, 128, 1, c.with_x);
          p.epilogue = c.epilogue;
          p.pdl_prefill = 1;
          p.barrier = d.barriers + l * kMaxSegments;
          for (int j = 0; j < 4; ++j) add_segment(p, weights[l * 4 + j], layer[j]);
          enqueue(d, p, true);
        } else {
          for (int j = 0; j < 4; ++j) {
            Launch p = base_launch(d, c.assign, 128, 1, c.with_x);
            p.epilogue = c.epilogue;
            p.pdl_prefill = 1;
            add_segment(p, weights[l * 4 + j], layer[j]);
            enqueue(d, p, true);
          }
        }
      }
    });
    std::printf("  %-60s %7.3f ms %7.0f GB/s (%3.0f %%)\n", c.what, ms, total / ms / 1e6,
                100.0 * total / ms / 1e6 / copy_gbs);
  }
  for (char* w : weights) BENCH_CUDA_CHECK(cudaFree(w));
  BENCH_CUDA_CHECK(cudaFree(d.out));
  BENCH_CUDA_CHECK(cudaFree(d.barriers));
  return 0;
}
