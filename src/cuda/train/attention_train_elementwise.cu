// Element-wise kernels of the GPU attention mixer's training pass: bias, deterministic column sums, rotary table,
// conv, q/k/v split with rotary (and its transpose), MLP branch. One thread per output element with grid-stride
// loops; each mirrors the arithmetic order of train/attention_layer_grad.cpp so f32 results agree to rounding.
#include <cmath>

#include "cuda/cuda_check.h"
#include "cuda/pdl.h"
#include "cuda/train/attention_train_kernels.h"

namespace mamba3::cuda::attn_train {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return unsigned(b < 1 ? 1 : (b > 65536 ? 65536 : b));  // grid-stride loops cover the rest
}

#define GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + expf(-g)); }

// Cost: rows·cols reads and writes.
__global__ void add_bias_kernel(float* y, int64_t rows, int64_t cols, int64_t ld, const float* bias) {
  pdl_wait();
  GRID_STRIDE(i, rows * cols) {
    const int64_t r = i / cols, c = i - r * cols;
    y[r * ld + c] += bias[c];
  }
}

// partial[chunk, c] = Σ over the chunk's rows of src[r, c] in float64 (threads along c: coalesced reads).
__global__ void column_partial_kernel(const float* src, int64_t rows, int64_t cols, int64_t ld, int64_t chunks,
                                      double* partial) {
  pdl_wait();
  GRID_STRIDE(i, chunks * cols) {
    const int64_t chunk = i / cols, c = i - chunk * cols;
    const int64_t r1 = (chunk + 1) * kSumChunk < rows ? (chunk + 1) * kSumChunk : rows;
    double acc = 0;
    for (int64_t r = chunk * kSumChunk; r < r1; ++r) acc += src[r * ld + c];
    partial[i] = acc;
  }
}

// dst[c] += Σ_chunk partial[chunk, c], chunks in order.
__global__ void sum_partials_kernel(const double* partial, int64_t chunks, int64_t cols, float* dst) {
  pdl_wait();
  GRID_STRIDE(c, cols) {
    double acc = 0;
    for (int64_t k = 0; k < chunks; ++k) acc += partial[k * cols + c];
    dst[c] += float(acc);
  }
}

__global__ void rope_table_kernel(int64_t L, int64_t rot_dim, double base, float* cos_t, float* sin_t) {
  pdl_wait();
  const int64_t half = rot_dim / 2;
  GRID_STRIDE(i, L * half) {
    const int64_t t = i / half, j = i - t * half;
    const double angle = double(t) * pow(base, -2.0 * double(j) / double(rot_dim));
    cos_t[i] = float(cos(angle));
    sin_t[i] = float(sin(angle));
  }
}

// out[t] = b + Σ_{k ≥ K−1−t} w[k]·in[t − (K−1) + k], k ascending as the CPU. Cost: B·L·qkv·K FMAs.
__global__ void conv_forward_kernel(Dims d, const float* proj, const float* conv_w, const float* conv_b,
                                    float* out) {
  pdl_wait();
  const int64_t K = d.d_conv, qkv = d.qkv;
  GRID_STRIDE(i, d.B * d.L * qkv) {
    const int64_t r = i / qkv, ch = i - r * qkv, t = r % d.L;
    float acc = conv_b ? conv_b[ch] : 0.0f;
    for (int64_t k = (K - 1 - t > 0 ? K - 1 - t : 0); k < K; ++k)
      acc += conv_w[ch * K + k] * proj[(r - (K - 1) + k) * d.width + ch];
    out[i] = acc;
  }
}

// Channel c of a head (hd channels at xh) after rotary with cos/sin row (cs, sn); sign −1 rotates backwards (the
// transpose). Channels past 2·half pass through.
__device__ __forceinline__ float rotate(const float* xh, int64_t c, int64_t half, bool interleaved, const float* cs,
                                        const float* sn, float sign) {
  if (c >= 2 * half) return xh[c];
  int64_t i;
  bool first;
  float a, b;
  if (interleaved) {
    i = c / 2;
    first = (c % 2) == 0;
    a = xh[2 * i];
    b = xh[2 * i + 1];
  } else {
    first = c < half;
    i = first ? c : c - half;
    a = xh[i];
    b = xh[i + half];
  }
  const float co = cs[i], si = sign * sn[i];
  return first ? a * co - b * si : b * co + a * si;
}

// Cost: B·L·qkv reads and writes.
__global__ void split_rotary_kernel(Dims d, const float* src, int64_t src_ld, const float* cos_t, const float* sin_t,
                                    float* q, float* k, float* v) {
  pdl_wait();
  const int64_t qkv = d.qkv, hd = d.hd, nq = d.H * hd, nk = d.Hkv * hd;
  GRID_STRIDE(i, d.B * d.L * qkv) {
    const int64_t r = i / qkv, j = i - r * qkv, t = r % d.L;
    const float* row = src + r * src_ld;
    const float* cs = cos_t + t * d.rot_half;
    const float* sn = sin_t + t * d.rot_half;
    if (j < nq) {
      q[r * nq + j] = rotate(row + (j / hd) * hd, j % hd, d.rot_half, d.interleaved, cs, sn, 1.0f);
    } else if (j < nq + nk) {
      const int64_t jj = j - nq;
      k[r * nk + jj] = rotate(row + nq + (jj / hd) * hd, jj % hd, d.rot_half, d.interleaved, cs, sn, 1.0f);
    } else {
      v[r * nk + (j - nq - nk)] = row[j];
    }
  }
}

