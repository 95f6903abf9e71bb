#pragma once
// The fused products' index arithmetic (fused_gemm.cu): where a consumer thread's accumulator values sit in its
// warpgroup's 64 rows, and where the shared-memory epilogue (MAMBA3_TRAIN_FUSED_GEMM_STORE=tma) writes them into a
// 64 × 64 bf16 box that a bulk tensor store with the 128-byte swizzle reads. Plain C++ shared by the kernel and a host
// test (tests/cuda/test_fused_gemm_layout.cpp, label cpu), so that CI checks the boxes' coverage and bank pattern
// without a GPU.
#include "cuda/layout_fn.h"

namespace mamba3::cuda::fused_layout {

// wgmma m64nNk16's accumulator: thread t of the warpgroup (0–127) holds the pair (d[4j + 2e], d[4j + 2e + 1]) at row
// frag_row(t, e) of the 64, columns frag_col(t, j) and the next.
MAMBA3_LAYOUT_FN int frag_row(int t, int e) { return 16 * (t / 32) + (t % 32) / 4 + 8 * e; }
MAMBA3_LAYOUT_FN int frag_col(int t, int j) { return 8 * j + 2 * (t % 4); }

// An epilogue box: 64 rows of 64 bf16 (128 bytes each), 16-byte chunk c of row r at chunk c ^ (r % 8) — the order in
// which a bulk tensor store with CU_TENSOR_MAP_SWIZZLE_128B reads a 1024-byte-aligned box. A warp's eight rows of one
// chunk then fall in all 32 banks.
constexpr int kBoxRows = 64, kBoxCols = 64, kBoxRowBytes = 128, kBoxBytes = kBoxRows * kBoxRowBytes;
MAMBA3_LAYOUT_FN int box_chunk_offset(int r, int chunk) { return r * kBoxRowBytes + ((chunk ^ (r % 8)) << 4); }
// write_box: thread t's pair of n-tile jj (of the box's eight) and half e, 4 bytes.
MAMBA3_LAYOUT_FN int box_pair_offset(int t, int e, int jj) {
  return box_chunk_offset(frag_row(t, e), jj) + 4 * (t % 4);
}
// After quad_transpose (lane q of the quad holds n-tile 4·jh + q's eight columns of its row): those 16 bytes.
MAMBA3_LAYOUT_FN int box_quad_offset(int t, int e, int jh) { return box_chunk_offset(frag_row(t, e), 4 * jh + t % 4); }
// A 16-byte store is served a quarter warp (two quads: rows r, r + 1) at a time. Both quads writing the same jh would
// put their chunks in the same half of the banks (the swizzle XORs chunk 4·jh + q with r % 8 < 8, leaving bit 2 of
// odd and even rows alike), so the lane's store s takes jh = s on even rows and 1 − s on odd ones.
MAMBA3_LAYOUT_FN int quad_half(int t, int s) { return s ^ ((t % 32 / 4) & 1); }

}  // namespace mamba3::cuda::fused_layout
