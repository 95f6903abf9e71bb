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

}  // namespace
}  // namespace mamba3::test