// Cost: B·L·qkv reads and writes.
__global__ void unrotate_pack_kernel(Dims d, const float* dq, const float* dk, const float* dv, const float* cos_t,
                                     const float* sin_t, float* dst, int64_t dst_ld) {
  pdl_wait();
  const int64_t qkv = d.qkv, hd = d.hd, nq = d.H * hd, nk = d.Hkv * hd;
  GRID_STRIDE(i, d.B * d.L * qkv) {
    const int64_t r = i / qkv, j = i - r * qkv, t = r % d.L;
    const float* cs = cos_t + t * d.rot_half;
    const float* sn = sin_t + t * d.rot_half;
    float val;
    if (j < nq) {
      val = rotate(dq + r * nq + (j / hd) * hd, j % hd, d.rot_half, d.interleaved, cs, sn, -1.0f);
    } else if (j < nq + nk) {
      const int64_t jj = j - nq;
      val = rotate(dk + r * nk + (jj / hd) * hd, jj % hd, d.rot_half, d.interleaved, cs, sn, -1.0f);
    } else {
      val = dv[r * nk + (j - nq - nk)];
    }
    dst[r * dst_ld + j] = val;
  }
}

// Cost: B·L·mlp/2 outputs, 2 reads each.
__global__ void mlp_forward_kernel(Dims d, const float* proj, float* ctx) {
  pdl_wait();
  const int64_t F = d.mlp_half, off = d.H * d.hd;
  GRID_STRIDE(i, d.B * d.L * F) {
    const int64_t r = i / F, j = i - r * F;
    const float* m = proj + r * d.width + d.qkv;
    const float gate = m[F + j];
    ctx[r * d.ctx_w + off + j] = m[j] * (gate * sigmoid_f(gate));
  }
}

// dup = g·silu(gate), dgate = g·up·σ·(1 + gate·(1 − σ)), the CPU's expressions.
__global__ void mlp_backward_kernel(Dims d, const float* proj, const float* dctx, float* dproj) {
  pdl_wait();
  const int64_t F = d.mlp_half, off = d.H * d.hd;
  GRID_STRIDE(i, d.B * d.L * F) {
    const int64_t r = i / F, j = i - r * F;
    const float* m = proj + r * d.width + d.qkv;
    float* dm = dproj + r * d.width + d.qkv;
    const float up = m[j], gate = m[F + j], sg = sigmoid_f(gate), gj = dctx[r * d.ctx_w + off + j];
    dm[j] = gj * gate * sg;
    dm[F + j] = gj * up * sg * (1.0f + gate * (1.0f - sg));
  }
}

// Input gradient of the conv, gathered: in[t'] feeds out[t' + (K−1) − k] through tap k (same sequence only).
// Taps in descending k, the order in which the CPU's scatter adds them. Cost: B·L·qkv·K FMAs.
__global__ void conv_backward_input_kernel(Dims d, const float* dqkv, const float* conv_w, float* dproj) {
  pdl_wait();
  const int64_t K = d.d_conv, qkv = d.qkv;
  GRID_STRIDE(i, d.B * d.L * qkv) {
    const int64_t r = i / qkv, ch = i - r * qkv, t = r % d.L;
    float acc = 0.0f;
    for (int64_t k = K - 1; k >= 0; --k) {
      const int64_t shift = K - 1 - k;  // the output row is r + shift
      if (t + shift < d.L) acc += dqkv[(r + shift) * qkv + ch] * conv_w[ch * K + k];
    }
    dproj[r * d.width + ch] = acc;
  }
}

// Per row chunk, float64: pw[chunk, ch·K + k] = Σ dqkv[r, ch]·in[r − (K−1) + k, ch], pb[chunk, ch] = Σ dqkv[r, ch].
// One thread per (chunk, ch, k ∈ [0, K]), k = K being the bias.
__global__ void conv_backward_partial_kernel(Dims d, const float* dqkv, const float* proj, int64_t chunks, double* pw,
                                             double* pb) {
  pdl_wait();
  const int64_t K = d.d_conv, qkv = d.qkv, rows = d.B * d.L, per = K + 1;
  GRID_STRIDE(i, chunks * qkv * per) {
    const int64_t chunk = i / (qkv * per), rest = i - chunk * qkv * per, ch = rest / per, k = rest - ch * per;
    const int64_t r0 = chunk * kSumChunk, r1 = r0 + kSumChunk < rows ? r0 + kSumChunk : rows;
    double acc = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const double go = dqkv[r * qkv + ch];
      if (k == K) {
        acc += go;
      } else if (r % d.L >= K - 1 - k) {
        acc += go * double(proj[(r - (K - 1) + k) * d.width + ch]);
      }
    }
    if (k == K)
      pb[chunk * qkv + ch] = acc;
    else
      pw[chunk * qkv * K + ch * K + k] = acc;
  }
}

}  // namespace

