// bf16 training products with the GatedMLP's element-wise halves in their epilogues (fused_gemm.h). sm_90a only.
//
// A block per SM walks the output tiles (128 rows × 256 columns) in order tile = blockIdx.x + i·gridDim.x, the
// columns of a row band fastest (the resident tiles share their A rows; B stays in L2 across bands), or the bands of
// a column tile fastest where B is the larger operand (Args::bands_fastest). Warps 4–11 are two consumer
// warpgroups (rows 64·wg … + 63 of the tile, wgmma m64n128k16 twice per k-step: the tile's two 128-column halves);
// warp 0's lane 0 is the producer (warps 1–3 only give their registers away). Per 64-column k-block a stage holds A's
// 128 × 64 box and B's two 128 × 64 boxes
// (48 KB, 128-byte swizzled), four stages in a ring with full/empty mbarriers; the producer runs ahead across tiles,
// so the next tile's first stages load while the consumers store this one's epilogue. The consumers keep one k-block's
// products in flight (wgmma.wait_group 1) and release a stage once the products after it are issued.
//
// The two halves of B's tile are separate boxes so that the gated forward can take fc1's value rows j0 … j0 + 127 and
// its gate rows d_ff + j0 … together: each consumer thread then holds a and g of the same (row, column) in its two
// accumulators, and the epilogue forms o = a ⊙ silu(g) in registers.
#include <cuda_bf16.h>

#include <cstdint>
#include <string>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_check.h"
#include "cuda/cuda_context.h"
#include "cuda/env_switch.h"
#include "cuda/pdl.h"
#include "cuda/tensor_map.h"
#include "cuda/train/fused_gemm.h"
#include "cuda/train/fused_gemm_layout.h"
#include "cuda/train/gated_silu_math.cuh"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/wgmma_bf16.cuh"

namespace mamba3::cuda {
namespace {

constexpr int kTileM = 128, kKBlock = 64;
// kBufs (a template parameter): the shared-memory epilogue's 64 × 64 bf16 buffers per consumer warpgroup, 0 for the
// direct stores. kTmaBufs of them are built: two leave the cooperative schedule its four stages. Four (three stages)
// were measured on the sixty-fifth session's H100 and gained nothing: the gated epilogues did not get faster, and the
// products lost the stage (the lm_head's logits 2049 → 2215 µs).
constexpr int kTmaBufs = 2;
// Both consumer warpgroups' buffers.
__host__ __device__ constexpr int tma_buf_bytes(int bufs) { return 2 * bufs * fused_layout::kBoxBytes; }
constexpr int kABytes = kTileM * kKBlock * 2;  // A's 128 × 64 box
// A producer warpgroup (one thread of it issues the copies) and two consumer warpgroups. The producer's registers go
// to the consumers (setmaxnreg): the register file is split among the SM's four schedulers, a warp to each in turn, so
// a ninth warp (a lone producer warp) made one scheduler hold three warps at the consumers' count, and the launch
// failed at 222 registers per thread. 40 + 2 · 232 registers per thread in each scheduler's share of 16 Ki: 16,128.
constexpr int kConsumerThreads = 256, kThreads = kConsumerThreads + 128;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;

// kNone stores nothing: the mainloop alone, for measurement (fused_gemm_mainloop_only). Its accumulators feed a store
// that never runs (n_valid ≥ 0), since ptxas drops products whose results are never read.
enum Epilogue : int { kPlain = 0, kGatedForward = 1, kGatedBackward = 2, kNone = 3 };

// The two schedules' shapes. Cooperative: both consumer warpgroups on one 128 × 256 tile (rows 64·wg …), B's boxes of
// 128 rows being the tile's column halves. Ping-pong: each warpgroup on its own 128 × 128 tile, the two taking turns
// with their products (one's epilogue under the other's products), B's boxes of 64 rows side by side in the stage.
template <bool kPing, int kBufs = 0>
struct Shape {
  static constexpr int kBRows = kPing ? 64 : 128;  // rows of each of B's two boxes per stage
  static constexpr int kBBytes = kBRows * kKBlock * 2;
  static constexpr int kStageBytes = kABytes + 2 * kBBytes;  // 32 or 48 KB
  // (two epilogue buffers per warpgroup fit beside the stages; more would take a stage's room)
  static_assert(kBufs <= 2, "the stages leave room for two epilogue buffers per warpgroup");
  static constexpr int kStages = kPing ? 6 : 4;
  // (the stages, the full and empty barriers, the ping-pong's two turn barriers, room for the 1024-byte alignment)
  static constexpr size_t kSmemBytes = size_t(kStages) * kStageBytes + (2 * kStages + 2) * sizeof(uint64_t) + 1024;
  // B rows a tile advances by: the gated forward's tile takes kBRows value rows and their gate rows, the others both
  // boxes' rows
  __host__ __device__ static constexpr int col_step(int epi) { return epi == kGatedForward ? kBRows : 2 * kBRows; }
};

struct Args {
  int64_t M, K;
  int tiles_n;        // column tiles per row band
  int b_second;       // B's row of the second box, relative to the first box's (kBRows, or d_ff for the gated forward)
  int64_t n_valid;    // plain: output columns (a multiple of 8)
  uint16_t* out;      // plain: D; gated forward: h; gated backward: dh
  int64_t ldo;        // its row pitch (elements)
  uint16_t* out2;     // gated forward: o (M, d_ff)
  const uint16_t* h;  // gated backward: h (M, 2·d_ff)
  int64_t d_ff;
  bool
      remote_cta;  // multicast: the releases' remote arrivals at CTA scope (mbar_arrive_remote<false>) or cluster scope
  // The tile order: a column tile's row bands fastest (B's tile read once while A stays in L2: where B is the larger
  // operand, e.g. the lm_head's 50280 rows) or, by default, a row band's column tiles fastest.
  bool bands_fastest;
};

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// The epilogues, per accumulator of m64n128k16. Consumer thread t of a warpgroup: its pair (d[4j + 2e],
// d[4j + 2e + 1]) is row 16·(t/32 % 4) + (t % 32)/4 + 8e of the accumulator's 64, columns 8j + 2(t % 4) and the next.
__device__ __forceinline__ int64_t frag_row(int64_t row_base, int e) {
  return row_base + fused_layout::frag_row(threadIdx.x % 128, e);
}

// Plain: 128 columns from col0, those past n_valid left out.
__device__ __forceinline__ void plain_span(const float (&acc)[64], int e, int64_t row, int64_t col0, const Args& p) {
  if (row >= p.M) return;
  uint16_t* dst = p.out + row * p.ldo;
  const int c = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int64_t col = col0 + 8 * j + c;
    if (col < p.n_valid)
      *reinterpret_cast<uint32_t*>(dst + col) = pack_bf16(acc[4 * j + 2 * e], acc[4 * j + 2 * e + 1]);
  }
}

// Gated forward: NT n-tiles of value columns from col0 in A_[4j + 2e …] and their gates in G_[kG + 4j + 2e …]: h's
// halves and o, 16 bytes per lane through the quad exchange (train_detail::mma_bf16::store_row_pairs: a quarter of the
// store instructions). Every lane takes part in the exchanges, also those past M.
template <int NT, int kG>
__device__ __forceinline__ void gated_forward_rows(const float (&A_)[64], const float (&G_)[64], int e, int64_t row,
                                                   int64_t col0, const Args& p) {
  const bool in_rows = row < p.M;
  uint32_t hv[NT], gv[NT], ov[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    hv[j] = pack_bf16(A_[4 * j + 2 * e], A_[4 * j + 2 * e + 1]);
    gv[j] = pack_bf16(G_[kG + 4 * j + 2 * e], G_[kG + 4 * j + 2 * e + 1]);
    const float2 a = unpack_bf16(hv[j]), g = unpack_bf16(gv[j]);
    ov[j] = pack_bf16(gated_silu::forward(a.x, g.x), gated_silu::forward(a.y, g.y));
  }
  uint16_t* h = p.out + row * p.ldo + col0;
  train_detail::mma_bf16::store_row_pairs(hv, h, in_rows);
  train_detail::mma_bf16::store_row_pairs(gv, h + p.d_ff, in_rows);
  train_detail::mma_bf16::store_row_pairs(ov, p.out2 + row * p.d_ff + col0, in_rows);
}

// Gated backward: do's 128 columns from col0, rounded to bf16 (the product's bf16 output that the element-wise kernel
// reads), exchanged in each quad so that lane q holds the eight columns of n-tile 4·jg + q: 16-byte loads of h's a and
// g, 16-byte stores of da and dg.
__device__ __forceinline__ void gated_backward_span(const float (&acc)[64], int e, int64_t row, int64_t col0,
                                                    const Args& p) {
  const bool in_rows = row < p.M;
  const int lane = threadIdx.x % 32;
  const uint16_t* h = p.h + row * 2 * p.d_ff;
  uint16_t* dh = p.out + row * 2 * p.d_ff;
  uint32_t d[4][4];
  uint4 av[4], gv[4];
#pragma unroll
  for (int jg = 0; jg < 4; ++jg) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = 4 * jg + k;
      d[jg][k] = pack_bf16(acc[4 * j + 2 * e], acc[4 * j + 2 * e + 1]);
    }
    train_detail::mma_bf16::quad_transpose(d[jg]);
    const int64_t col = col0 + (4 * jg + lane % 4) * 8;
    if (in_rows) {
      av[jg] = __ldg(reinterpret_cast<const uint4*>(h + col));
      gv[jg] = __ldg(reinterpret_cast<const uint4*>(h + p.d_ff + col));
    }
  }
