// The SISO build's k and v and the forward state chain in one kernel (launch_kv_chain, mamba3_train_state_chain.h).
// One block per sequence-head walks its chunks as the chain kernel does; per chunk it copies the group's normalised B
// rows (f32), the head's angle codes, its x rows (bf16: v itself) and w into shared memory (cp.async, a chunk ahead),
// forms k with the build's expression (rotated_pair), stores k and v for the cores, and runs the chain's step on k and
// v from shared memory. Against the build writing k and v and the chain reading them back (125M: 150 MB per layer),
// the chain's operands never leave the SM; B's rows are shared by the group's heads, so they mostly come from L2.
// The same bits: k and v are the build's values, the products the chain's tiles and k-steps, the scan's multiply-add.
// With p.kv_forms_q the kernel forms q as well (C's rows through the same buffer), and no build kernel runs.
#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/chunk_core_launch.cuh"
#include "cuda/train/mamba3_train_batched_common.cuh"
#include "cuda/train/mamba3_train_math.cuh"
#include "cuda/train/mamba3_train_state_chain.h"
#include "cuda/train/mma_bf16.cuh"
#include "cuda/train/state_chain_step.cuh"

namespace mamba3::cuda::train_detail {

namespace {

using namespace mma_bf16;
constexpr int kRows = kCoreRows;

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
}

// Byte offsets into the block's shared memory: B's rows (one chunk, f32), with kQ C's rows, the angle codes (up to N/2
// per row), two stages of v (the x rows, bf16) and of w, the chunk's k (the chain's B operand) and, without kQ, the
// state slice written out (kQ stores the state from its fragments, 16 bytes per lane: room for C's rows instead, at
// two blocks per SM).
template <int N, int P, bool kQ>
struct KvChainSmem {
  static constexpr int threads = 4 * P;  // two warps per 16 rows of P, as the chain's 64-row slice
  static constexpr int LDA = P + 8, LDN = N + 8;
  static constexpr size_t raw = 0;
  static constexpr size_t raw_c = raw + size_t(kRows) * N * 4;
  static constexpr size_t codes = raw_c + (kQ ? size_t(kRows) * N * 4 : 0);
  static constexpr size_t a = codes + size_t(kRows) * (N / 2) * 2;
  static constexpr size_t w = a + 2 * size_t(kRows) * LDA * 2;
  static constexpr size_t k = w + 2 * size_t(kRows) * 4;
  static constexpr size_t out = k + size_t(kRows) * LDN * 2;
  static constexpr size_t bytes = out + (kQ ? 0 : size_t(P) * LDN * 2);
};

// kQ (p.kv_forms_q): q too, from C's rows staged beside B's (no build kernel at all).
template <int N, int P, bool kQ>
__global__ void __launch_bounds__(KvChainSmem<N, P, kQ>::threads, 2)
    kv_chain_kernel(const BatchedParams p, void* out16) {
  pdl_wait();
  if (p.q_beside) pdl_trigger();  // (q's build beside this kernel: build_q_beside_kernel)
  using Sm = KvChainSmem<N, P, kQ>;
  constexpr int kThreads = Sm::threads, LDA = Sm::LDA, LDN = Sm::LDN, NT = N / 16, kRowWarps = P / 16;
  // Forming k: a thread keeps one rotary pair u and takes every kRowStep-th row (a warp: one row's consecutive pairs).
  constexpr int kPairs = N / 2, kRowStep = kThreads / kPairs;
  static_assert(kThreads % kPairs == 0 && kRows % kRowStep == 0, "whole rows per pass of the block");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sRaw = reinterpret_cast<float*>(smem_raw + Sm::raw);
  [[maybe_unused]] float* sRawC = reinterpret_cast<float*>(smem_raw + Sm::raw_c);
  uint16_t* sCode = reinterpret_cast<uint16_t*>(smem_raw + Sm::codes);
  bf16* sA0 = reinterpret_cast<bf16*>(smem_raw + Sm::a);
  float* sW0 = reinterpret_cast<float*>(smem_raw + Sm::w);
  bf16* sK = reinterpret_cast<bf16*>(smem_raw + Sm::k);
  [[maybe_unused]] bf16* sOut = reinterpret_cast<bf16*>(smem_raw + Sm::out);
  const MixerDims& d = p.d;
  const int64_t bh = blockIdx.x;
  const int b = int(bh / d.H), h = int(bh % d.H), g = h / (d.H / d.G), nc = p.nc, S = d.S;
  const int warp = threadIdx.x / 32;
  const int pr = 16 * (warp % kRowWarps), n0 = (N / 2) * (warp / kRowWarps);  // the warp's product tile
  const int u = int(threadIdx.x) % kPairs, r0 = int(threadIdx.x) / kPairs;    // the thread's pair and first row
  const bool rot = u < S;
  const int x_pitch = 2 * d.d_inner;
  // The group's rows of B or C (zx's columns from `off`) of the 64 tokens from tok0 into sRaw: N floats a row, N/4
  // pieces of 16 bytes.
  const auto copy_rows = [&](float* dst, int64_t tok0, int off) {
    constexpr int per_row = N / 4, pieces = kRows * per_row;
    static_assert(pieces % kThreads == 0, "whole passes over the rows");
    const float* src = p.zx + tok0 * d.din + off + int64_t(g) * N;
#pragma unroll
    for (int j = 0; j < pieces / kThreads; ++j) {
      const int k = int(threadIdx.x) + j * kThreads, r = k / per_row, c = k % per_row * 4;
      cp_async16(dst + r * N + c, src + int64_t(r) * d.din + c);
    }
  };
  // k = Rot(B + bias, φ) rounded to bf16 (the build's rotated_pair) for the thread's pair of every kRowStep-th row,
  // to K and to the chain's tile; with kQ also q = Rot(C + bias, φ) to Q, from the same angle's cos and sin.
  const auto form = [&](int64_t chunk) {
    // (the heads' bias pairs, loaded per chunk: held across the walk they would cost the chain's registers)
    const int64_t bi = int64_t(h) * N + 2 * u;
    const float2 bk = make_float2(__ldg(p.B_bias + bi), __ldg(p.B_bias + bi + 1));
    [[maybe_unused]] float2 bq;
    if constexpr (kQ) bq = make_float2(__ldg(p.C_bias + bi), __ldg(p.C_bias + bi + 1));
    bf16* kg = static_cast<bf16*>(p.K) + chunk * kRows * N + 2 * u;
    [[maybe_unused]] bf16* qg = static_cast<bf16*>(p.Q) + chunk * kRows * N + 2 * u;
#pragma unroll 2
    for (int r = r0; r < kRows; r += kRowStep) {
      const float2 cs = rot ? rotary_cos_sin(angle_from_code(sCode[r * S + u])) : make_float2(1.0f, 0.0f);
      const float2 bv = *reinterpret_cast<const float2*>(sRaw + r * N + 2 * u);
      const __nv_bfloat162 ko = batched::rotated_pair(bv.x, bv.y, bk.x, bk.y, cs.x, cs.y, rot);
      *reinterpret_cast<__nv_bfloat162*>(sK + r * LDN + 2 * u) = ko;
      *reinterpret_cast<__nv_bfloat162*>(kg + r * N) = ko;
      if constexpr (kQ) {
        const float2 cv = *reinterpret_cast<const float2*>(sRawC + r * N + 2 * u);
        *reinterpret_cast<__nv_bfloat162*>(qg + r * N) = batched::rotated_pair(cv.x, cv.y, bq.x, bq.y, cs.x, cs.y, rot);
      }
    }
  };
  // Chunk i's inputs into shared memory (v and w into stage i % 2); an empty group past the last chunk.
  const auto issue = [&](int i) {
    if (i < nc) {
      const int64_t chunk = bh * nc + i, tok0 = int64_t(b) * d.L + int64_t(i) * kRows;
      copy_rows(sRaw, tok0, d.off_B);
      if constexpr (kQ) copy_rows(sRawC, tok0, d.off_C);
      {  // the chunk's angle codes: 64 rows of S, contiguous
        const uint16_t* src = p.phi_code + (bh * d.L + int64_t(i) * kRows) * S;
        for (int k = threadIdx.x; k < kRows * S / 8; k += kThreads) cp_async16(sCode + 8 * k, src + 8 * k);
      }
      const bf16* x16 = reinterpret_cast<const bf16*>(p.zx16) + tok0 * x_pitch + d.off_x + int64_t(h) * P;
      copy_tile<kThreads, kRows, P>(sA0 + (i % 2) * kRows * LDA, LDA, x16, x_pitch);
      if (threadIdx.x < kRows / 4)
        cp_async16(sW0 + (i % 2) * kRows + 4 * threadIdx.x, p.wv + chunk * kRows + 4 * threadIdx.x);
    }
    asm volatile("cp.async.commit_group;");
  };

  issue(0);
  float st[NT][4];
  zero(st);
  for (int i = 0; i < nc; ++i) {
    const int64_t chunk = bh * nc + i;
    const float dc = p.decay[chunk];
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();  // chunk i's inputs are in; the last step's reads of k and of the state slice are done
    const bf16* sA = sA0 + (i % 2) * kRows * LDA;
    const float* sW = sW0 + (i % 2) * kRows;
    form(chunk);          // k (and with kQ q)
    // (without kQ: the state entering chunk i, rounded as the chain rounds it, into the slice)
    if constexpr (!kQ) chain_step::store_slice(st, sOut, LDN, pr, n0);
    __syncthreads();  // k (and the slice) whole; the rows and the codes are free for the next chunk
    issue(i + 1);
    if constexpr (kQ) {  // the state entering chunk i from the fragments (pack's rounding: the chain's bits)
      bf16* og = static_cast<bf16*>(out16) + chunk * P * N;
      if constexpr (NT % 4 == 0)
        store_tiles_bf16(st, og, N, pr, n0);
      else
        store_tiles(st, reinterpret_cast<uint16_t*>(og), N, pr, n0);
    } else {  // the slice to out16
      chain_step::store_tile_16b<kThreads, P, N>(static_cast<bf16*>(out16) + chunk * P * N, sOut, LDN);
    }
    // v = x (bf16) to V (stage i % 2 is next written by issue(i + 2), after the next chunk's second barrier), then the
    // chain's step on w ⊙ v and k (state_chain_step.cuh)
    chain_step::store_tile_16b<kThreads, kRows, P>(static_cast<bf16*>(p.V) + chunk * kRows * P, sA, LDA);
    chain_step::scaled_step<kRows>(st, sA, LDA, sW, sK, LDN, pr, n0, dc);
  }
}

}  // namespace

