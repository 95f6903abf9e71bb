#!/usr/bin/env python3
"""Timing-only diagnostic build of the stream GEMM (wrong results: never commit the patched file).

Patches src/cuda/stream_gemm.cu so that MAMBA3_STREAM_GEMM_DIAG (bits, read with the kernel's options) removes parts
of the work, to see what a product's time is made of (docs/kernels/stream_gemm.md, "Fortieth session"):
  1  x is loaded only by the first stages (the steady loop streams the weights alone)
  2  no wgmma (the consumers only wait and release)
  8  barrier waits by mbarrier.test_wait polling instead of try_wait
Usage: python3 scripts/stream_gemm_diag_patch.py; build (e.g. BUNDLE_BINS=mamba3 BUNDLE_OUT=gpu-bundle/diag.tar.xz
scripts/gpu_bundle.sh); then `git checkout src/cuda/stream_gemm.cu`.
"""
import os
import sys

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src', 'cuda', 'stream_gemm.cu')
s = open(path).read()


def rep(old, new):
    global s
    if s.count(old) != 1:
        sys.exit(f'stream_gemm_diag_patch.py: the text to patch was not found once in {path}:\n{old}')
    s = s.replace(old, new)


rep('  const bool rotate = options & kRotate;', '  const bool rotate = options & kRotate;\n  const int diag_mode = options >> 4;')
rep('''        expect_bytes(&full[s], F::kStageBytes);
        load_w(s, k_of(i));
        load_x(s, k_of(i));''', '''        if (diag_mode & 1) {
          expect_bytes(&full[s], F::kStageBytes - F::kXBoxBytes * kBoxes);
          load_w(s, k_of(i));
        } else {
          expect_bytes(&full[s], F::kStageBytes);
          load_w(s, k_of(i));
          load_x(s, k_of(i));
        }''')
rep('''#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {
        const uint8_t* w_rows''', '''      if (!(diag_mode & 2))
#pragma unroll
      for (int b = 0; b < kBoxes; ++b) {
        const uint8_t* w_rows''')
rep('''        mbar_wait(&empty[s], unsigned((i / F::kStages - 1) & 1));''',
    '''        if (diag_mode & 8) poll_wait(&empty[s], unsigned((i / F::kStages - 1) & 1));
        else mbar_wait(&empty[s], unsigned((i / F::kStages - 1) & 1));''')
rep('''      mbar_wait(&full[s], unsigned((i / F::kStages) & 1));''',
    '''      if (diag_mode & 8) poll_wait(&full[s], unsigned((i / F::kStages) & 1));
      else mbar_wait(&full[s], unsigned((i / F::kStages) & 1));''')
rep('''__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {''', '''__device__ __forceinline__ void poll_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\\n.reg .pred done;\\npoll:\\nmbarrier.test_wait.parity.shared::cta.b64 done, [%0], %1;\\n@!done bra poll;\\n}\\n"
      ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {''')
rep('''  static const int on = env_choice("MAMBA3_STREAM_GEMM_ROTATE", {"0", "1"}) == "1" ? kRotate : 0;''',
    '''  static const int on = (env_choice("MAMBA3_STREAM_GEMM_ROTATE", {"0", "1"}) == "1" ? kRotate : 0) |
                        (std::getenv("MAMBA3_STREAM_GEMM_DIAG") ? std::atoi(std::getenv("MAMBA3_STREAM_GEMM_DIAG")) << 4 : 0);''')
s = '#include <cstdlib>\n' + s
open(path, 'w').write(s)
print(f'patched {path} (timing only; restore it with git checkout before committing)')