#pragma unroll
  for (int jg = 0; jg < 4; ++jg) {
    const int64_t col = col0 + (4 * jg + lane % 4) * 8;
    const uint32_t a4[4] = {av[jg].x, av[jg].y, av[jg].z, av[jg].w};
    const uint32_t g4[4] = {gv[jg].x, gv[jg].y, gv[jg].z, gv[jg].w};
    uint32_t da4[4], dg4[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 dd = unpack_bf16(d[jg][k]), a = unpack_bf16(a4[k]), g = unpack_bf16(g4[k]);
      float da0, dg0, da1, dg1;
      gated_silu::backward(dd.x, a.x, g.x, da0, dg0);
      gated_silu::backward(dd.y, a.y, g.y, da1, dg1);
      da4[k] = pack_bf16(da0, da1), dg4[k] = pack_bf16(dg0, dg1);
    }
    if (in_rows) {
      *reinterpret_cast<uint4*>(dh + col) = make_uint4(da4[0], da4[1], da4[2], da4[3]);
      *reinterpret_cast<uint4*>(dh + p.d_ff + col) = make_uint4(dg4[0], dg4[1], dg4[2], dg4[3]);
    }
  }
}

// A warpgroup's two accumulators out. Cooperative: rows row_base … + 63 (row_base = the tile's + 64·wg), acc0 the
// tile's first 128 columns (box 0), acc1 the next 128 (box 1; the gated forward: the gates of acc0's columns).
// Ping-pong: acc_r rows row_base + 64·r …, its columns n < 64 from box 0 and n ≥ 64 from box 1.
template <int Epi, bool kPing>
__device__ __forceinline__ void epilogue(const float (&acc0)[64], const float (&acc1)[64], int64_t row_base,
                                         int64_t col0, const Args& p) {
  if constexpr (Epi == kNone) {
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) sum += acc0[i] + acc1[i];
    if (p.n_valid < 0) reinterpret_cast<float*>(p.out)[threadIdx.x] = sum;
  }
