// The stream GEMM's index arithmetic (src/cuda/stream_gemm_layout.h), checked on the host for every form the kernel
// instantiates (two or four consumer warpgroups, batch widths 8–128) and every split: each tile element has exactly
// one (thread, value); (value, gate) pairs sit in threads t, t ^ 4; the reduction's units partition the tile and the
// ranks' ranges partition the units; with whole values a warp's 32 units share one value and its threads run the
// same trip count; the folded norms' slots and column sums add every element of a batch row exactly once.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "cuda/stream_gemm_layout.h"

namespace mamba3::test {
namespace {

namespace sl = cuda::stream_layout;

struct Form {
  int consumers, nb;
};
std::vector<Form> forms() {
  std::vector<Form> out;
  for (int consumers : {256, 512})
    for (int nb : {8, 16, 32, 64, 128}) out.push_back({consumers, nb});
  return out;
}
std::string name(const Form& f) { return "consumers " + std::to_string(f.consumers) + " NB " + std::to_string(f.nb); }

TEST(StreamGemmLayout, EveryTileElementHasOneThreadAndValue) {
  for (const Form& f : forms()) {
    SCOPED_TRACE(name(f));
    const int rows = f.consumers / 2;  // 64 weight rows per warpgroup of 128 threads
    std::vector<int> seen(size_t(rows * f.nb), 0);
    for (int t = 0; t < f.consumers; ++t)
      for (int i = 0; i < f.nb / 2; ++i) {
        const int r = sl::weight_row(i, t), c = sl::batch_row(i, t);
        ASSERT_GE(r, 0);
        ASSERT_LT(r, rows);
        ASSERT_GE(c, 0);
        ASSERT_LT(c, f.nb);
        ++seen[size_t(r * f.nb + c)];
      }
    for (int e = 0; e < rows * f.nb; ++e) EXPECT_EQ(seen[size_t(e)], 1) << "element " << e;
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

TEST(StreamGemmLayout, UnitsPartitionTheTileAndRanksPartitionTheUnits) {
  for (const Form& f : forms()) {
    SCOPED_TRACE(name(f));
    const int units = (f.nb / 2) * sl::units_per_value(f.consumers);
    for (int u = 0; u < units; ++u) {
      const int i = sl::unit_value(u, f.consumers), t = sl::unit_thread(u, f.consumers);
      ASSERT_EQ(t % 8, 0);
      EXPECT_EQ(i * f.consumers + t, 8 * u) << "unit " << u << " is not parts 8u … 8u + 7";
      for (int j = 0; j < 4; ++j) {
        EXPECT_EQ(sl::weight_row(i, t + 4 + j), sl::weight_row(i, t + j) + 1);
        EXPECT_EQ(sl::batch_row(i, t + 4 + j), sl::batch_row(i, t + j));
      }
    }
    for (bool whole : {false, true})
      for (int split = 1; split <= 8; ++split) {
        SCOPED_TRACE("split " + std::to_string(split) + (whole ? " whole values" : ""));
        int next = 0;
        for (int rank = 0; rank < split; ++rank) {
          const sl::UnitRange r = sl::reduction_units(rank, split, f.nb, f.consumers, whole);
          EXPECT_EQ(r.begin, next);
          EXPECT_LE(r.begin, r.end);
          next = r.end;
          if (whole) {
            EXPECT_EQ(r.begin, r.value_begin * sl::units_per_value(f.consumers));
            EXPECT_EQ(r.end, r.value_end * sl::units_per_value(f.consumers));
          }
        }
        EXPECT_EQ(next, units);
      }
  }
}

// The kNormOut reduction as the kernel runs it: threads of a block (consumers + the producer warp) stride over the
// rank's units; each warp's 32 lanes take the same number of trips and one value per trip, write one slot, and the
// column-sum step finds every element of each batch row in this rank exactly once.
TEST(StreamGemmLayout, FoldedColumnSumsOfSplitTilesAddEveryElementOnce) {
  for (const Form& f : forms()) {
    if (f.nb != 128) continue;  // the folded norms are the wide class's
    SCOPED_TRACE(name(f));
    const int threads = f.consumers + 32;
    for (int split = 2; split <= 8; ++split)
      for (int rank = 0; rank < split; ++rank) {
        SCOPED_TRACE("split " + std::to_string(split) + " rank " + std::to_string(rank));
        const sl::UnitRange r = sl::reduction_units(rank, split, f.nb, f.consumers, true);
        // slot → (value, element ids summed into it, by column j)
        std::map<int, std::pair<int, std::vector<std::multiset<int>>>> slots;
        for (int warp = 0; warp < threads / 32; ++warp) {
          for (int trip = 0;; ++trip) {
            int active = 0, value = -1, slot = -1;
            for (int lane = 0; lane < 32; ++lane) {
              const int u = r.begin + warp * 32 + lane + trip * threads;
              if (u >= r.end) continue;
              ++active;
              const int i = sl::unit_value(u, f.consumers), t = sl::unit_thread(u, f.consumers);
              if (value < 0) value = i, slot = sl::warp_slot(u, r.begin);
              ASSERT_EQ(i, value) << "a warp's units span two values";
              ASSERT_EQ(sl::warp_slot(u, r.begin), slot);
              auto& entry = slots[slot];
              entry.first = i;
              entry.second.resize(4);
              for (int j = 0; j < 4; ++j) {
                entry.second[size_t(j)].insert(i * f.consumers + t + j);
                entry.second[size_t(j)].insert(i * f.consumers + t + 4 + j);
              }
            }
            ASSERT_TRUE(active == 0 || active == 32) << "warp " << warp << " trip " << trip << " diverges";
            if (active == 0) break;
          }
        }
        // Slot capacity as the kernel's static_assert states it: (NB / 4) values × slots per value.
        for (const auto& [slot, entry] : slots) EXPECT_LT(slot, (f.nb / 4) * sl::slots_per_value(f.consumers));
        // Column sums: batch row c gathers its values' slots at column colsum_column(c).
        for (int c = 0; c < f.nb; ++c) {
          std::multiset<int> got, want;
          for (int half = 0; half < 2; ++half) {
            const int i = sl::colsum_value(c, half);
            if (i < r.value_begin || i >= r.value_end) continue;
            const int slot0 = sl::value_first_slot(i, r.value_begin, f.consumers);
            for (int h = 0; h < sl::slots_per_value(f.consumers); ++h) {
              const auto it = slots.find(slot0 + h);
              ASSERT_NE(it, slots.end()) << "batch row " << c << ": slot " << slot0 + h << " never written";
              EXPECT_EQ(it->second.first, i);
              for (int e : it->second.second[size_t(sl::colsum_column(c))]) got.insert(e);
            }
          }
          for (int i = r.value_begin; i < r.value_end; ++i)
            for (int t = 0; t < f.consumers; ++t)
              if (sl::batch_row(i, t) == c) want.insert(i * f.consumers + t);
          EXPECT_EQ(got, want) << "batch row " << c;
        }
      }
  }
}

// kNormOut, unsplit tiles: each warp's lanes 0–3 write one slot entry per (row half, batch row), and the lanes a
// shuffle over t ^ 4, 8, 16 combines cover the warp's 8 rows of that half.
TEST(StreamGemmLayout, FoldedColumnSumsOfUnsplitTilesAddEveryElementOnce) {
  for (const Form& f : forms()) {
    if (f.nb != 128) continue;
    SCOPED_TRACE(name(f));
    std::map<std::pair<int, int>, std::set<int>> written;  // (slot, batch row) → weight rows summed there
    for (int warp = 0; warp < f.consumers / 32; ++warp)
      for (int i = 0; i < f.nb / 2; ++i)
        for (int lane = 0; lane < 4; ++lane) {
          const auto key = std::make_pair(sl::unsplit_slot(warp, i), sl::batch_row(i, lane));
          ASSERT_EQ(written.count(key), 0u) << "slot written twice";
          std::set<int>& rows = written[key];
          for (int other = 0; other < 32; ++other)
            if (other % 4 == lane) {  // the lanes t ^ 4, 8, 16 reach
              const int t = warp * 32 + other;
              EXPECT_EQ(sl::batch_row(i, t), key.second);
              rows.insert(sl::weight_row(i, t));
            }
          EXPECT_EQ(rows.size(), 8u);
        }
    // Per batch row, the slots' rows together are every weight row of the tile, once.
    for (int c = 0; c < f.nb; ++c) {
      std::multiset<int> rows;
      for (int slot = 0; slot < 2 * (f.consumers / 32); ++slot) {
        const auto it = written.find({slot, c});
        ASSERT_NE(it, written.end()) << "slot " << slot << " batch row " << c;
        rows.insert(it->second.begin(), it->second.end());
      }
      EXPECT_EQ(rows.size(), size_t(f.consumers / 2));
      EXPECT_EQ(std::set<int>(rows.begin(), rows.end()).size(), size_t(f.consumers / 2));
    }
  }
}

}  // namespace
}  // namespace mamba3::test
