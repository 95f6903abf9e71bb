#include "cuda/attention_gpu.h"

#include <cmath>
#include <limits>

#include "model/gated_mlp.h"

namespace mamba3::cuda {

namespace {

int64_t mlp_width_of(const AttentionConfig& c) { return c.mlp_dim ? c.mlp_width() : 0; }

// Whether `cache` has the shapes this layer's new_cache(batch, capacity) gives.
void check_cache(const GpuAttentionCache& cache, const AttentionConfig& c, const char* what) {
  const size_t kv = size_t(cache.batch * cache.capacity * c.kv_heads() * c.head_dim) * sizeof(float);
  const size_t conv = size_t(cache.batch * c.d_conv * c.qkv_dim()) * sizeof(float);
  MAMBA3_CHECK(cache.k.bytes() == kv && cache.v.bytes() == kv && cache.conv.bytes() == conv &&
                   cache.lengths.bytes() == size_t(cache.batch) * sizeof(int32_t),
               "GpuAttentionLayer::{}: the cache (batch {}, capacity {}) was not made by this layer's new_cache", what,
               cache.batch, cache.capacity);
}

}  // namespace

GpuAttentionLayer::GpuAttentionLayer(const AttentionConfig& config, int64_t d_model, const TensorMap& weights,
                                     const std::string& prefix, const std::string& source,
                                     std::set<std::string>* used, Precision precision)
    : config_(config), d_model_(d_model), precision_(precision) {
  const AttentionConfig& a = config_;
  MAMBA3_CHECK(a.num_heads > 0 && a.kv_heads() > 0 && a.num_heads % a.kv_heads() == 0,
               "{}: attention num_heads {} must be a positive multiple of num_heads_kv {}", source, a.num_heads,
               a.kv_heads());
  MAMBA3_CHECK(a.head_dim > 0 && a.head_dim <= detail::kMaxAttentionHeadDim,
               "{}: attention head_dim {} outside the GPU kernel's range [1, {}]", source, a.head_dim,
               detail::kMaxAttentionHeadDim);
  MAMBA3_CHECK(a.rotary_emb_dim >= 0 && a.rotary_emb_dim <= a.head_dim,
               "{}: attention rotary_emb_dim {} outside [0, head_dim {}]", source, a.rotary_emb_dim, a.head_dim);
  MAMBA3_CHECK(a.d_conv >= 0, "{}: attention d_conv {} is negative", source, a.d_conv);
  const int64_t qkv = a.qkv_dim(), mlp = mlp_width_of(a);
  const int64_t ctx_w = a.num_heads * a.head_dim + mlp / 2;

  const Tensor in_w = load_parameter(weights, prefix + "in_proj.weight", {qkv + mlp, d_model}, source, used);
  Tensor in_b;
  if (a.qkv_proj_bias) in_b = load_parameter(weights, prefix + "in_proj.bias", {qkv + mlp}, source, used);
  in_proj_ = GpuMatrix::upload(in_w, precision, a.qkv_proj_bias ? &in_b : nullptr);
  if (a.d_conv > 0) {
    conv_w_ = upload_f32(load_parameter(weights, prefix + "conv1d.weight", {qkv, 1, a.d_conv}, source, used));
    conv_b_ = upload_f32(load_parameter(weights, prefix + "conv1d.bias", {qkv}, source, used));
  }
  const Tensor out_w = load_parameter(weights, prefix + "out_proj.weight", {d_model, ctx_w}, source, used);
  Tensor out_b;
  if (a.out_proj_bias) out_b = load_parameter(weights, prefix + "out_proj.bias", {d_model}, source, used);
  out_proj_ = GpuMatrix::upload(out_w, precision, a.out_proj_bias ? &out_b : nullptr);
}

size_t GpuAttentionLayer::parameter_bytes() const {
  return in_proj_.nbytes() + out_proj_.nbytes() + conv_w_.bytes() + conv_b_.bytes();
}

GpuAttentionCache GpuAttentionLayer::new_cache(int64_t batch, int64_t capacity) const {
  MAMBA3_CHECK(batch > 0 && capacity > 0 && capacity <= std::numeric_limits<int32_t>::max(),
               "GpuAttentionLayer::new_cache: batch {} and capacity {} must be positive (capacity < 2^31)", batch,
               capacity);
  const AttentionConfig& a = config_;
  GpuAttentionCache c;
  c.batch = batch;
  c.capacity = capacity;
  const size_t kv = size_t(batch * capacity * a.kv_heads() * a.head_dim) * sizeof(float);
  c.k.resize(kv);
  c.v.resize(kv);
  c.conv.resize(size_t(batch * a.d_conv * a.qkv_dim()) * sizeof(float));
  c.lengths.resize(size_t(batch) * sizeof(int32_t));
  reserve(c.step_scratch, batch);
  for (DeviceBuffer* b : {&c.k, &c.v, &c.conv, &c.lengths})
    if (!b->empty()) MAMBA3_CUDA_CHECK(cudaMemset(b->raw(), 0, b->bytes()));
  // cudaMemset runs on the legacy stream, which a non-blocking Context stream does not wait for.
  MAMBA3_CUDA_CHECK(cudaDeviceSynchronize());
  return c;
}

void GpuAttentionLayer::reserve(AttentionScratch& s, int64_t n) const {
  const AttentionConfig& a = config_;
  const int64_t H = a.num_heads, hd = a.head_dim, qkv = a.qkv_dim();
  const int64_t mlp = mlp_width_of(a), width = qkv + mlp, ctx_w = H * hd + mlp / 2;
  s.proj.reserve(size_t(n * width) * sizeof(float));
  if (a.d_conv > 0) s.qkv.reserve(size_t(n * qkv) * sizeof(float));
  s.q.reserve(size_t(n * H * hd) * sizeof(float));
  s.ctx.reserve(size_t(n * ctx_w) * activation_size(precision_));
}

void GpuAttentionLayer::run(const Context& ctx, const void* x, int64_t rows, int64_t tokens, GpuAttentionCache& cache,
                            int64_t row0, int64_t start, bool from_lengths, AttentionScratch& s, float* out) const {
  const AttentionConfig& a = config_;
  const int64_t n = rows * tokens, H = a.num_heads, Hkv = a.kv_heads(), hd = a.head_dim, qkv = a.qkv_dim();
  const int64_t mlp = mlp_width_of(a), width = qkv + mlp, ctx_w = H * hd + mlp / 2;
  MAMBA3_CHECK(n * H <= std::numeric_limits<int32_t>::max(), "GpuAttentionLayer: {} tokens × {} heads is too many",
               n, H);
  reserve(s, ctx.padded_rows(n));  // a no-op for the decode step (new_cache sized it)

  linear(ctx, in_proj_, x, n, s.proj.as<float>());  // (n, qkv + mlp)

  detail::AttentionKernelArgs k{};
  k.tok = {rows, tokens, row0, start, cache.lengths.as<int32_t>(), from_lengths};
  k.heads = H;
  k.kv_heads = Hkv;
  k.head_dim = hd;
  k.capacity = cache.capacity;
  k.qkv = qkv;
  k.width = width;
  k.ctx_width = ctx_w;
  k.mlp_half = mlp / 2;
  k.d_conv = a.d_conv;
  k.rotary_dim = a.rotary_emb_dim;
  k.rotary_base = a.rotary_emb_base;
  k.rotary_interleaved = a.rotary_emb_interleaved;
  k.causal = a.causal;
  k.bf16 = precision_ == Precision::BF16;
  k.scale = a.softmax_scale != 0 ? float(a.softmax_scale) : float(1.0 / std::sqrt(double(hd)));
  k.proj = s.proj.as<float>();
  k.qkv_conv = a.d_conv > 0 ? s.qkv.as<float>() : nullptr;
  k.conv_w = conv_w_.as<float>();
  k.conv_b = conv_b_.as<float>();
  k.conv_state = cache.conv.as<float>();
  k.q = s.q.as<float>();
  k.k_cache = cache.k.as<float>();
  k.v_cache = cache.v.as<float>();
  k.ctx = s.ctx.raw();
  detail::attention_middle(ctx.stream(), k);

  linear(ctx, out_proj_, s.ctx.raw(), n, out);  // (n, d_model)
}

void GpuAttentionLayer::prefill(const Context& ctx, const void* x, int64_t L, GpuAttentionCache& cache, int64_t row,
                                int64_t start, float* out) const {
  check_cache(cache, config_, "prefill");
  MAMBA3_CHECK(row >= 0 && row < cache.batch, "GpuAttentionLayer::prefill: row {} outside the cache's batch {}", row,
               cache.batch);
  MAMBA3_CHECK(L >= 0 && start >= 0 && start + L <= cache.capacity,
               "GpuAttentionLayer::prefill: {} tokens after {} exceed the cache capacity {}", L, start,
               cache.capacity);
  if (L == 0) return;
  run(ctx, x, 1, L, cache, row, start, false, prefill_scratch_, out);
  detail::attention_set_length(ctx.stream(), cache.lengths.as<int32_t>(), row, start + L);
}

void GpuAttentionLayer::step(const Context& ctx, const void* x, int64_t B, GpuAttentionCache& cache,
                             float* out) const {
  check_cache(cache, config_, "step");
  MAMBA3_CHECK(B == cache.batch, "GpuAttentionLayer::step: {} tokens for a cache of batch {}", B, cache.batch);
  run(ctx, x, B, 1, cache, 0, 0, true, cache.step_scratch, out);
  detail::attention_bump_lengths(ctx.stream(), cache.lengths.as<int32_t>(), B);
}

void GpuAttentionLayer::copy_row(const Context& ctx, const GpuAttentionCache& from, int64_t src, GpuAttentionCache& to,
                                 int64_t dst) {
  MAMBA3_CHECK(src >= 0 && src < from.batch && dst >= 0 && dst < to.batch,
               "GpuAttentionLayer::copy_row: rows {} (of {}) → {} (of {}) out of range", src, from.batch, dst,
               to.batch);
  MAMBA3_CHECK(from.capacity == to.capacity && from.k.bytes() / size_t(from.batch) == to.k.bytes() / size_t(to.batch) &&
                   from.conv.bytes() / size_t(from.batch) == to.conv.bytes() / size_t(to.batch),
               "GpuAttentionLayer::copy_row: caches of different shapes (capacity {} vs {})", from.capacity,
               to.capacity);
  if (&from == &to && src == dst) return;
  const cudaStream_t s = ctx.stream();
  const auto copy = [&](const DeviceBuffer& f, DeviceBuffer& t, size_t row_bytes) {
    if (row_bytes == 0) return;
    MAMBA3_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(t.raw()) + size_t(dst) * row_bytes,
                                      static_cast<const char*>(f.raw()) + size_t(src) * row_bytes, row_bytes,
                                      cudaMemcpyDeviceToDevice, s));
  };
  copy(from.k, to.k, from.k.bytes() / size_t(from.batch));
  copy(from.v, to.v, from.v.bytes() / size_t(from.batch));
  copy(from.conv, to.conv, from.conv.bytes() / size_t(from.batch));
  copy(from.lengths, to.lengths, sizeof(int32_t));
}

}  // namespace mamba3::cuda
