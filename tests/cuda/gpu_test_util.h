#pragma once
// Helpers for the CUDA tests: moving tensors to and from the device, reading a GPU Mamba-3 state back.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/tensor.h"
#include "cuda/cuda_context.h"
#include "cuda/device_buffer.h"
#include "cuda/mamba3_layer_gpu.h"
#include "model/mamba3_mixer.h"

#define MAMBA3_REQUIRE_GPU()                                                              \
  do {                                                                                    \
    if (!::mamba3::cuda::device_info().available) GTEST_SKIP() << "no CUDA device";        \
  } while (0)

namespace mamba3::test {

// The first `count` values of b, after the work on every stream is done.
template <typename T>
std::vector<T> down_vec(const cuda::DeviceBuffer& b, size_t count) {
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> v(count);
  b.download(v.data(), count * sizeof(T));
  return v;
}

// A tensor's bytes as they are, on the device.
inline cuda::DeviceBuffer to_device(const Tensor& t) {
  cuda::DeviceBuffer b(t.nbytes());
  if (t.nbytes()) b.upload(t.raw(), t.nbytes());
  return b;
}

// A float tensor as device activations of `p` (f32, or bf16 rounded to nearest even).
inline cuda::DeviceBuffer to_device_activation(const Tensor& t, cuda::Precision p) {
  Tensor host = t.to(p == cuda::Precision::F32 ? DType::F32 : DType::BF16);
  cuda::DeviceBuffer b(host.nbytes());
  b.upload(host.raw(), host.nbytes());
  return b;
}

inline Tensor from_device_f32(const void* dev, Shape shape) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  MAMBA3_CUDA_CHECK(cudaMemcpy(t.raw(), dev, t.nbytes(), cudaMemcpyDeviceToHost));
  return t;
}

// y = x · Wᵀ in float64 from the values of W (N, K) and of x's first `rows` rows (all when rows < 0), x's rows
// x.dim(1) apart with their first K entries used: the reference of the matrix-product kernels' tests.
inline Tensor product_wt_f64(const Tensor& w, const Tensor& x, int64_t rows = -1) {
  const Tensor w64 = w.to(DType::F64), x64 = x.to(DType::F64);
  const int64_t N = w64.dim(0), K = w64.dim(1), ldx = x64.dim(1), M = rows < 0 ? x64.dim(0) : rows;
  Tensor y = Tensor::empty(DType::F64, {M, N});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const double* xr = x64.data<double>() + m * ldx;
      const double* wr = w64.data<double>() + n * K;
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += xr[k] * wr[k];
      y.data<double>()[m * N + n] = acc;
    }
  return y;
}

// The GatedMLP activation of a (value, gate)-pairs product y (M, N) in float64: act (M, N/2) = y_2j · silu(y_2j+1).
inline Tensor gated_pairs_of_f64(const Tensor& y) {
  const int64_t M = y.dim(0), N = y.dim(1), F = N / 2;
  Tensor act = Tensor::empty(DType::F64, {M, F});
  for (int64_t r = 0; r < M; ++r)
    for (int64_t j = 0; j < F; ++j) {
      const double v = y.data<double>()[r * N + 2 * j], g = y.data<double>()[r * N + 2 * j + 1];
      act.data<double>()[r * F + j] = v * g / (1.0 + std::exp(-g));
    }
  return act;
}
// The same of y = x · Wᵀ.
inline Tensor gated_pairs_f64(const Tensor& w, const Tensor& x) { return gated_pairs_of_f64(product_wt_f64(w, x)); }

// Fills n floats of device memory with NaN, so that unwritten outputs fail the comparisons. The fill runs on the
// legacy default stream, which does not order work on the contexts' non-blocking streams: it is waited for here, so
// that it cannot land after (or during) the kernel under test (the forty-fourth session saw NaN in a stream GEMM
// output that the kernel had written).
inline void poison(void* dev, size_t bytes) {
  MAMBA3_CUDA_CHECK(cudaMemset(dev, 0xff, bytes));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
}

// n bf16 values (bits) on the device, widened to f32 on the host.
inline Tensor from_device_bf16(const uint16_t* dev, Shape shape) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  std::vector<uint16_t> bits(size_t(t.numel()));
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  MAMBA3_CUDA_CHECK(cudaMemcpy(bits.data(), dev, bits.size() * 2, cudaMemcpyDeviceToHost));
  float* d = t.data<float>();
  for (size_t i = 0; i < bits.size(); ++i) {
    const uint32_t w = uint32_t(bits[i]) << 16;
    std::memcpy(d + i, &w, 4);
  }
  return t;
}

// The state of rows [0, batch) as host tensors in the CPU layout (a bf16 ssm state widened to f32).
inline Mamba3State download_state(const cuda::GpuMamba3State& s, const Mamba3Config& c) {
  const int64_t B = s.batch, H = c.nheads(), S = c.num_angles(), P = c.headdim, N = c.d_state, R = c.rank();
  cuda::Mamba3GpuState v = s.rows_from(0);
  Tensor ssm = v.ssm16 ? from_device_bf16(v.ssm16, {B, H, P, N}) : from_device_f32(v.ssm, {B, H, P, N});
  return {from_device_f32(v.angle, {B, H, S}), std::move(ssm), from_device_f32(v.k, {B, R, H, N}),
          from_device_f32(v.v, {B, H, P})};
}

// Writes a host state (CPU layout) into the GPU state.
inline void upload_state(const Mamba3State& h, cuda::GpuMamba3State& s) {
  MAMBA3_CHECK(!s.ssm_bf16, "upload_state: f32 states only");
  cuda::Mamba3GpuState v = s.rows_from(0);
  const Tensor* src[] = {&h.angle, &h.ssm, &h.k, &h.v};
  float* dst[] = {v.angle, v.ssm, v.k, v.v};
  for (int i = 0; i < 4; ++i)
    MAMBA3_CUDA_CHECK(cudaMemcpy(dst[i], src[i]->data<float>(), src[i]->nbytes(), cudaMemcpyHostToDevice));
}

}  // namespace mamba3::test