#pragma unroll
  for (int e = 0; e < 2 && Epi != kNone; ++e) {
    if constexpr (!kPing) {
      const int64_t row = frag_row(row_base, e);
      if constexpr (Epi == kPlain)
        plain_span(acc0, e, row, col0, p), plain_span(acc1, e, row, col0 + 128, p);
      else if constexpr (Epi == kGatedForward)
        gated_forward_rows<16, 0>(acc0, acc1, e, row, col0, p);
      else
        gated_backward_span(acc0, e, row, col0, p), gated_backward_span(acc1, e, row, col0 + 128, p);
    } else {
      const int64_t row0 = frag_row(row_base, e), row1 = frag_row(row_base + 64, e);
      if constexpr (Epi == kPlain)
        plain_span(acc0, e, row0, col0, p), plain_span(acc1, e, row1, col0, p);
      else if constexpr (Epi == kGatedForward)
        gated_forward_rows<8, 32>(acc0, acc0, e, row0, col0, p),
            gated_forward_rows<8, 32>(acc1, acc1, e, row1, col0, p);
      else
        gated_backward_span(acc0, e, row0, col0, p), gated_backward_span(acc1, e, row1, col0, p);
    }
  }
}

// The epilogue through shared memory (kTma, MAMBA3_TRAIN_FUSED_GEMM_STORE=tma), per warpgroup: its 64-row halves of
// the tile leave in boxes of 64 × 64 bf16, each written by the warpgroup into the next of its kBufs 8 KB buffers
// (128-byte swizzle: 16-byte chunk c of row r at c ^ (r % 8), so a warp's eight rows fill all 32 banks) and stored by
// one thread as a bulk tensor copy, which runs on while the warpgroup fills the next buffer and goes on to the next
// tile. A buffer is written again only once its copy has read it (bulk_wait_group_read: the later copies may still be
// in flight). ek counts the warpgroup's boxes across its tiles.
struct TmaOut {
  const CUtensorMap* map;   // out (plain: D; gated forward: h; gated backward: dh)
  const CUtensorMap* map2;  // gated forward: o
  unsigned char* buf;       // the warpgroup's two buffers
  int bar;                  // its named barrier
  int ek;
};
// kBoxes boxes (one, or the gated backward's da and dg of the same columns): write(buf0, buf1) fills them from the
// fragments (one box: buf0 alone, the buffer after the previous box's; two: two adjacent buffers), then they go to
// columns c[i], row r0 of `map` in one group. A buffer is written again only once its copy has read it:
// bulk_wait_group_read leaves in flight the groups of the other buffers.
template <int kBufs, int kBoxes, typename Write>
__device__ __forceinline__ void tma_boxes(TmaOut& o, const CUtensorMap* map, const int64_t (&c)[kBoxes], int64_t r0,
                                          Write write) {
  static_assert((kBoxes == 1 || kBoxes == 2) && kBufs % 2 == 0, "groups of one or two of an even count of buffers");
  const bool issuer = threadIdx.x % 128 == 0;
  unsigned char* buf = o.buf + (o.ek % kBufs) * fused_layout::kBoxBytes;  // (ek stays even with two boxes)
  if (o.ek >= kBufs) {
    if (issuer) bulk_wait_group_read<(kBufs - kBoxes) / kBoxes>();
    asm volatile("bar.sync %0, 128;" ::"r"(o.bar) : "memory");
  }
  write(buf, buf + fused_layout::kBoxBytes);
  fence_proxy_async_shared();
  asm volatile("bar.sync %0, 128;" ::"r"(o.bar) : "memory");
  if (issuer) {
#pragma unroll
    for (int i = 0; i < kBoxes; ++i) tma_store_2d(map, int(c[i]), int(r0), buf + i * fused_layout::kBoxBytes);
    bulk_commit_group();
  }
  o.ek += kBoxes;
}
template <int kBufs, typename Write>
__device__ __forceinline__ void tma_box(TmaOut& o, const CUtensorMap* map, int64_t c0, int64_t r0, Write write) {
  tma_boxes<kBufs, 1>(o, map, {c0}, r0, [&](unsigned char* b, unsigned char*) { write(b); });
}
// The thread's pairs of n-tiles j0 … j0 + 7 of an m64n128 accumulator (columns 8j + 2q, rows 16·warp + lane/4 + 8e)
// into a 64 × 64 box, each as pair(acc index) → the packed bf16 pair.
template <typename Pair>
__device__ __forceinline__ void write_box(unsigned char* buf, int j0, Pair pair) {
  const int t = threadIdx.x % 128;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
#pragma unroll
    for (int jj = 0; jj < 8; ++jj)
      *reinterpret_cast<uint32_t*>(buf + fused_layout::box_pair_offset(t, e, jj)) = pair(4 * (j0 + jj) + 2 * e);
  }
}
// Cooperative: acc1 holds the 128 columns after acc0's, in the same rows. Ping-pong: acc1 holds the 64 rows after
// acc0's, in the same columns (a 128 × 128 tile; the gated forward's acc_r: values in n-tiles 0–7, gates in 8–15).
template <int Epi, int kBufs, bool kPing>
__device__ __forceinline__ void tma_epilogue(const float (&acc0)[64], const float (&acc1)[64], int64_t row_base,
                                             int64_t col0, const Args& p, TmaOut& o) {
  const auto from0 = [&](int i) { return pack_bf16(acc0[i], acc0[i + 1]); };
  const auto from1 = [&](int i) { return pack_bf16(acc1[i], acc1[i + 1]); };
  // accumulator half c / 2's first row and column
  const auto acc_row = [&](int c) { return row_base + (kPing && c >= 2 ? 64 : 0); };
  const auto acc_col = [&](int c) { return col0 + (!kPing && c >= 2 ? 128 : 0); };
  if constexpr (Epi == kPlain) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t col = acc_col(c) + 64 * (c % 2);
      if (col >= p.n_valid) continue;
      if (c < 2)
        tma_box<kBufs>(o, o.map, col, acc_row(c), [&](unsigned char* b) { write_box(b, 8 * c, from0); });
      else
        tma_box<kBufs>(o, o.map, col, acc_row(c), [&](unsigned char* b) { write_box(b, 8 * (c - 2), from1); });
    }
  } else if constexpr (Epi == kGatedForward && kPing) {
    // per 64 rows: h's values (n-tiles 0–7) and gates (8–15), then o from their roundings
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float(&acc)[64] = r == 0 ? acc0 : acc1;
      const auto from = [&](int i) { return pack_bf16(acc[i], acc[i + 1]); };
      const int64_t row = row_base + 64 * r;
      tma_box<kBufs>(o, o.map, col0, row, [&](unsigned char* b) { write_box(b, 0, from); });
      tma_box<kBufs>(o, o.map, p.d_ff + col0, row, [&](unsigned char* b) { write_box(b, 8, from); });
      tma_box<kBufs>(o, o.map2, col0, row, [&](unsigned char* b) {
        write_box(b, 0, [&](int i) {
          const float2 a = unpack_bf16(from(i)), g = unpack_bf16(from(i + 32));
          return pack_bf16(gated_silu::forward(a.x, g.x), gated_silu::forward(a.y, g.y));
        });
      });
    }
  } else if constexpr (Epi == kGatedBackward) {
    // da and dg of 64 columns at a time: do's pairs exchanged in each quad as gated_backward_span does (lane q: n-tile
    // 4·jg + q's eight columns), h's a and g loaded 16 bytes per lane, and da, dg written as 16-byte chunks of the
    // boxes (chunk 4·jh + q of row r at (4·jh + q) ^ (r % 8)).
    const int t = threadIdx.x % 128, q = t % 4;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float(&acc)[64] = c < 2 ? acc0 : acc1;
      const int64_t cols = acc_col(c), rows = acc_row(c);  // the accumulator's first column and row
      const int cb = c % 2;                                // the box's half of the accumulator
      // h's a and g for both fragment rows and both n-tiles, loaded before tma_boxes waits for its buffers, so the
      // loads' latency passes under that wait
      uint4 av[2][2], gv[2][2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t row = rows + fused_layout::frag_row(t, e);
        const uint16_t* h = p.h + row * 2 * p.d_ff;
#pragma unroll
        for (int jh = 0; jh < 2; ++jh) {
          const int64_t col = cols + (4 * (2 * cb + jh) + q) * 8;
          av[e][jh] = gv[e][jh] = make_uint4(0, 0, 0, 0);
          if (row < p.M) {
            av[e][jh] = __ldg(reinterpret_cast<const uint4*>(h + col));
            gv[e][jh] = __ldg(reinterpret_cast<const uint4*>(h + p.d_ff + col));
          }
        }
      }
      tma_boxes<kBufs, 2>(o, o.map, {cols + 64 * cb, p.d_ff + cols + 64 * cb}, rows,
                          [&](unsigned char* bda, unsigned char* bdg) {
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                              uint4 da_v[2], dg_v[2];  // the lane's 16 bytes of n-tile 4·jh + q, jh = 0, 1
#pragma unroll
                              for (int jh = 0; jh < 2; ++jh) {
                                const int jg = 2 * cb + jh;
                                uint32_t d[4];
#pragma unroll
                                for (int k = 0; k < 4; ++k) {
                                  const int j = 4 * jg + k;
                                  d[k] = pack_bf16(acc[4 * j + 2 * e], acc[4 * j + 2 * e + 1]);
                                }
                                train_detail::mma_bf16::quad_transpose(d);
                                const uint4 ah = av[e][jh], gh = gv[e][jh];
                                const uint32_t a4[4] = {ah.x, ah.y, ah.z, ah.w}, g4[4] = {gh.x, gh.y, gh.z, gh.w};
                                uint32_t da4[4], dg4[4];
#pragma unroll
                                for (int k = 0; k < 4; ++k) {
                                  const float2 dd = unpack_bf16(d[k]), a = unpack_bf16(a4[k]), gg = unpack_bf16(g4[k]);
                                  float da0, dg0, da1, dg1;
                                  gated_silu::backward(dd.x, a.x, gg.x, da0, dg0);
                                  gated_silu::backward(dd.y, a.y, gg.y, da1, dg1);
                                  da4[k] = pack_bf16(da0, da1), dg4[k] = pack_bf16(dg0, dg1);
                                }
                                da_v[jh] = make_uint4(da4[0], da4[1], da4[2], da4[3]);
                                dg_v[jh] = make_uint4(dg4[0], dg4[1], dg4[2], dg4[3]);
                              }
                              // (store s takes jh = s on even fragment rows, 1 − s on odd ones:
                              // fused_layout::quad_half)
                              const bool swap = fused_layout::quad_half(t, 0) == 1;
#pragma unroll
                              for (int s = 0; s < 2; ++s) {
                                const int off = fused_layout::box_quad_offset(t, e, fused_layout::quad_half(t, s));
                                *reinterpret_cast<uint4*>(bda + off) = swap ? da_v[1 - s] : da_v[s];
                                *reinterpret_cast<uint4*>(bdg + off) = swap ? dg_v[1 - s] : dg_v[s];
                              }
                            }
                          });
    }
  } else {  // gated forward: h's values and gates, then o from their roundings (gated_forward_rows' expressions)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      tma_box<kBufs>(o, o.map, col0 + 64 * c, row_base, [&](unsigned char* b) { write_box(b, 8 * c, from0); });
      tma_box<kBufs>(o, o.map, p.d_ff + col0 + 64 * c, row_base, [&](unsigned char* b) { write_box(b, 8 * c, from1); });
      tma_box<kBufs>(o, o.map2, col0 + 64 * c, row_base, [&](unsigned char* b) {
        write_box(b, 8 * c, [&](int i) {
          const float2 a = unpack_bf16(from0(i)), g = unpack_bf16(from1(i));
          return pack_bf16(gated_silu::forward(a.x, g.x), gated_silu::forward(a.y, g.y));
        });
      });
    }
  }
}

