#pragma once
// The whole Mamba-3 language model (spec §9) on one GPU: weights uploaded once, decode states and KV caches on the
// device, prefill of a batch of equal-length prompts, and a decode step that can be captured once as a CUDA graph
// and replayed. Same semantics as LanguageModel on the CPU (model/language_model.h).
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "cuda/cuda_context.h"
#include "cuda/weight_prefetch.h"
#include "model/model_config.h"

namespace mamba3::cuda {

class CudaModel;
class GpuSampler;

// Everything a batch of sequences carries between calls on the device, plus the decode step's buffers (fixed
// addresses, so a graph captured for this cache stays valid) and that graph.
class GpuCache {
 public:
  GpuCache(GpuCache&&) noexcept;
  GpuCache& operator=(GpuCache&&) noexcept;
  ~GpuCache();

  int64_t batch() const;
  int64_t capacity() const;  // tokens per row the attention caches hold (unused by pure Mamba-3 models)
  int64_t position(int64_t row) const;
  // Device buffers of the decode step: ids (batch) int32 in, logits (batch, V_pad) f32 out.
  int32_t* device_ids() const;
  float* device_logits() const;
  // Copies host logits (batch, V_pad) into device_logits() (to sample the first token after a prefill).
  void upload_logits(const Tensor& logits) const;

 private:
  friend class CudaModel;
  struct Impl;
  explicit GpuCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class CudaModel {
 public:
  static CudaModel load(const std::string& dir, Precision precision);
  CudaModel(const ModelConfig& config, const TensorMap& weights, const std::string& source, Precision precision);
  CudaModel(CudaModel&&) noexcept;
  ~CudaModel();

  const ModelConfig& config() const;
  Precision precision() const;
  const Context& context() const;
  size_t parameter_bytes() const;       // on the device
  // Per sequence of a cache of `batch` rows (the deferred writes' interval and ring depend on it).
  size_t state_bytes_per_sequence(int64_t batch = 1) const;
  // Bytes of Mamba-3 state a decode step reads and writes per sequence of a `batch`-row cache: every state read, and
  // written back — the ssm state by 1/every of the heads with deferred writes (set_state_writes_every).
  double decode_state_traffic_per_sequence(int64_t batch = 1) const;

  // The Mamba-3 ssm state of caches made after this call: F32 (default) or BF16 (half the state bytes: read as f32,
  // written rounded to nearest even each step; the arithmetic stays f32). Angle, k and v states stay f32.
  void set_state_precision(Precision p);
  Precision state_precision() const;

  // Caches made after this call write each Mamba-3 head's state every `every`-th decode step (1, 2 or 4; 0 = by
  // layer and batch: SISO every 4 in caches of ≥ 128 rows and every 2 below, MIMO every 2; default
  // MAMBA3_DECODE_STATE_WRITES, else 0) where the layer's decode kernel
  // can defer (mamba3_decode_gpu.h, "Deferred state writes"): the step reads every state but writes 1/every of them.
  // Results equal the every-step writes up to f32 rounding; prefill, copy_row and reset_row keep the exact semantics.
  void set_state_writes_every(int every);
  // The interval the first Mamba-3 layer's caches of `batch` rows get (1 where it does not defer).
  int state_writes_every(int64_t batch = 1) const;

  // A zeroed cache of `batch` rows; attention layers hold up to `capacity` tokens per row.
  GpuCache new_cache(int64_t batch, int64_t capacity = 4096) const;

  // Feeds `batch` prompts of `length` tokens each (ids row-major (batch, length)) into rows [row0, row0 + batch)
  // of `cache`, continuing their states. Returns the logits (batch, V_pad) of each prompt's last position, or of
  // every position (batch·length, V_pad) when all_logits, on the host.
  Tensor prefill(std::span<const int64_t> ids, int64_t batch, int64_t length, GpuCache& cache, int64_t row0 = 0,
                 bool all_logits = false) const;

  // One token for every row: ids (batch) → logits (batch, V_pad) on the host.
  void step(std::span<const int64_t> ids, GpuCache& cache, Tensor& logits) const;
  // The device-resident form: reads cache.device_ids(), writes cache.device_logits(), no host transfer or sync.
  // With graphs on (default), the first call runs eagerly, the second captures the step, later calls replay it.
  // With a sampler, the step also samples the next ids from the logits into cache.device_ids() (captured in the
  // same graph), so a generation loop moves only the chosen ids to the host.
  void step_device(GpuCache& cache, const GpuSampler* sampler = nullptr) const;

  // Rows joining and leaving a fixed batch (the server's slots). set_active: only rows with active[r] != 0 take part
  // in later decode steps — the Mamba-3 kernels skip the others' state (unchanged, no bandwidth spent), their
  // positions do not advance and the capacity check ignores them; their logits and sampled ids are meaningless.
  // Rows start active. The mask lives on the device (a captured graph stays valid); the copy is queued on the
  // model's stream. Attention layers of inactive rows still append to their KV cache (never past its capacity);
  // copy_row overwrites all of that when a sequence takes the row.
  void set_active(GpuCache& cache, std::span<const uint8_t> active) const;
  // Row dst_row of `dst` becomes a copy of row src_row of `src` (Mamba-3 states, attention KV up to the row's
  // position, conv state, position). The caches must come from this model with equal attention capacity. Queued
  // on the model's stream (device-to-device copies). Caches of different state write intervals (the automatic one
  // depends on the batch): the source row's pending tokens are folded into its state first (equal up to f32 rounding,
  // as any write step), and the copy starts with none pending.
  void copy_row(const GpuCache& src, int64_t src_row, GpuCache& dst, int64_t dst_row) const;
  // Row `row` of `cache` becomes empty: zero Mamba-3 states, no attention tokens, position 0 (queued on the model's
  // stream).
  void reset_row(GpuCache& cache, int64_t row) const;
  // Bytes of one row of `cache` on the device (states, and the attention capacity).
  size_t row_bytes(const GpuCache& cache) const;
  void set_use_graphs(bool on);
  // Decode steps fold the RMSNorms into the products where the model allows (bf16, SISO Mamba-3 + GatedMLP blocks,
  // RMSNorms and products without biases) and the products take it: one-row steps on the matrix-vector kernel
  // (gemv_small_m.h), 65–128-row steps on the stream GEMM's wide class where linear() routes them there
  // (MAMBA3_STREAM_GEMM=all; stream_gemm.h): no add + norm kernel between products, results within bf16 rounding of
  // the unfolded step. Default: MAMBA3_DECODE_NORM_FOLD (1 | 0, default 1). Caches capture their graph on their second
  // step: set this before stepping.
  void set_fold_norms(bool on);
  // Whether a decode step of `rows` rows folds them now (the switch, the model's shapes and the products' route).
  bool decode_folds_norms(int64_t rows = 1) const;
  // Prefill's matrix products in fixed blocks of `rows` rows (0: off, the default): a prompt's results then do not
  // depend on how many prompts are prefilled in the same call (the server's exact batched prefill), at the cost of
  // padding the last block. Decode steps are unaffected.
  void set_prefill_row_block(int64_t rows);
  // Decode steps request each matrix product's weights into L2 ahead of the product (weight_prefetch.h; results are
  // unchanged: the requests only warm the cache). Default: weight_prefetch_from_env(). Caches capture their graph on
  // their second step: set this before stepping.
  void set_weight_prefetch(const WeightPrefetchOptions& options);
  // Weight requests the last queued decode step made (0 when it made none; a captured graph replays the requests of
  // the step it captured without queuing them again).
  size_t weight_prefetch_requests() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mamba3::cuda
