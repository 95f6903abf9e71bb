// Kernels of the GPU attention mixer (host side in attention_gpu.cpp). Deliberately plain: one thread per element
// for the conv, rotary and copies; one block per (token, head) for the attention, each warp running an online
// softmax over a strided subset of the keys, merged at the end. Everything f32; only the context written for
// out_proj takes the activation dtype.
#include <cuda_bf16.h>

#include <cmath>

#include "cuda/attention_gpu.h"

namespace mamba3::cuda::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = 8;                                       // attention block: 8 warps
constexpr int kPerLane = int(kMaxAttentionHeadDim / 32);        // head channels per lane

unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));  // grid-stride loops cover the rest
}

__device__ __forceinline__ int64_t token_base(const AttentionTokens& tk, int64_t r) {
  return tk.from_lengths ? int64_t(tk.lengths[tk.row0 + r]) : tk.start;
}

// Depthwise causal conv over the qkv columns. For a cache row with state s (K inputs, oldest first) followed by
// this call's inputs x_0 … x_{T−1}, the sequence is seq = s ‖ x, and output t = b + Σ_k w[k]·seq[t + 1 + k] (the
// CPU's shift-then-dot, in the same order of k). Cost: n·qkv·K FMAs.
__global__ void conv_kernel(AttentionKernelArgs a) {
  const int64_t K = a.d_conv, qkv = a.qkv, T = a.tok.tokens, total = a.tok.rows * T * qkv;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tok = i / qkv, ch = i % qkv, r = tok / T, t = tok % T, cr = a.tok.row0 + r;
    float acc = a.conv_b[ch];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = t + 1 + k;
      const float x = j < K ? a.conv_state[(cr * K + j) * qkv + ch] : a.proj[(r * T + j - K) * a.width + ch];
      acc += a.conv_w[ch * K + k] * x;
    }
    a.qkv_conv[tok * qkv + ch] = acc;
  }
}

// The state after the call: the last K entries of seq = s ‖ x. One thread per (row, channel) walks k upwards, so
// it reads s[T + k] before its own later iteration overwrites that slot. Runs after conv_kernel (same stream).
__global__ void conv_state_kernel(AttentionKernelArgs a) {
  const int64_t K = a.d_conv, qkv = a.qkv, T = a.tok.tokens, total = a.tok.rows * qkv;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / qkv, ch = i % qkv, cr = a.tok.row0 + r;
    float* s = a.conv_state + cr * K * qkv + ch;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = T + k;
      s[k * qkv] = j < K ? s[j * qkv] : a.proj[(r * T + j - K) * a.width + ch];
    }
  }
}

// Channel d of one head xh (head_dim channels) after rotary at `pos`: pairs (i, i + dim/2), or (2i, 2i + 1) when
// interleaved, rotated by pos·base^(−2i/dim). The angle in double, cos/sin rounded to f32, as ops/attention.cpp.
__device__ float rotated(const float* xh, int64_t d, int64_t dim, double base, bool interleaved, int64_t pos) {
  const int64_t half = dim / 2;
  if (d >= 2 * half) return xh[d];
  int64_t i;
  float a, b;
  bool first;
  if (interleaved) {
    i = d / 2;
    a = xh[2 * i];
    b = xh[2 * i + 1];
    first = (d % 2) == 0;
  } else {
    i = d < half ? d : d - half;
    a = xh[i];
    b = xh[i + half];
    first = d < half;
  }
  const double angle = double(pos) * pow(base, -2.0 * double(i) / double(dim));
  const float c = float(cos(angle)), s = float(sin(angle));
  return first ? a * c - b * s : b * c + a * s;
}

// Split the qkv columns into q (rotated, to a.q), k (rotated) and v (to the cache at the token's position).
// A position at or past the capacity writes nothing to the cache.
__global__ void split_rotary_kernel(AttentionKernelArgs a) {
  const int64_t qkv = a.qkv, hd = a.head_dim, H = a.heads, Hkv = a.kv_heads, T = a.tok.tokens;
  const int64_t total = a.tok.rows * T * qkv;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tok = i / qkv, j = i % qkv, r = tok / T, t = tok % T, cr = a.tok.row0 + r;
    const int64_t pos = token_base(a.tok, r) + t;
    const float* src = a.qkv_conv ? a.qkv_conv + tok * qkv : a.proj + tok * a.width;
    if (j < H * hd) {
      const int64_t h = j / hd, d = j % hd;
      a.q[tok * H * hd + j] = rotated(src + h * hd, d, a.rotary_dim, a.rotary_base, a.rotary_interleaved, pos);
      continue;
    }
    if (pos >= a.capacity) continue;
    const int64_t slot = (cr * a.capacity + pos) * Hkv * hd;  // (cr, pos, 0, 0) of the cache
    if (j < (H + Hkv) * hd) {
      const int64_t jj = j - H * hd, kvh = jj / hd, d = jj % hd;
      a.k_cache[slot + jj] =
          rotated(src + H * hd + kvh * hd, d, a.rotary_dim, a.rotary_base, a.rotary_interleaved, pos);
    } else {
      a.v_cache[slot + (j - (H + Hkv) * hd)] = src[j];
    }
  }
}

__device__ __forceinline__ void store_act(void* out, int64_t i, float v, bool bf16) {
  if (bf16)
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16(v);
  else
    static_cast<float*>(out)[i] = v;
}

