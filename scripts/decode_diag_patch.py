#!/usr/bin/env python3
"""Timing-only diagnostic build of the CUDA decode step (wrong results: never commit the patched files).

Patches src/cuda/gpu_matrix.cpp and src/cuda/mamba3_gpu.cu so that MAMBA3_DECODE_DIAG_SKIP (bits, read once) leaves
kernels out of every step of at most 128 rows, to see what each kind costs inside the step (the GPU machine has no
Nsight Systems, and ncu serialises the kernels, which hides their overlap under PDL):
  1  the blocks' matrix products (in_proj, out_proj, fc1, fc2 in every route, with what is folded into them)
  2  the Mamba-3 decode kernels (the state update)
  4  the lm_head
Usage: python3 scripts/decode_diag_patch.py; build (e.g. BUNDLE_BINS=mamba3 BUNDLE_OUT=gpu-bundle/diag.tar.xz
scripts/gpu_bundle.sh); then `git checkout src/cuda/gpu_matrix.cpp src/cuda/mamba3_gpu.cu`.
"""
from source_patch import patch_file


def patch(name, pairs):
    patch_file('src/cuda/' + name, pairs, 'decode_diag_patch.py')


skip_fn = '''namespace {
int diag_skip() {
  static const int bits = [] {
    const char* v = std::getenv("MAMBA3_DECODE_DIAG_SKIP");
    return v ? std::atoi(v) : 0;
  }();
  return bits;
}
bool diag_skips(const GpuMatrix& w, int64_t m) {
  if (m > 128) return false;
  return (diag_skip() & (w.n > 100000 ? 4 : 1)) != 0;
}
}  // namespace

void linear(const Context& ctx, const GpuMatrix& w, const void* x, int64_t m, float* y, int64_t x_stride,'''
patch('gpu_matrix.cpp', [
    ('#include "cuda/env_switch.h"', '#include "cuda/env_switch.h"\n#include <cstdlib>'),
    ('void linear(const Context& ctx, const GpuMatrix& w, const void* x, int64_t m, float* y, int64_t x_stride,',
     skip_fn),
    ('  if (m == 0) return;\n  const int64_t ldx', '  if (m == 0 || diag_skips(w, m)) return;\n  const int64_t ldx'),
    ('  if (m == 0) return;\n  MAMBA3_CHECK(w.n % 2 == 0', '  if (m == 0 || diag_skips(w, m)) return;\n  MAMBA3_CHECK(w.n % 2 == 0'),
    ('                          const GemvResidualNorm& out) {\n',
     '                          const GemvResidualNorm& out) {\n  if (diag_skips(w, rows)) return;\n'),
    ('                   const GemvRowScale& in) {\n  if (rows == 1) return gemv_small_m_scaled',
     '                   const GemvRowScale& in) {\n  if (diag_skips(w, rows)) return;\n  if (rows == 1) return gemv_small_m_scaled'),
    ('                              const GemvRowScale& in) {\n  if (rows == 1) return gemv_small_m_gated',
     '                              const GemvRowScale& in) {\n  if (diag_skips(w, rows)) return;\n  if (rows == 1) return gemv_small_m_gated'),
])
patch('mamba3_gpu.cu', [
    ('#include <algorithm>\n', '#include <algorithm>\n#include <cstdlib>\n'),
    ('  if (batch == 0 || L == 0) return;\n  MAMBA3_CHECK(batch * c.nheads() < (int64_t(1) << 31), "Mamba-3 CUDA kernel: batch {} too large", batch);\n  if (path == Mamba3GpuPath::Staged',
     '  if (batch == 0 || L == 0) return;\n  if (L == 1 && batch <= 128 && std::getenv("MAMBA3_DECODE_DIAG_SKIP") &&\n      (std::atoi(std::getenv("MAMBA3_DECODE_DIAG_SKIP")) & 2))\n    return;\n  MAMBA3_CHECK(batch * c.nheads() < (int64_t(1) << 31), "Mamba-3 CUDA kernel: batch {} too large", batch);\n  if (path == Mamba3GpuPath::Staged'),
])
print('patched src/cuda/gpu_matrix.cpp and src/cuda/mamba3_gpu.cu (revert with git checkout after the build)')