bool kv_chain_supported(const BatchedParams& p) {
  const MixerDims& d = p.d;
  // (the SISO build's full-chunk kernel writes q: build_siso_applies and its `full` condition)
  return core_shape_supported(p) && p.siso_kernels && p.build_fast && !d.mimo && p.T == kRows && d.L % kRows == 0 &&
         p.vw_formed && d.off_C % 4 == 0 && !p.qk_rotated_only && p.zx16 && p.phi_code && p.wv && d.S >= 0 &&
         d.S % 8 == 0 && d.S <= d.N / 2 && d.din % 4 == 0 && d.off_B % 4 == 0 && d.off_x % 8 == 0 &&
         d.d_inner % 4 == 0 && d.G >= 1 && d.H % d.G == 0;
}

void launch_kv_chain(cudaStream_t s, const BatchedParams& p, void* out16) {
  MAMBA3_CHECK(kv_chain_supported(p),
               "kv chain: unsupported layer (SISO bf16, whole 64-token chunks, w ⊙ v formed, "
               "bf16 x, angle codes with S % 8 = 0)");
  MAMBA3_CHECK(p.K && p.V && p.decay && out16 && (p.Q || !p.kv_forms_q),
               "kv chain: Q, K, V, the decays or the output is null");
  MAMBA3_CHECK(!(p.kv_forms_q && p.q_beside), "kv chain: q formed here and q's build beside it");
  if (p.nc == 0) return;
  const int64_t blocks = int64_t(p.d.B) * p.d.H;
  MAMBA3_CHECK(blocks <= 0x7fffffff, "kv chain: {} blocks exceed the grid", blocks);
  dispatch_core_shape(p, [&](auto n, auto pp) {
    constexpr int N = decltype(n)::value, P = decltype(pp)::value;
    const auto go = [&](auto with_q) {
      constexpr bool kQ = decltype(with_q)::value;
      using Sm = KvChainSmem<N, P, kQ>;
      static const cudaError_t opted = cudaFuncSetAttribute(  // (once per instance)
          kv_chain_kernel<N, P, kQ>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Sm::bytes));
      MAMBA3_CUDA_CHECK(opted);
      launch_train(kv_chain_kernel<N, P, kQ>, unsigned(blocks), Sm::threads, Sm::bytes, s, p, out16);
    };
    if (p.kv_forms_q)
      go(std::true_type{});
    else
      go(std::false_type{});
    MAMBA3_LAUNCH_CHECK();
  });
}

}  // namespace mamba3::cuda::train_detail