void add_bias_rows(cudaStream_t s, float* y, int64_t rows, int64_t cols, int64_t ld, const float* bias) {
  if (rows * cols == 0) return;
  launch_train(add_bias_kernel, blocks_for(rows * cols), kThreads, 0, s, y, rows, cols, ld, bias);
  MAMBA3_LAUNCH_CHECK();
}

void column_sum_add(cudaStream_t s, const float* src, int64_t rows, int64_t cols, int64_t ld, double* partial,
                    float* dst) {
  if (rows == 0 || cols == 0) return;
  const int64_t chunks = sum_chunks(rows);
  launch_train(column_partial_kernel, blocks_for(chunks * cols), kThreads, 0, s, src, rows, cols, ld, chunks, partial);
  MAMBA3_LAUNCH_CHECK();
  launch_train(sum_partials_kernel, blocks_for(cols), kThreads, 0, s, partial, chunks, cols, dst);
  MAMBA3_LAUNCH_CHECK();
}

void rope_table(cudaStream_t s, int64_t L, int64_t rot_dim, double base, float* cos_t, float* sin_t) {
  if (L * (rot_dim / 2) == 0) return;
  launch_train(rope_table_kernel, blocks_for(L * (rot_dim / 2)), kThreads, 0, s, L, rot_dim, base, cos_t, sin_t);
  MAMBA3_LAUNCH_CHECK();
}

void conv_forward(cudaStream_t s, const Dims& d, const float* proj, const float* conv_w, const float* conv_b,
                  float* qkv_out) {
  if (d.B * d.L == 0) return;
  launch_train(conv_forward_kernel, blocks_for(d.B * d.L * d.qkv), kThreads, 0, s, d, proj, conv_w, conv_b, qkv_out);
  MAMBA3_LAUNCH_CHECK();
}

void split_rotary(cudaStream_t s, const Dims& d, const float* src, int64_t src_ld, const float* cos_t,
                  const float* sin_t, float* q, float* k, float* v) {
  if (d.B * d.L == 0) return;
  launch_train(split_rotary_kernel, blocks_for(d.B * d.L * d.qkv), kThreads, 0, s, d, src, src_ld, cos_t, sin_t, q, k,
               v);
  MAMBA3_LAUNCH_CHECK();
}

void unrotate_pack(cudaStream_t s, const Dims& d, const float* dq, const float* dk, const float* dv,
                   const float* cos_t, const float* sin_t, float* dst, int64_t dst_ld) {
  if (d.B * d.L == 0) return;
  launch_train(unrotate_pack_kernel, blocks_for(d.B * d.L * d.qkv), kThreads, 0, s, d, dq, dk, dv, cos_t, sin_t, dst,
               dst_ld);
  MAMBA3_LAUNCH_CHECK();
}

void mlp_forward(cudaStream_t s, const Dims& d, const float* proj, float* ctx) {
  if (d.B * d.L * d.mlp_half == 0) return;
  launch_train(mlp_forward_kernel, blocks_for(d.B * d.L * d.mlp_half), kThreads, 0, s, d, proj, ctx);
  MAMBA3_LAUNCH_CHECK();
}

void mlp_backward(cudaStream_t s, const Dims& d, const float* proj, const float* dctx, float* dproj) {
  if (d.B * d.L * d.mlp_half == 0) return;
  launch_train(mlp_backward_kernel, blocks_for(d.B * d.L * d.mlp_half), kThreads, 0, s, d, proj, dctx, dproj);
  MAMBA3_LAUNCH_CHECK();
}

void conv_backward(cudaStream_t s, const Dims& d, const float* dqkv, const float* proj, const float* conv_w,
                   float* dproj, double* partial, float* dconv_w, float* dconv_b) {
  const int64_t rows = d.B * d.L, K = d.d_conv, chunks = sum_chunks(rows);
  if (rows == 0) return;
  launch_train(conv_backward_input_kernel, blocks_for(rows * d.qkv), kThreads, 0, s, d, dqkv, conv_w, dproj);
  MAMBA3_LAUNCH_CHECK();
  if (!dconv_w && !dconv_b) return;
  double* pw = partial;                     // (chunks, qkv·K)
  double* pb = partial + chunks * d.qkv * K;  // (chunks, qkv)
  const unsigned blocks = blocks_for(chunks * d.qkv * (K + 1));
  launch_train(conv_backward_partial_kernel, blocks, kThreads, 0, s, d, dqkv, proj, chunks, pw, pb);
  MAMBA3_LAUNCH_CHECK();
  if (dconv_w) {
    launch_train(sum_partials_kernel, blocks_for(d.qkv * K), kThreads, 0, s, pw, chunks, d.qkv * K, dconv_w);
    MAMBA3_LAUNCH_CHECK();
  }
  if (dconv_b) {
    launch_train(sum_partials_kernel, blocks_for(d.qkv), kThreads, 0, s, pb, chunks, d.qkv, dconv_b);
    MAMBA3_LAUNCH_CHECK();
  }
}

}  // namespace mamba3::cuda::attn_train