// kMc (cooperative only): the grid in clusters of two blocks that take row bands 2·pair + rank of the same column
// tile; each block copies its own A box and one of B's two boxes, the latter into both blocks' stages (multicast), so
// each SM pulls 32 KB per k-block out of L2 instead of 48. A stage is refilled only once both blocks' consumers are
// done with it: their releases arrive on both blocks' empty barriers.
template <int Epi, bool kPing, bool kMc, int kBufs>
__global__ void __launch_bounds__(kThreads, 1)
    fused_gemm_kernel(const __grid_constant__ CUtensorMap amap, const __grid_constant__ CUtensorMap bmap,
                      const __grid_constant__ CUtensorMap omap, const __grid_constant__ CUtensorMap omap2,
                      const Args p) {
  pdl_wait();
  static_assert(!(kPing && kMc), "the multicast form is cooperative");
  constexpr bool kTma = kBufs > 0;
  static_assert(!kTma || Epi != kNone, "the mainloop alone stores nothing");
  using S = Shape<kPing, kBufs>;
  constexpr int kStages = S::kStages, kStageBytes = S::kStageBytes;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  // (kTma: the consumers' epilogue buffers, 2 × kBufs × 8 KB, after the stages)
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes + (kTma ? tma_buf_bytes(kBufs) : 0));
  uint64_t* empty = full + kStages;
  uint64_t* turn = empty + kStages;  // ping-pong: turn[c], consumer warpgroup c may start its products
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bands = (p.M + kTileM - 1) / kTileM;
  const int kblocks = int((p.K + kKBlock - 1) / kKBlock);
  const unsigned rank = kMc ? cluster_rank() : 0;
  // The block's li-th tile: its row band and column tile, or false past the last.
  const int64_t units = kMc ? (bands + 1) / 2 * p.tiles_n : bands * p.tiles_n;
  const int64_t first = kMc ? blockIdx.x / 2 : blockIdx.x, stride = kMc ? gridDim.x / 2 : gridDim.x;
  auto tile_at = [&](int64_t li, int64_t& band, int64_t& col_tile) {
    const int64_t u = first + li * stride;
    if (u >= units) return false;
    if (!kMc && p.bands_fastest)
      band = u % bands, col_tile = u / bands;
    else
      band = kMc ? 2 * (u / p.tiles_n) + rank : u / p.tiles_n, col_tile = u % p.tiles_n;
    return true;
  };
  constexpr unsigned kConsumerWarps = kConsumerThreads / 32,
                     kStageReaders = (kPing ? kConsumerWarps / 2 : kConsumerWarps) * (kMc ? 2 : 1);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init_count(&full[s], 1), mbar_init_count(&empty[s], kStageReaders);
    mbar_init_count(&turn[0], kConsumerWarps / 2), mbar_init_count(&turn[1], kConsumerWarps / 2);
    mbar_init_fence();
  }
  if constexpr (kMc)
    cluster_sync();  // (the peer's barriers initialised before any copy or arrival reaches them)
  else
    __syncthreads();
  auto stage_a = [&](int s) { return smem + s * kStageBytes; };
  auto stage_b = [&](int s, int box) { return smem + s * kStageBytes + kABytes + box * S::kBBytes; };

  if (warp < 4) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (warp == 0 && lane == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(&amap) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(&bmap) : "memory");
      int64_t it = 0, band, col_tile;
      for (int64_t li = 0; tile_at(li, band, col_tile); ++li) {
        const int m0 = int(band * kTileM), b0 = int(col_tile * S::col_step(Epi));
        for (int kb = 0; kb < kblocks; ++kb, ++it) {
          const int s = int(it % kStages);
          if (it >= kStages) mbar_wait(&empty[s], unsigned((it / kStages - 1) & 1));
          expect_bytes(&full[s], kStageBytes);
          tma_load_2d(stage_a(s), &amap, kb * kKBlock, m0, &full[s]);
          if constexpr (kMc) {
            tma_load_2d_multicast(stage_b(s, int(rank)), &bmap, kb * kKBlock, b0 + int(rank) * p.b_second, &full[s],
                                  uint16_t(3));
          } else {
            tma_load_2d(stage_b(s, 0), &bmap, kb * kKBlock, b0, &full[s]);
            tma_load_2d(stage_b(s, 1), &bmap, kb * kKBlock, b0 + p.b_second, &full[s]);
          }
        }
      }
    }
    if constexpr (kMc) cluster_sync();  // (no block leaves while its peer may still arrive on its barriers)
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));
  const int wg = warp / 4 - 1;  // the consumer warpgroup
  const auto release = [&](int64_t it) {
    if (lane != 0) return;
    mbar_arrive(&empty[it % kStages]);
    if constexpr (kMc) {
      if (p.remote_cta)
        mbar_arrive_remote<false>(&empty[it % kStages], rank ^ 1u);
      else
        mbar_arrive_remote<true>(&empty[it % kStages], rank ^ 1u);
    }
  };
  // The block's tiles in order li = 0, 1, …: cooperative, both warpgroups on each; ping-pong, warpgroup wg on li ≡ wg
  // (mod 2), its products only once the other's products of tile li − 1 are issued (turn[wg]). The turns keep each
  // warpgroup's wait on a stage at most one phase ahead of that stage's barrier (the other's stages between are
  // consumed), which the parity waits need, and make the schedule: one warpgroup's epilogue under the other's products.
  int64_t band, col_tile;
  TmaOut tma_out{&omap, &omap2, smem + kStages * kStageBytes + wg * kBufs * fused_layout::kBoxBytes, 1 + wg, 0};
  for (int64_t li = kPing ? wg : 0; tile_at(li, band, col_tile); li += kPing ? 2 : 1) {
    if (kPing && li > 0) mbar_wait(&turn[wg], unsigned(((li - 1) / 2) & 1));
    // Cooperative: one m64n256 accumulator over both boxes (box 1 follows box 0 in the stage, so one descriptor spans
    // 256 rows and A is read once per k-step, not twice); its halves are acc0 (box 0) and acc1 (box 1).
    float acc[128];
    float(&acc0)[64] = *reinterpret_cast<float(*)[64]>(acc);
    float(&acc1)[64] = *reinterpret_cast<float(*)[64]>(acc + 64);
    int64_t it = li * kblocks;
    for (int kb = 0; kb < kblocks; ++kb, ++it) {
      const int s = int(it % kStages);
      mbar_wait(&full[s], unsigned((it / kStages) & 1));
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      const unsigned char* a = stage_a(s) + (kPing ? 0 : wg * 64 * 128);
#pragma unroll
      for (int kk = 0; kk < kKBlock / 16; ++kk) {
        const int sc = kb > 0 || kk > 0;
        if constexpr (kPing) {  // rows 0–63 and 64–127 against both boxes (128 rows side by side)
          const uint64_t db = sw128_desc(stage_b(s, 0) + kk * 32);
          wgmma::Mma<128>::run(acc0, sw128_desc(a + kk * 32), db, sc);
          wgmma::Mma<128>::run(acc1, sw128_desc(a + 64 * 128 + kk * 32), db, sc);
        } else {  // the warpgroup's 64 rows against both boxes
          wgmma::Mma<256>::run(acc, sw128_desc(a + kk * 32), sw128_desc(stage_b(s, 0) + kk * 32), sc);
        }
      }
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");  // the previous k-block's products are done
      if (kb > 0) release(it - 1);
    }
    if (kPing && lane == 0) mbar_arrive(&turn[1 - wg]);
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    release(it - 1);
    const int64_t row_base = band * kTileM + (kPing ? 0 : 64 * wg);
    const int64_t col0 = col_tile * S::col_step(Epi);
    if constexpr (kTma)
      tma_epilogue<Epi, kBufs, kPing>(acc0, acc1, row_base, col0, p, tma_out);
    else
      epilogue<Epi, kPing>(acc0, acc1, row_base, col0, p);
  }
  if constexpr (kTma) {
    if (threadIdx.x % 128 == 0) bulk_wait_group_all();
  }
  if constexpr (kMc) cluster_sync();
}

