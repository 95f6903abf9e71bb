#pragma once
// The stream GEMM's index arithmetic (stream_gemm.cu): where a consumer thread's accumulator values sit in a tile, and
// how the cluster reduction and the folded norms' column sums walk them. Plain C++ shared by the kernel and a host
// test (tests/cuda/test_stream_gemm_layout.cpp, label cpu), so that CI checks the coverage of every mapping without
// a GPU.
#if defined(__CUDACC__)
#define MAMBA3_LAYOUT_FN __host__ __device__ __forceinline__ constexpr
#else
#define MAMBA3_LAYOUT_FN inline constexpr
#endif

namespace mamba3::cuda::stream_layout {

// Consumer thread t's accumulator value i (wgmma m64nNk16, warpgroup t / 128) is weight row weight_row(i, t) of the
// tile and batch row batch_row(i, t).
MAMBA3_LAYOUT_FN int row_of(int t) { return (t / 128) * 64 + ((t / 32) % 4) * 16 + (t % 32) / 4; }
MAMBA3_LAYOUT_FN int col_of(int t) { return 2 * (t % 4); }
MAMBA3_LAYOUT_FN int weight_row(int i, int t) { return row_of(t) + 8 * ((i / 2) % 2); }
MAMBA3_LAYOUT_FN int batch_row(int i, int t) { return col_of(t) + 8 * (i / 4) + i % 2; }

// The vectorised reduction's units: 8 consecutive parts of the buffer [value i][consumer thread t], i.e. threads
// t … t + 7 (t a multiple of 8) of one value i. Threads t + j and t + 4 + j (j < 4) hold weight rows 2r and 2r + 1 at
// the same batch row.
MAMBA3_LAYOUT_FN int units_per_value(int consumers) { return consumers / 8; }
MAMBA3_LAYOUT_FN int unit_value(int u, int consumers) { return u / units_per_value(consumers); }
MAMBA3_LAYOUT_FN int unit_thread(int u, int consumers) { return 8 * (u % units_per_value(consumers)); }

// The units block `rank` of a `split`-block cluster adds: [begin, end) of nb / 2 values' units. whole_values (the
// folded norms' kNormOut): whole values, so that a warp's 32 consecutive units share one i; else an even share.
struct UnitRange {
  int begin, end, value_begin, value_end;
};
MAMBA3_LAYOUT_FN UnitRange reduction_units(int rank, int split, int nb, int consumers, bool whole_values) {
  const int values = nb / 2, units = values * units_per_value(consumers);
  const int value_begin = values * rank / split, value_end = values * (rank + 1) / split;
  if (whole_values)
    return {value_begin * units_per_value(consumers), value_end * units_per_value(consumers), value_begin, value_end};
  return {int(static_cast<long long>(units) * rank / split), int(static_cast<long long>(units) * (rank + 1) / split),
          value_begin, value_end};
}

// kNormOut, split tiles: the slot of the warp that adds units u … u + 31 (u − begin a multiple of 32), and the slots
// (in order) of value i's units; batch row c's column sums come from values colsum_value(c, 0 | 1) at column j =
// colsum_column(c) of their slots.
MAMBA3_LAYOUT_FN int warp_slot(int u, int begin) { return (u - begin) / 32; }
MAMBA3_LAYOUT_FN int value_first_slot(int i, int value_begin, int consumers) {
  return ((i - value_begin) * units_per_value(consumers)) / 32;
}
MAMBA3_LAYOUT_FN int slots_per_value(int consumers) { return units_per_value(consumers) / 32; }
MAMBA3_LAYOUT_FN int colsum_value(int c, int half) { return 4 * (c / 8) + c % 2 + 2 * half; }
MAMBA3_LAYOUT_FN int colsum_column(int c) { return (c % 8) / 2; }

// kNormOut, unsplit tiles: warp w's sums of value i (over lanes t ^ 4, 8, 16), written by lanes 0–3, go to slot
// (w · 2 + row half) at batch row batch_row(i, lane).
MAMBA3_LAYOUT_FN int unsplit_slot(int warp, int i) { return warp * 2 + (i / 2) % 2; }

}  // namespace mamba3::cuda::stream_layout

#undef MAMBA3_LAYOUT_FN
