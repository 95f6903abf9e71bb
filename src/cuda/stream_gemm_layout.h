#pragma once
// The stream GEMM's index arithmetic (stream_gemm.cu): where a consumer thread's accumulator values sit in a tile, and
// where the row epilogue keeps and reads them. Plain C++ shared by the kernel and a host
// test (tests/cuda/test_stream_gemm_layout.cpp, label cpu), so that CI checks the coverage of every mapping without
// a GPU.
#include "cuda/layout_fn.h"

namespace mamba3::cuda::stream_layout {

// Consumer thread t's accumulator value i (wgmma m64nNk16, warpgroup t / 128) is weight row weight_row(i, t) of the
// tile and batch row batch_row(i, t).
MAMBA3_LAYOUT_FN int row_of(int t) { return (t / 128) * 64 + ((t / 32) % 4) * 16 + (t % 32) / 4; }
MAMBA3_LAYOUT_FN int col_of(int t) { return 2 * (t % 4); }
MAMBA3_LAYOUT_FN int weight_row(int i, int t) { return row_of(t) + 8 * ((i / 2) % 2); }
MAMBA3_LAYOUT_FN int batch_row(int i, int t) { return col_of(t) + 8 * (i / 4) + i % 2; }

// The row epilogue: a block's part of the tile in shared memory as [batch row c][weight row r], rows row_pitch floats
// apart. The 4 extra floats put the 32 lanes of a fragment write (8 weight rows × 4 batch rows two apart) in 32
// different banks, and keep each row's float4 reads 16-byte aligned.
MAMBA3_LAYOUT_FN int row_pitch(int tile_rows) { return tile_rows + 4; }
MAMBA3_LAYOUT_FN int row_part_index(int c, int r, int tile_rows) { return c * row_pitch(tile_rows) + r; }
// A warp takes a batch row, lane l the 4 weight rows from lane_first_row(l), then every kLaneRowStep rows.
constexpr int kLaneRowStep = 128;
MAMBA3_LAYOUT_FN int lane_first_row(int lane) { return 4 * lane; }
// The batch rows block `rank` of a `split`-block cluster adds and stores: [begin, end) of nb.
struct RowRange {
  int begin, end;
};
MAMBA3_LAYOUT_FN RowRange epilogue_rows(int rank, int split, int nb) {
  return {nb * rank / split, nb * (rank + 1) / split};
}

}  // namespace mamba3::cuda::stream_layout