// (rows × cols) bf16, rows `ld` elements apart, in boxes of box_rows rows × 64 columns.
CUtensorMap operand_map(const void* base, int64_t rows, int64_t cols, int64_t ld, int box_rows) {
  return bf16_tensor_map(base, rows, cols, ld, box_rows, kKBlock, "fused_gemm");
}

bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
bool operand_ok(const void* p, int64_t ld, int64_t K) { return p && aligned(p) && ld % 8 == 0 && ld >= K; }

// The launch's configuration: the cluster attribute (kMc: clusters of two blocks along x) beside PDL's.
struct LaunchConfig {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attribute[3]{};
  LaunchConfig(unsigned grid, size_t smem, cudaStream_t s, bool cluster, bool pdl = true) {
    config.gridDim = dim3(grid);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = smem;
    config.stream = s;
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = pdl && train_pdl_enabled() && pdl_enabled() ? 1 : 0;
    attribute[1].id = cudaLaunchAttributeClusterDimension;
    attribute[1].val.clusterDim.x = 2, attribute[1].val.clusterDim.y = 1, attribute[1].val.clusterDim.z = 1;
    // MAMBA3_TRAIN_FUSED_GEMM_SPREAD=1 (measurement): the clusters spread over the GPCs (cuBLAS's nvjet kernels ask
    // for it) rather than the driver's default placement.
    static const bool spread = env_integer("MAMBA3_TRAIN_FUSED_GEMM_SPREAD", 0, 0, 1) == 1;
    attribute[2].id = cudaLaunchAttributeClusterSchedulingPolicyPreference;
    attribute[2].val.clusterSchedulingPolicyPreference = cudaClusterSchedulingPolicySpread;
    config.attrs = attribute;
    config.numAttrs = cluster ? (spread ? 3 : 2) : 1;
  }
};

