// The stream GEMM's index arithmetic (src/cuda/stream_gemm_layout.h), checked on the host for every form the kernel
// instantiates (one, two or four consumer warpgroups, batch widths 8–128) and every split: each tile element has
// exactly one (thread, value); (value, gate) pairs sit in threads t, t ^ 4 (the fragment epilogue's shuffle); the row
// epilogue's shared-memory part holds each element once, its fragment writes are free of bank conflicts, its rows'
// float4 reads are aligned and cover every weight row once, and the blocks' batch rows partition the batch.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "cuda/stream_gemm_layout.h"

namespace mamba3::test {
namespace {

namespace sl = cuda::stream_layout;

struct Form {
  int consumers, nb;
  int tile_rows() const { return consumers / 2; }  // 64 weight rows per warpgroup of 128 threads
};
std::vector<Form> forms() {
  std::vector<Form> out;
  for (int consumers : {256, 512})
    for (int nb : {8, 16, 32, 64, 128}) out.push_back({consumers, nb});
  out.push_back({128, 128});  // WideShort: one warpgroup, 64-row tiles
  return out;
}
std::string name(const Form& f) { return "consumers " + std::to_string(f.consumers) + " NB " + std::to_string(f.nb); }

TEST(StreamGemmLayout, EveryTileElementHasOneThreadAndValue) {
  for (const Form& f : forms()) {
    SCOPED_TRACE(name(f));
    std::vector<int> seen(size_t(f.tile_rows() * f.nb), 0);
    for (int t = 0; t < f.consumers; ++t)
      for (int i = 0; i < f.nb / 2; ++i) {
        const int r = sl::weight_row(i, t), c = sl::batch_row(i, t);
        ASSERT_GE(r, 0);
        ASSERT_LT(r, f.tile_rows());
        ASSERT_GE(c, 0);
        ASSERT_LT(c, f.nb);
        ++seen[size_t(r * f.nb + c)];
      }
    for (int e = 0; e < f.tile_rows() * f.nb; ++e) EXPECT_EQ(seen[size_t(e)], 1) << "element " << e;
    // (value, gate) pairs: thread t (bit 2 clear) holds the even row, t ^ 4 the next one, at the same batch row.
    for (int t = 0; t < f.consumers; ++t)
      for (int i = 0; i < f.nb / 2; ++i) {
        if (t % 8 >= 4) continue;
        EXPECT_EQ(sl::weight_row(i, t) % 2, 0);
        EXPECT_EQ(sl::weight_row(i, t ^ 4), sl::weight_row(i, t) + 1);
        EXPECT_EQ(sl::batch_row(i, t ^ 4), sl::batch_row(i, t));
      }
  }
}

TEST(StreamGemmLayout, RowEpiloguePartHoldsEveryElementOnceWithoutBankConflicts) {
  for (const Form& f : forms()) {
    SCOPED_TRACE(name(f));
    const int tr = f.tile_rows(), pitch = sl::row_pitch(tr);
    EXPECT_EQ(pitch % 4, 0) << "float4 reads of a row must stay 16-byte aligned";
    std::vector<int> seen(size_t(f.nb * pitch), 0);
    for (int t = 0; t < f.consumers; ++t)
      for (int i = 0; i < f.nb / 2; ++i) {
        const int at = sl::row_part_index(sl::batch_row(i, t), sl::weight_row(i, t), tr);
        ASSERT_GE(at, 0);
        ASSERT_LT(at, f.nb * pitch);
        ++seen[size_t(at)];
      }
    for (int c = 0; c < f.nb; ++c)
      for (int r = 0; r < pitch; ++r)
        EXPECT_EQ(seen[size_t(sl::row_part_index(c, r, tr))], r < tr ? 1 : 0) << "batch row " << c << " row " << r;
    // A warp's write of one value: 32 lanes, 32 banks (4-byte words).
    for (int warp = 0; warp < f.consumers / 32; ++warp)
      for (int i = 0; i < f.nb / 2; ++i) {
        std::set<int> banks;
        for (int lane = 0; lane < 32; ++lane) {
          const int t = warp * 32 + lane;
          banks.insert(sl::row_part_index(sl::batch_row(i, t), sl::weight_row(i, t), tr) % 32);
        }
        EXPECT_EQ(banks.size(), 32u) << "warp " << warp << " value " << i << ": a bank conflict";
      }
  }
}

// The epilogue's walk: block `rank` takes batch rows epilogue_rows(rank, split), a warp per row, lane l the float4 at
// weight rows 4l + 128k: the ranks partition the batch, and a row's lanes cover its weight rows once.
TEST(StreamGemmLayout, RowEpilogueWalkCoversTheTileOnce) {
  for (const Form& f : forms()) {
    SCOPED_TRACE(name(f));
    for (int split = 1; split <= 8; ++split) {
      int next = 0;
      for (int rank = 0; rank < split; ++rank) {
        const sl::RowRange r = sl::epilogue_rows(rank, split, f.nb);
        EXPECT_EQ(r.begin, next) << "split " << split << " rank " << rank;
        EXPECT_LE(r.begin, r.end);
        next = r.end;
      }
      EXPECT_EQ(next, f.nb) << "split " << split;
    }
    std::vector<int> rows(size_t(f.tile_rows()), 0);
    for (int lane = 0; lane < 32; ++lane)
      for (int r = sl::lane_first_row(lane); r < f.tile_rows(); r += sl::kLaneRowStep)
        for (int q = 0; q < 4; ++q) {
          EXPECT_EQ(r % 4, 0) << "a lane's quad must start 16-byte aligned";
          ++rows[size_t(r + q)];
        }
    for (int r = 0; r < f.tile_rows(); ++r) EXPECT_EQ(rows[size_t(r)], 1) << "weight row " << r;
  }
}

// The grid's places: every (tile, rank) of the padded tiles taken by exactly one block; a cluster's blocks of one tile
// hold consecutive cluster ranks from group_base; a block's x slice goes to the `cast` blocks of its rank in its
// cluster (itself included), and every block receives the `cast` slices of its rank exactly once.
TEST(StreamGemmLayout, BlockPlacesCoverEveryTileAndRankOnce) {
  for (int cast : {1, 2, 4})
    for (int split = 1; split * cast <= 8; ++split) {
      SCOPED_TRACE("cast " + std::to_string(cast) + " split " + std::to_string(split));
      const int cluster = split * cast;
      const long long clusters = 5, tiles = clusters * cast;
      std::vector<int> seen(size_t(tiles * split), 0);
      for (long long b = 0; b < clusters * cluster; ++b) {
        const sl::BlockPlace p = sl::block_place(b, split, cast);
        ASSERT_GE(p.tile, 0);
        ASSERT_LT(p.tile, tiles);
        ASSERT_GE(p.rank, 0);
        ASSERT_LT(p.rank, split);
        ++seen[size_t(p.tile * split + p.rank)];
        EXPECT_EQ(p.tile / cast, b / cluster) << "a tile's blocks stay in one cluster";
        EXPECT_EQ(p.group_base + p.rank, int(b % cluster)) << "block " << b;
        EXPECT_EQ(p.x_mask >> (b % cluster) & 1u, 1u) << "a block receives its own x slice";
        EXPECT_EQ(__builtin_popcount(p.x_mask), cast);
        EXPECT_LT(p.x_mask, 1u << cluster) << "no rank outside the cluster";
      }
      for (int v : seen) EXPECT_EQ(v, 1);
      // Each cluster rank receives one slice from each of the cast blocks of its k-range, slices 0 … cast − 1.
      for (int receiver = 0; receiver < cluster; ++receiver) {
        std::vector<int> slices(size_t(cast), 0);
        for (int sender = 0; sender < cluster; ++sender) {
          const sl::BlockPlace p = sl::block_place(sender, split, cast);
          if (p.x_mask >> receiver & 1u) ++slices[size_t(p.cast_index)];
        }
        for (int v : slices) EXPECT_EQ(v, 1) << "receiver " << receiver;
      }
    }
  // Without multicast the places are the kernel's old ones: tile = block / split, rank = block % split.
  for (int split = 1; split <= 8; ++split)
    for (long long b = 0; b < 40; ++b) {
      const sl::BlockPlace p = sl::block_place(b, split, 1);
      EXPECT_EQ(p.tile, b / split);
      EXPECT_EQ(p.rank, int(b % split));
      EXPECT_EQ(p.group_base, 0);
      EXPECT_EQ(p.x_mask, 1u << (b % split));
    }
}

}  // namespace
}  // namespace mamba3::test
