#!/usr/bin/env python3
"""Timing-only diagnostic build: a timeline of every stream GEMM block in one decode step (never commit the result).

Patches src/cuda/stream_gemm.cu (each block of the stream GEMM kernel stamps %globaltimer when it starts, when its
producer's griddepcontrol.wait returns — the previous kernel done —, when its first stage is ready, after its last
stage's products and at the end of its epilogue, with its SM, tile shape and grid) and tools/mamba3/bench_cuda.cpp
(with MAMBA3_TIMELINE=path, `mamba3 bench --device cuda` records one replayed step per batch after the warm-up and
writes path.b<batch>, one line per block). scripts/stream_gemm_timeline.py summarises the files.
Usage: python3 scripts/stream_gemm_timeline_patch.py; build (BUNDLE_BINS=mamba3 BUNDLE_OUT=gpu-bundle/tl.tar.xz
scripts/gpu_bundle.sh); then `git checkout src/cuda/stream_gemm.cu tools/mamba3/bench_cuda.cpp`.
"""
from source_patch import patch_file


def patch(rel, pairs):
    patch_file(rel, pairs, 'stream_gemm_timeline_patch.py')


patch('src/cuda/stream_gemm.cu', [
    ('#include <string>\n', '#include <cstdio>\n#include <string>\n'),
    ('namespace mamba3::cuda {\nnamespace {\n', '''namespace mamba3::cuda {
constexpr int kTlMax = 40000;
__device__ unsigned long long g_tl[kTlMax][16];
__device__ unsigned g_tl_slot;
__device__ unsigned g_tl_arm;
__device__ unsigned g_tl_noearly;
__device__ __forceinline__ unsigned long long tl_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned tl_smid() {
  unsigned r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return r;
}
void timeline_arm(bool on) {
  const unsigned v = on ? 1u : 0u, zero = 0;
  cudaMemcpyToSymbol(g_tl_arm, &v, 4);
  if (on) cudaMemcpyToSymbol(g_tl_slot, &zero, 4);
  const char* ne = std::getenv("MAMBA3_TL_NOEARLY");
  const unsigned noearly = ne && ne[0] == '1' ? 1u : 0u;
  cudaMemcpyToSymbol(g_tl_noearly, &noearly, 4);
}
void timeline_dump(const char* path) {
  unsigned n = 0;
  cudaMemcpyFromSymbol(&n, g_tl_slot, 4);
  if (n > kTlMax) n = kTlMax;
  static unsigned long long rec[kTlMax][16];
  cudaMemcpyFromSymbol(rec, g_tl, sizeof(unsigned long long) * 16 * n);
  FILE* f = std::fopen(path, "w");
  for (unsigned i = 0; i < n; ++i) {
    for (int j = 0; j < 16; ++j) std::fprintf(f, "%llu ", rec[i][j]);
    std::fprintf(f, "\\n");
  }
  std::fclose(f);
}
namespace {
'''),
    ('''  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < F::kStages; ++s) {
      mbar_init_count(&full[s], 1);
      mbar_init_count(&empty[s], kConsumers / 32);  // every consumer warp releases it''', '''  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ int tl_slot_s;
  if (threadIdx.x == 0) {
    const unsigned long long t0 = tl_now();
    int slot = -1;
    if (g_tl_arm) {
      slot = int(atomicAdd(&g_tl_slot, 1u));
      if (slot >= kTlMax) slot = -1;
    }
    tl_slot_s = slot;
    if (slot >= 0) {
      g_tl[slot][0] = t0;
      g_tl[slot][5] = (unsigned long long)(unsigned)n | ((unsigned long long)(unsigned)kblocks << 32);
      g_tl[slot][6] = (unsigned long long)blockIdx.x | ((unsigned long long)gridDim.x << 32);
      g_tl[slot][7] = (unsigned long long)tl_smid() | ((unsigned long long)(unsigned)split << 32) |
                      ((unsigned long long)(unsigned)m << 48);
    }
    for (int s = 0; s < F::kStages; ++s) {
      mbar_init_count(&full[s], 1);
      mbar_init_count(&empty[s], kConsumers / 32);  // every consumer warp releases it'''),
    ('''      const int early = count < F::kStages ? count : F::kStages;''', '''      const int early = g_tl_noearly ? 0 : count < F::kStages ? count : F::kStages;'''),
    ('''      pdl_wait();
      for (int i = 0; i < early; ++i) load_x(i, k_of(i));''', '''      pdl_wait();
      if (tl_slot_s >= 0) g_tl[tl_slot_s][1] = tl_now();
      for (int i = 0; i < early; ++i) load_x(i, k_of(i));'''),
    ('''    pdl_wait();  // every lane: the epilogue below writes the outputs
    __syncwarp();''', '''    pdl_wait();  // every lane: the epilogue below writes the outputs
    __syncwarp();
    if (lane == 0 && tl_slot_s >= 0) g_tl[tl_slot_s][8] = tl_now();'''),
    ('''        if (lane == 0 && tile * F::kTileRows < n) fold.partials_out[tile * kFoldRows + c] = sq;  // not a padding tile
      }
    }
    __syncwarp();  // lanes reconverged after their stores (the barrier below is .aligned)''', '''        if (lane == 0 && tile * F::kTileRows < n) fold.partials_out[tile * kFoldRows + c] = sq;  // not a padding tile
      }
      if (threadIdx.x == 0 && tl_slot_s >= 0 && (c - rows.begin) / kWarps < 3)
        g_tl[tl_slot_s][12 + (c - rows.begin) / kWarps] = tl_now();
    }
    __syncwarp();  // lanes reconverged after their stores (the barrier below is .aligned)'''),
    ('''    __syncthreads();  // every warpgroup's last products have read the ring (each waited only for its own); rstd_s
    float* part = reinterpret_cast<float*>(smem);''', '''    __syncthreads();  // every warpgroup's last products have read the ring (each waited only for its own); rstd_s
    if (threadIdx.x == 0 && tl_slot_s >= 0) g_tl[tl_slot_s][9] = tl_now();
    float* part = reinterpret_cast<float*>(smem);'''),
    ('''    if (split > 1) {
      cluster_sync();
    } else {
      __syncthreads();
    }
    RowOut o;''', '''    if (split > 1) {
      cluster_sync();
    } else {
      __syncthreads();
    }
    if (threadIdx.x == 0 && tl_slot_s >= 0) g_tl[tl_slot_s][10] = tl_now();
    RowOut o;'''),
    ('''      mbar_wait(&full[s], unsigned((i / F::kStages) & 1));
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {''', '''      mbar_wait(&full[s], unsigned((i / F::kStages) & 1));
      if (i == 0 && threadIdx.x == 0 && tl_slot_s >= 0) g_tl[tl_slot_s][2] = tl_now();
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {'''),
    ('''    // The last stage's products (its buffers are never reloaded, so it is not released).
    if constexpr (Opt & kDeepWgmma) asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");''',
     '''    // The last stage's products (its buffers are never reloaded, so it is not released).
    if constexpr (Opt & kDeepWgmma) asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    if (threadIdx.x == 0 && tl_slot_s >= 0) g_tl[tl_slot_s][3] = tl_now();'''),
    ('''    // No block leaves while its peers may still read its part.
    if (split > 1) cluster_sync();''', '''    if (threadIdx.x == 0 && tl_slot_s >= 0) g_tl[tl_slot_s][4] = tl_now();
    if (threadIdx.x == F::kThreads - 32 && tl_slot_s >= 0) g_tl[tl_slot_s][11] = tl_now();
    // No block leaves while its peers may still read its part.
    if (split > 1) cluster_sync();'''),
])
patch('tools/mamba3/bench_cuda.cpp', [
    ('''    for (int i = 0; i < 3; ++i) m.step_device(cache);  // eager, capture, first replay
    m.context().sync();
''', '''    for (int i = 0; i < 3; ++i) m.step_device(cache);  // eager, capture, first replay
    m.context().sync();
    if (const char* tl = std::getenv("MAMBA3_TIMELINE")) {
      m.step_device(cache);
      m.context().sync();
      mamba3::cuda::timeline_arm(true);
      m.step_device(cache);
      m.context().sync();
      mamba3::cuda::timeline_arm(false);
      mamba3::cuda::timeline_dump((std::string(tl) + ".b" + std::to_string(B)).c_str());
    }
'''),
    ('namespace mamba3::cli {\n', 'namespace mamba3::cuda {\nvoid timeline_arm(bool on);\nvoid timeline_dump(const char* path);\n}  // namespace mamba3::cuda\nnamespace mamba3::cli {\n'),
    ('#include <cstring>\n', '#include <cstdlib>\n#include <cstring>\n'),
])
print('patched src/cuda/stream_gemm.cu and tools/mamba3/bench_cuda.cpp (timing only; git checkout them afterwards)')