// The two-block clusters the multicast launch of `kernel` takes: MAMBA3_TRAIN_FUSED_GEMM_CLUSTERS where set (for
// measurement), else as many as the device holds at once (a cluster's blocks share a GPC, so not simply SMs / 2).
template <typename Kernel>
int multicast_clusters(Kernel kernel, size_t smem) {
  const int forced = int(env_integer("MAMBA3_TRAIN_FUSED_GEMM_CLUSTERS", 0, 0, 1024));
  if (forced > 0) return forced;
  // (the probe without PDL's attribute: with it the query answered 0 on the sixty-third session's H100, where 66
  // clusters ran. Where it still answers 0 or fails, SMs / 2: the blocks of a cluster sit on one TPC's two SMs, and
  // clusters that do not fit at once only start later — each walks its own tiles.)
  LaunchConfig probe(2, smem, nullptr, true, false);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &probe.config) != cudaSuccess) (void)cudaGetLastError(), n = 0;
  return n > 0 ? n : device_info().sm_count / 2;
}

template <int Epi, bool kPing, bool kMc, int kBufs>
void launch_as(cudaStream_t s, const void* A, int64_t lda, const void* B, int64_t ldb, int64_t b_rows, Args p,
               int64_t N) {
  using S = Shape<kPing, kBufs>;
  constexpr bool kTma = kBufs > 0;
  if (p.M <= 0) return;
  constexpr auto kernel = fused_gemm_kernel<Epi, kPing, kMc, kBufs>;
  constexpr size_t smem = S::kSmemBytes + (kTma ? tma_buf_bytes(kBufs) : 0);
  static const cudaError_t opted = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  MAMBA3_CUDA_CHECK(opted);
  p.tiles_n = int((N + S::col_step(Epi) - 1) / S::col_step(Epi));
  // (CTA scope by default: on the sixty-third session's H100 the cluster-scope release made each stage's turn so slow
  // that the multicast mainloop took 154 µs against 99 for fc1; MAMBA3_TRAIN_FUSED_GEMM_REMOTE=cluster restores it)
  static const bool remote_cta = env_choice("MAMBA3_TRAIN_FUSED_GEMM_REMOTE", {"cluster", "cta"}) != "cluster";
  p.remote_cta = remote_cta;
  if (Epi != kGatedForward) p.b_second = S::kBRows;
  // (the tiles resident at once read B's column tiles of about one row band: a B larger than A, which L2 cannot keep
  // across bands, would come from DRAM once per band — 128 times for the lm_head's 77 MB at 16384 rows)
  p.bands_fastest = !kMc && b_rows > p.M;
  const CUtensorMap amap = operand_map(A, p.M, p.K, lda, kTileM), bmap = operand_map(B, b_rows, p.K, ldb, S::kBRows);
  // kTma: the outputs in 64 × 64 boxes (plain: D's n_valid columns; gated forward: h's 2·d_ff and o's d_ff; gated
  // backward: dh's 2·d_ff)
  CUtensorMap omap = amap, omap2 = amap;
  if constexpr (kTma) {
    omap =
        Epi == kPlain ? operand_map(p.out, p.M, p.n_valid, p.ldo, 64) : operand_map(p.out, p.M, 2 * p.d_ff, p.ldo, 64);
    if (Epi == kGatedForward) omap2 = operand_map(p.out2, p.M, p.d_ff, p.d_ff, 64);
  }
  const int64_t bands = (p.M + kTileM - 1) / kTileM;
  unsigned grid = 0;
  if constexpr (kMc) {
    static const int clusters = multicast_clusters(kernel, smem);
    const int64_t pairs = (bands + 1) / 2 * p.tiles_n;
    grid = 2 * unsigned(pairs < clusters ? pairs : clusters);
  } else {
    static const int sms = device_info().sm_count;
    const int64_t tiles = bands * p.tiles_n;
    grid = unsigned(tiles < sms ? tiles : sms);
  }
  LaunchConfig launch(grid, smem, s, kMc);
  MAMBA3_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, amap, bmap, omap, omap2, p));
  MAMBA3_LAUNCH_CHECK();
}