// out[tok, h, :] = Σ_j softmax_j(q·k_j·scale) v_j over keys j < nk of the token's cache row (kv head h / group):
// nk = pos + 1 when causal (bottom-right aligned), else the row's length after this call. One block per (token,
// head), grid index tok·H + h; warp w takes keys w, w + 8, …, lane ℓ channels ℓ, ℓ + 32, …; each warp keeps a
// running max m, sum s and output o, merged across warps at the end. Cost per (token, head): 4·nk·hd FLOPs,
// reads 2·nk·hd floats of cache.
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(AttentionKernelArgs a) {
  __shared__ float sh_m[kWarps], sh_s[kWarps];
  __shared__ float sh_o[kWarps][kMaxAttentionHeadDim];
  const int64_t H = a.heads, Hkv = a.kv_heads, hd = a.head_dim, T = a.tok.tokens;
  const int64_t h = int64_t(blockIdx.x) % H, tok = int64_t(blockIdx.x) / H, r = tok / T, t = tok % T;
  const int64_t cr = a.tok.row0 + r, base = token_base(a.tok, r), pos = base + t;
  int64_t nk = a.causal ? pos + 1 : base + T;
  if (nk > a.capacity) nk = a.capacity;
  const int64_t kvh = h / (H / Hkv);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  float qv[kPerLane], o[kPerLane];
  const float* qp = a.q + (tok * H + h) * hd;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    qv[i] = d < hd ? qp[d] : 0.0f;
    o[i] = 0.0f;
  }
  float m = -INFINITY, s = 0.0f;
  const float* kb = a.k_cache + (cr * a.capacity * Hkv + kvh) * hd;  // key j at kb + j·Hkv·hd
  const float* vb = a.v_cache + (cr * a.capacity * Hkv + kvh) * hd;
  for (int64_t j = warp; j < nk; j += kWarps) {
    const float* kp = kb + j * Hkv * hd;
    const float* vp = vb + j * Hkv * hd;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < hd) dot += qv[i] * kp[d];
    }
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float score = dot * a.scale;
    const float m_new = fmaxf(m, score);
    const float corr = expf(m - m_new);  // 0 for the first key (m = −inf)
    const float p = expf(score - m_new);
    s = s * corr + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < hd) o[i] = o[i] * corr + p * vp[d];
    }
    m = m_new;
  }
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < hd) sh_o[warp][d] = o[i];
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sh_m[w]);
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float num = 0.0f, den = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (sh_m[w] == -INFINITY) continue;  // a warp that saw no key
      const float f = expf(sh_m[w] - mx);
      num += sh_o[w][d] * f;
      den += sh_s[w] * f;
    }
    store_act(a.ctx, tok * a.ctx_width + h * hd + d, num / den, a.bf16);
  }
}

// The MLP branch: ctx[tok, H·hd + j] = up_j ⊙ silu(gate_j), up and gate the halves of the in_proj columns after qkv.
__global__ void mlp_branch_kernel(AttentionKernelArgs a) {
  const int64_t F = a.mlp_half, total = a.tok.rows * a.tok.tokens * F, off = a.heads * a.head_dim;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tok = i / F, j = i % F;
    const float* m = a.proj + tok * a.width + a.qkv;
    const float up = m[j], gate = m[F + j];
    store_act(a.ctx, tok * a.ctx_width + off + j, up * (gate / (1.0f + expf(-gate))), a.bf16);
  }
}

__global__ void set_length_kernel(int32_t* lengths, int64_t row, int64_t value) { lengths[row] = int32_t(value); }

__global__ void bump_lengths_kernel(int32_t* lengths, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    lengths[i] += 1;
}

}  // namespace

void attention_middle(cudaStream_t stream, const AttentionKernelArgs& a) {
  const int64_t n = a.tok.rows * a.tok.tokens;
  if (n == 0) return;
  if (a.d_conv > 0) {
    conv_kernel<<<blocks_for(n * a.qkv, kThreads), kThreads, 0, stream>>>(a);
    MAMBA3_LAUNCH_CHECK();
    conv_state_kernel<<<blocks_for(a.tok.rows * a.qkv, kThreads), kThreads, 0, stream>>>(a);
    MAMBA3_LAUNCH_CHECK();
  }
  split_rotary_kernel<<<blocks_for(n * a.qkv, kThreads), kThreads, 0, stream>>>(a);
  MAMBA3_LAUNCH_CHECK();
  attention_kernel<<<unsigned(n * a.heads), kWarps * 32, 0, stream>>>(a);
  MAMBA3_LAUNCH_CHECK();
  if (a.mlp_half > 0) {
    mlp_branch_kernel<<<blocks_for(n * a.mlp_half, kThreads), kThreads, 0, stream>>>(a);
    MAMBA3_LAUNCH_CHECK();
  }
}

void attention_set_length(cudaStream_t stream, int32_t* lengths, int64_t row, int64_t value) {
  set_length_kernel<<<1, 1, 0, stream>>>(lengths, row, value);
  MAMBA3_LAUNCH_CHECK();
}

void attention_bump_lengths(cudaStream_t stream, int32_t* lengths, int64_t n) {
  if (n == 0) return;
  bump_lengths_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(lengths, n);
  MAMBA3_LAUNCH_CHECK();
}

}  // namespace mamba3::cuda::detail
