// The fused products' shared-memory epilogue layout (src/cuda/train/fused_gemm_layout.h), checked on the host: the
// accumulator fragments cover a warpgroup's 64 × N rows once; a box written pair by pair (plain and gated forward) or
// 16 bytes per lane after the quad exchange (gated backward) holds, once the bulk store's 128-byte swizzle is undone,
// every element of its 64 × 64 columns exactly once and from the thread that holds it; and each warp's shared-memory
// writes are free of bank conflicts.
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "cuda/train/fused_gemm_layout.h"

namespace mamba3::test {
namespace {

namespace fl = cuda::fused_layout;

// The tensor map's 128-byte swizzle as the hardware applies it to a 1024-byte-aligned box: byte address bits 4–6 (the
// 16-byte chunk in a 128-byte row) XOR bits 7–9 (the row modulo 8). Stated independently of box_chunk_offset.
int swizzle128(int logical_byte) { return logical_byte ^ (((logical_byte >> 7) & 7) << 4); }

TEST(FusedGemmLayout, FragmentsCoverTheWarpgroupRowsOnce) {
  const int n = 256;  // the cooperative m64n256 accumulator: 32 n-tiles
  std::vector<int> seen(size_t(64 * n), 0);
  for (int t = 0; t < 128; ++t)
    for (int j = 0; j < n / 8; ++j)
      for (int e = 0; e < 2; ++e)
        for (int lo = 0; lo < 2; ++lo) {
          const int r = fl::frag_row(t, e), c = fl::frag_col(t, j) + lo;
          ASSERT_GE(r, 0);
          ASSERT_LT(r, 64);
          ASSERT_LT(c, n);
          ++seen[size_t(r * n + c)];
        }
  for (size_t i = 0; i < seen.size(); ++i) ASSERT_EQ(seen[i], 1) << "element " << i;
}

// Each box element (row, column) as the logical byte the store reads: ((row · 64 + column) · 2).
int logical_byte(int r, int c) { return (r * fl::kBoxCols + c) * 2; }

TEST(FusedGemmLayout, PairBoxesHoldEveryElementOnceFromItsThread) {
  // write_box(j0): n-tiles j0 … j0 + 7 of the accumulator, so box column c is accumulator column 8·j0 + c.
  for (int j0 : {0, 8, 16, 24}) {
    SCOPED_TRACE(j0);
    std::vector<int> owner(fl::kBoxBytes / 2, -1);  // per box element: t · 256 + accumulator column, or -1
    for (int t = 0; t < 128; ++t)
      for (int e = 0; e < 2; ++e)
        for (int jj = 0; jj < 8; ++jj) {
          const int off = fl::box_pair_offset(t, e, jj);
          ASSERT_EQ(off % 4, 0);
          ASSERT_GE(off, 0);
          ASSERT_LE(off + 4, fl::kBoxBytes);
          for (int lo = 0; lo < 2; ++lo) {
            const int element = (off + 2 * lo) / 2;
            ASSERT_EQ(owner[size_t(element)], -1) << "written twice: byte " << off + 2 * lo;
            owner[size_t(element)] = t * 256 + fl::frag_col(t, j0 + jj) + lo;
          }
        }
    for (int r = 0; r < fl::kBoxRows; ++r)
      for (int c = 0; c < fl::kBoxCols; ++c) {
        const int stored = owner[size_t(swizzle128(logical_byte(r, c)) / 2)];
        ASSERT_NE(stored, -1) << "row " << r << " column " << c << " never written";
        const int t = stored / 256, col = stored % 256;
        EXPECT_EQ(col, 8 * j0 + c) << "row " << r << " column " << c;
        EXPECT_TRUE(fl::frag_row(t, 0) == r || fl::frag_row(t, 1) == r) << "row " << r << " from thread " << t;
      }
  }
}

TEST(FusedGemmLayout, QuadBoxesHoldEveryElementOnceFromItsThread) {
  // After quad_transpose lane q of a quad holds n-tile 4·jg + q's eight columns of its row; the box takes jg = 2·cb +
  // jh (jh = 0, 1) of its accumulator half cb, so box column c is that half's column c.
  std::vector<int> owner(fl::kBoxBytes / 2, -1);  // per box element: thread · 64 + box column
  for (int t = 0; t < 128; ++t)
    for (int e = 0; e < 2; ++e)
      for (int s = 0; s < 2; ++s) {  // the lane's two stores
        const int jh = fl::quad_half(t, s);
        const int off = fl::box_quad_offset(t, e, jh);
        ASSERT_EQ(off % 16, 0);
        ASSERT_LE(off + 16, fl::kBoxBytes);
        const int first_col = (4 * jh + t % 4) * 8;  // the box column of the lane's first value
        for (int k = 0; k < 8; ++k) {
          const int element = off / 2 + k;
          ASSERT_EQ(owner[size_t(element)], -1) << "written twice: element " << element;
          owner[size_t(element)] = t * 64 + first_col + k;
        }
      }
  for (int r = 0; r < fl::kBoxRows; ++r)
    for (int c = 0; c < fl::kBoxCols; ++c) {
      const int stored = owner[size_t(swizzle128(logical_byte(r, c)) / 2)];
      ASSERT_NE(stored, -1) << "row " << r << " column " << c << " never written";
      const int t = stored / 64;
      EXPECT_EQ(stored % 64, c) << "row " << r;
      EXPECT_TRUE(fl::frag_row(t, 0) == r || fl::frag_row(t, 1) == r) << "row " << r << " from thread " << t;
    }
}

// Shared memory serves 32 banks of 4 bytes; a warp's 4-byte stores are conflict-free when its 32 lanes hit 32
// distinct banks, its 16-byte stores when each quarter-warp's 8 lanes cover all 32 banks.
TEST(FusedGemmLayout, BoxWritesAreFreeOfBankConflicts) {
  for (int warp = 0; warp < 4; ++warp)
    for (int e = 0; e < 2; ++e) {
      for (int jj = 0; jj < 8; ++jj) {
        std::set<int> banks;
        for (int lane = 0; lane < 32; ++lane) banks.insert(fl::box_pair_offset(32 * warp + lane, e, jj) / 4 % 32);
        EXPECT_EQ(banks.size(), 32u) << "warp " << warp << " e " << e << " n-tile " << jj;
      }
      for (int s = 0; s < 2; ++s)
        for (int quarter = 0; quarter < 4; ++quarter) {
          std::set<int> banks;
          for (int lane = 8 * quarter; lane < 8 * quarter + 8; ++lane) {
            const int t = 32 * warp + lane;
            const int off = fl::box_quad_offset(t, e, fl::quad_half(t, s));
            for (int w = 0; w < 4; ++w) banks.insert((off / 4 + w) % 32);
          }
          EXPECT_EQ(banks.size(), 32u) << "warp " << warp << " e " << e << " store " << s << " quarter " << quarter;
        }
    }
}

}  // namespace
}  // namespace mamba3::test