// The instance of `schedule` with kBufs epilogue buffers (0: direct stores).
template <int Epi, int kBufs>
void launch_on(cudaStream_t s, FusedGemmSchedule schedule, const void* A, int64_t lda, const void* B, int64_t ldb,
               int64_t b_rows, const Args& p, int64_t N) {
  if (schedule == FusedGemmSchedule::kPingPong)
    launch_as<Epi, true, false, kBufs>(s, A, lda, B, ldb, b_rows, p, N);
  else if (schedule == FusedGemmSchedule::kMulticast)
    launch_as<Epi, false, true, kBufs>(s, A, lda, B, ldb, b_rows, p, N);
  else
    launch_as<Epi, false, false, kBufs>(s, A, lda, B, ldb, b_rows, p, N);
}

// N: the B rows the tiles walk (plain: the output columns; gated forward: d_ff, the value rows; backward: d_ff).
template <int Epi>
void launch(cudaStream_t s, FusedGemmSchedule schedule, const void* A, int64_t lda, const void* B, int64_t ldb,
            int64_t b_rows, const Args& p, int64_t N) {
  if (schedule == FusedGemmSchedule::kDefault) schedule = fused_gemm_default_schedule();
  // MAMBA3_TRAIN_FUSED_GEMM_STORE=tma: the epilogues through shared memory and bulk tensor stores (tma_epilogue);
  // direct (default): each thread stores its fragments. MAMBA3_TRAIN_FUSED_GEMM_STORE_BWD (direct | tma) sets the
  // gated backward's form apart: on the sixty-fourth and sixty-fifth sessions' H100s its direct stores beat the shared
  // memory (139.7 against 158.4 µs) while the plain epilogue gained from shared memory.
  static const std::string store = env_choice("MAMBA3_TRAIN_FUSED_GEMM_STORE", {"direct", "tma"});
  static const std::string store_bwd = env_choice("MAMBA3_TRAIN_FUSED_GEMM_STORE_BWD", {"direct", "tma"});
  const std::string& form = Epi == kGatedBackward && !store_bwd.empty() ? store_bwd : store;
  const bool tma = Epi != kNone && form == "tma";
  if constexpr (Epi == kNone)
    launch_on<Epi, 0>(s, schedule, A, lda, B, ldb, b_rows, p, N);
  else
    tma ? launch_on<Epi, kTmaBufs>(s, schedule, A, lda, B, ldb, b_rows, p, N)
        : launch_on<Epi, 0>(s, schedule, A, lda, B, ldb, b_rows, p, N);
}

}  // namespace

// Off: on an H100 the mainloop runs at ≈ 65 % of cuBLAS's pace, which costs more than the epilogues save (the
// sixty-first session; docs/kernels/fused_gemm.md). MAMBA3_TRAIN_FUSED_GEMM=1 opts in.
constexpr bool kFusedGemmDefault = false;

bool fused_gemm_device_supported() {
  static const bool ok = [] {
    const DeviceInfo d = device_info();
    return d.available && d.cc_major == 9 && d.cc_minor == 0;
  }();
  return ok;
}

bool fused_gemm_enabled() {
  static const bool on = [] {
    const std::string v = env_choice("MAMBA3_TRAIN_FUSED_GEMM", {"1", "0"});
    return fused_gemm_device_supported() && (v.empty() ? kFusedGemmDefault : v == "1");
  }();
  return on;
}

bool fused_gemm_plain_enabled() {
  static const bool on =
      fused_gemm_device_supported() && env_choice("MAMBA3_TRAIN_FUSED_GEMM_PLAIN", {"1", "0"}) == "1";
  return on;
}

FusedGemmSchedule fused_gemm_default_schedule() {
  static const FusedGemmSchedule schedule = [] {
    const std::string v = env_choice("MAMBA3_TRAIN_FUSED_GEMM_SCHEDULE", {"cooperative", "pingpong", "multicast"});
    return v == "pingpong"    ? FusedGemmSchedule::kPingPong
           : v == "multicast" ? FusedGemmSchedule::kMulticast
                              : FusedGemmSchedule::kCooperative;
  }();
  return schedule;
}

bool fused_gemm_plain_supported(const void* A, int64_t lda, const void* B, int64_t ldb, int64_t N, int64_t K,
                                const void* D, int64_t ldd) {
  return K >= 1 && K % 8 == 0 && N >= 1 && N % 8 == 0 && operand_ok(A, lda, K) && operand_ok(B, ldb, K) && D &&
         aligned(D) && ldd % 8 == 0 && ldd >= N;
}
bool fused_gemm_gated_forward_supported(const void* x, int64_t ldx, const void* w1, int64_t K, int64_t d_ff,
                                        const void* h, const void* o) {
  return K >= 1 && K % 8 == 0 && d_ff >= 128 && d_ff % 128 == 0 && operand_ok(x, ldx, K) && operand_ok(w1, K, K) && h &&
         o && aligned(h) && aligned(o);
}
bool fused_gemm_gated_backward_supported(const void* dy, int64_t ldy, const void* w2t, int64_t K, int64_t d_ff,
                                         const void* h, const void* dh) {
  return K >= 1 && K % 8 == 0 && d_ff >= 256 && d_ff % 256 == 0 && operand_ok(dy, ldy, K) && operand_ok(w2t, K, K) &&
         h && dh && aligned(h) && aligned(dh);
}

void fused_gemm_plain(cudaStream_t s, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t M,
                      int64_t N, int64_t K, uint16_t* D, int64_t ldd, FusedGemmSchedule schedule) {
  MAMBA3_CHECK(fused_gemm_plain_supported(A, lda, B, ldb, N, K, D, ldd),
               "fused_gemm_plain: unsupported operands (N {} K {} lda {} ldb {} ldd {}: 16-byte aligned rows, K and "
               "N multiples of 8)",
               N, K, lda, ldb, ldd);
  Args p{};
  p.M = M, p.K = K, p.n_valid = N, p.out = D, p.ldo = ldd;
  launch<kPlain>(s, schedule, A, lda, B, ldb, N, p, N);
}

void fused_gemm_mainloop_only(cudaStream_t s, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t M,
                              int64_t N, int64_t K, FusedGemmSchedule schedule) {
  MAMBA3_CHECK(N % 256 == 0 && operand_ok(A, lda, K) && operand_ok(B, ldb, K) && K % 8 == 0,
               "fused_gemm_mainloop_only: unsupported operands (N {} K {})", N, K);
  Args p{};
  p.M = M, p.K = K, p.n_valid = N;
  launch<kNone>(s, schedule, A, lda, B, ldb, N, p, N);  // (n_valid ≥ 0: kNone's store never runs)
}

int fused_gemm_multicast_clusters() {
  return multicast_clusters(fused_gemm_kernel<kPlain, false, true, 0>, Shape<false>::kSmemBytes);
}

void fused_gemm_gated_forward(cudaStream_t s, const uint16_t* x, int64_t ldx, const uint16_t* w1, int64_t M, int64_t K,
                              int64_t d_ff, uint16_t* h, uint16_t* o, FusedGemmSchedule schedule) {
  MAMBA3_CHECK(fused_gemm_gated_forward_supported(x, ldx, w1, K, d_ff, h, o),
               "fused_gemm_gated_forward: unsupported operands (K {} d_ff {} ldx {})", K, d_ff, ldx);
  Args p{};
  p.M = M, p.K = K, p.b_second = int(d_ff), p.out = h, p.ldo = 2 * d_ff, p.out2 = o, p.d_ff = d_ff;
  launch<kGatedForward>(s, schedule, x, ldx, w1, K, 2 * d_ff, p, d_ff);
}

void fused_gemm_gated_backward(cudaStream_t s, const uint16_t* dy, int64_t ldy, const uint16_t* w2t, int64_t M,
                               int64_t K, int64_t d_ff, const uint16_t* h, uint16_t* dh, FusedGemmSchedule schedule) {
  MAMBA3_CHECK(fused_gemm_gated_backward_supported(dy, ldy, w2t, K, d_ff, h, dh),
               "fused_gemm_gated_backward: unsupported operands (K {} d_ff {} ldy {})", K, d_ff, ldy);
  Args p{};
  p.M = M, p.K = K, p.out = dh, p.ldo = 2 * d_ff, p.h = h, p.d_ff = d_ff;
  launch<kGatedBackward>(s, schedule, dy, ldy, w2t, K, d_ff, p, d_ff);
}

}  // namespace mamba3::cuda
