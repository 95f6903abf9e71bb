#include "cuda/train/lm_train_gpu.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>

#include "core/error.h"
#include "cuda/basic_kernels.h"
#include "cuda/env_switch.h"
#include "cuda/pinned_buffer.h"
#include "cuda/train/attention_train_gpu.h"
#include "cuda/train/embedding_train_gpu.h"
#include "cuda/train/gated_mlp_train_gpu.h"
#include "cuda/train/lm_head_loss_gpu.h"
#include "cuda/train/mamba3_train_gpu.h"
#include "cuda/train/norm_train_gpu.h"
#include "cuda/train/phase_profile.h"
#include "ops/mamba3_config.h"
#include "ops/mamba3_reference_backward.h"

namespace mamba3::cuda {

namespace {

// MAMBA3_TRAIN_WEIGHT_MIRROR, read once per process: "1" (or unset) gives the bf16 mode's weight products the
// parameter store's bf16 mirror, "0" rounds each weight in each product (GpuLmTrainer::set_weight_mirror).
bool env_weight_mirror() {
  static const bool on = env_choice("MAMBA3_TRAIN_WEIGHT_MIRROR", {"1", "0"}) != "0";
  return on;
}

bool env_block_io16() {
  static const bool on = env_choice("MAMBA3_TRAIN_BLOCK_IO16", {"1", "0"}) != "0";
  return on;
}

struct NormSlot {
  const float *w = nullptr, *b = nullptr;
  float *dw = nullptr, *db = nullptr;
};

}  // namespace

struct GpuLmTrainer::Layer {
  NormSlot norm, norm2;
  bool attention = false;
  Mamba3TrainWeights mw{};
  Mamba3TrainGrads mg{};
  std::unique_ptr<AttentionTrainGpu> attn;
  AttentionTrainWeights aw{};
  AttentionTrainGrads ag{};
  const float *fc1 = nullptr, *fc2 = nullptr;
  const uint16_t *fc1_16 = nullptr, *fc2_16 = nullptr;  // the weight mirror's, set per run (null: none)
  float *dfc1 = nullptr, *dfc2 = nullptr;
  // Activations kept for the backward, (B·L, …) each; grow-only.
  DeviceBuffer res_in, normed, res_mid, normed2, mlp_h, mlp_o;
  // The bf16 mode: the norms' outputs rounded to bf16 by the norm kernel (the products' operands). Mamba-3 and MLP
  // inputs are then kept in bf16 only (their f32 normed / normed2 stay empty); attention keeps f32.
  DeviceBuffer normed16, normed2_16;
  const float* f32_or_null(const DeviceBuffer& b) const { return b.bytes() ? b.as<float>() : nullptr; }
  const uint16_t* bf16_or_null(const DeviceBuffer& b) const { return b.bytes() ? b.as<uint16_t>() : nullptr; }
  Mamba3TrainActivations mamba_kept;  // the mixer's forward, when the trainer keeps it (keep_mamba_)
};

// Buffers of one call, reused across calls (grow-only).
struct GpuLmTrainer::Work {
  DeviceBuffer ids, targets;           // int32 (B·L)
  DeviceBuffer hidden, residual, dnormed, grad;  // f32 (B·L, D)
  DeviceBuffer grad16;                 // bf16 (B·L, D): grad's rounding from the norm backward (bf16 mode)
  DeviceBuffer hidden16, dnormed16;    // bf16 (B·L, D): a block's output / input gradient (set_block_io16)
  DeviceBuffer mlp_scratch;            // f32 (B·L, 3·d_ff): dh, and its bf16 copy in the bf16 mode
  NormGradScratch norm_scratch;
  LmHeadScratch head_scratch;
  EmbeddingGradPlan embedding_plan;  // rebuilt per call without a host wait
  std::unique_ptr<Mamba3TrainGpu> mamba;  // shared by every Mamba-3 layer (it keeps nothing between calls)
  PinnedBuffer host_ids, host_targets;  // int32 (B·L): the ids' upload sources
  PinnedBuffer host_loss;               // one f64: Σ loss over the labelled rows, copied back at the loss
};

GpuLmTrainer::GpuLmTrainer(const ModelConfig& c, const TensorMap& params, Precision precision)
    : config_(c), ctx_(std::make_unique<Context>()), gemm_(precision), work_(std::make_unique<Work>()),
      weight_mirror_(env_weight_mirror()), block_io16_(env_block_io16()) {
  // The parameter list of lm_gradients.cpp: each present with its shape, nothing else.
  std::set<std::string> used;
  auto need = [&](const std::string& name, const Shape& shape) {
    auto it = params.find(name);
    MAMBA3_CHECK(it != params.end(), "GPU training: missing parameter '{}'", name);
    check_shape(it->second, shape, "GPU training: parameter " + name);
    used.insert(name);
  };
  const int64_t D = c.d_model, V = c.vocab_padded(), dff = c.d_ff();
  need("backbone.embedding.weight", {V, D});
  if (!c.tie_embeddings || params.count("lm_head.weight")) need("lm_head.weight", {V, D});
  auto need_norm = [&](const std::string& name) {
    need(name + ".weight", {D});
    if (!c.rms_norm) need(name + ".bias", {D});
  };
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "backbone.layers." + std::to_string(i) + ".";
    need_norm(p + "norm");
    const std::string mp = p + "mixer.";
    if (c.is_attention_layer(i)) {
      const AttentionConfig& a = c.attn;
      const int64_t qkv = a.qkv_dim(), mlp = a.mlp_dim ? a.mlp_width() : 0;
      need(mp + "in_proj.weight", {qkv + mlp, D});
      if (a.qkv_proj_bias) need(mp + "in_proj.bias", {qkv + mlp});
      if (a.d_conv > 0) need(mp + "conv1d.weight", {qkv, 1, a.d_conv}), need(mp + "conv1d.bias", {qkv});
      need(mp + "out_proj.weight", {D, a.num_heads * a.head_dim + mlp / 2});
      if (a.out_proj_bias) need(mp + "out_proj.bias", {D});
    } else {
      for (const auto& [name, shape] : mamba3_parameter_shapes(c.ssm)) need(mp + name, shape);
    }
    if (c.d_intermediate > 0) {
      need_norm(p + "norm2");
      need(p + "mlp.fc1.weight", {2 * dff, D});
      need(p + "mlp.fc2.weight", {D, dff});
    }
  }
  need_norm("backbone.norm_f");
  for (const auto& [name, t] : params)
    MAMBA3_CHECK(used.count(name), "GPU training: unexpected tensor '{}' (not a parameter of this configuration)",
                 name);

  store_ = std::make_unique<GpuParamStore>(params);
  GpuParamStore& s = *store_;
  auto norm_slot = [&](const std::string& name) {
    NormSlot n;
    n.w = s.param(name + ".weight"), n.dw = s.grad(name + ".weight");
    if (!c.rms_norm) n.b = s.param(name + ".bias"), n.db = s.grad(name + ".bias");
    return n;
  };
  auto p_if = [&](const std::string& name) -> float* { return s.has(name) ? s.param(name) : nullptr; };
  auto g_if = [&](const std::string& name) -> float* { return s.has(name) ? s.grad(name) : nullptr; };
  for (int64_t i = 0; i < c.n_layer; ++i) {
    auto l = std::make_unique<Layer>();
    const std::string p = "backbone.layers." + std::to_string(i) + ".", mp = p + "mixer.";
    l->norm = norm_slot(p + "norm");
    if (c.is_attention_layer(i)) {
      l->attention = true;
      l->attn = std::make_unique<AttentionTrainGpu>(c.attn, D);
      l->aw = {p_if(mp + "in_proj.weight"), p_if(mp + "in_proj.bias"), p_if(mp + "conv1d.weight"),
               p_if(mp + "conv1d.bias"), p_if(mp + "out_proj.weight"), p_if(mp + "out_proj.bias")};
      l->ag = {g_if(mp + "in_proj.weight"), g_if(mp + "in_proj.bias"), g_if(mp + "conv1d.weight"),
               g_if(mp + "conv1d.bias"), g_if(mp + "out_proj.weight"), g_if(mp + "out_proj.bias")};
    } else {
      l->mw = {p_if(mp + "in_proj.weight"), p_if(mp + "out_proj.weight"), p_if(mp + "dt_bias"), p_if(mp + "B_bias"),
               p_if(mp + "C_bias"), p_if(mp + "mimo_x"), p_if(mp + "mimo_z"), p_if(mp + "mimo_o"), p_if(mp + "D"),
               p_if(mp + "B_norm.weight"), p_if(mp + "C_norm.weight"), p_if(mp + "norm.weight")};
      l->mg = {g_if(mp + "in_proj.weight"), g_if(mp + "out_proj.weight"), g_if(mp + "dt_bias"), g_if(mp + "B_bias"),
               g_if(mp + "C_bias"), g_if(mp + "mimo_x"), g_if(mp + "mimo_z"), g_if(mp + "mimo_o"), g_if(mp + "D"),
               g_if(mp + "B_norm.weight"), g_if(mp + "C_norm.weight"), g_if(mp + "norm.weight")};
      if (!work_->mamba) work_->mamba = std::make_unique<Mamba3TrainGpu>(c.ssm);
    }
    if (c.d_intermediate > 0) {
      l->norm2 = norm_slot(p + "norm2");
      l->fc1 = s.param(p + "mlp.fc1.weight"), l->dfc1 = s.grad(p + "mlp.fc1.weight");
      l->fc2 = s.param(p + "mlp.fc2.weight"), l->dfc2 = s.grad(p + "mlp.fc2.weight");
    }
    layers_.push_back(std::move(l));
  }
}

GpuLmTrainer::~GpuLmTrainer() = default;

void GpuLmTrainer::decide_keep(int64_t B, int64_t L) {
  keep_B_ = B, keep_L_ = L;
  // MAMBA3_TRAIN_KEEP, read once per process: keep the Mamba-3 mixers' forward activations for their backward ("on"),
  // recompute them ("off"), or keep them when all layers' sets take at most half the free device memory ("auto",
  // the default; 125M at 8 × 2048: ≈ 2 GB per layer).
  static const std::string mode = env_choice("MAMBA3_TRAIN_KEEP", {"auto", "on", "off"});
  int64_t need = 0;
  for (const auto& l : layers_)
    if (!l->attention) need += work_->mamba->activation_bytes(B, L, gemm_.precision()) - int64_t(l->mamba_kept.bytes());
  size_t free_bytes = 0, total = 0;
  MAMBA3_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  // Only the batched chunk path starts its backward from kept activations (the fused one recomputes regardless).
  const bool usable = work_->mamba && work_->mamba->chunk_batched();
  keep_mamba_ = usable && (mode == "on" || (mode != "off" && need <= int64_t(free_bytes / 2)));
  if (!keep_mamba_)
    for (auto& l : layers_) l->mamba_kept = Mamba3TrainActivations{};  // give the memory back
}

double GpuLmTrainer::run(const int64_t* inputs, const int64_t* targets, int64_t B, int64_t L, bool want_grad,
                         double scale) {
  const ModelConfig& c = config_;
  MAMBA3_CHECK(B >= 1 && L >= 1, "GPU training: need B ≥ 1 and L ≥ 1, got B {} L {}", B, L);
  const int64_t N = B * L, D = c.d_model, V = c.vocab_padded(), dff = c.d_ff();
  Work& w = *work_;
  // Ids to int32 on the device (from page-locked memory), checked on the host first.
  w.host_ids.reserve(size_t(N) * 4), w.host_targets.reserve(size_t(N) * 4), w.host_loss.reserve(sizeof(double));
  int32_t *host_ids = w.host_ids.as<int32_t>(), *host_targets = w.host_targets.as<int32_t>();
  int64_t labelled = 0;
  for (int64_t i = 0; i < N; ++i) {
    MAMBA3_CHECK(inputs[i] >= 0 && inputs[i] < c.vocab_size,
                 "GPU training: input {} at row {} position {} is outside the vocabulary [0, {})", inputs[i], i / L,
                 i % L, c.vocab_size);
    MAMBA3_CHECK(targets[i] < c.vocab_size,
                 "GPU training: target {} at row {} position {} is outside the vocabulary [0, {})", targets[i], i / L,
                 i % L, c.vocab_size);
    host_ids[i] = int32_t(inputs[i]);
    host_targets[i] = targets[i] < 0 ? -1 : int32_t(targets[i]);
    labelled += targets[i] >= 0;
  }
  MAMBA3_CHECK(labelled > 0, "GPU training: no position has a target (all {} are negative)", N);
  const cudaStream_t st = ctx_->stream();
  const size_t act = size_t(N * D) * 4;
  w.ids.reserve(size_t(N) * 4), w.targets.reserve(size_t(N) * 4);
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(w.ids.raw(), host_ids, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(w.targets.raw(), host_targets, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  for (DeviceBuffer* b : {&w.hidden, &w.residual, &w.dnormed, &w.grad}) b->reserve(act);
  float* hidden = w.hidden.as<float>();
  float* residual = w.residual.as<float>();
  const float eps = float(c.norm_epsilon);
  GpuParamStore& s = *store_;
  const float* emb = s.param("backbone.embedding.weight");
  const std::string head_name = c.tie_embeddings ? "backbone.embedding.weight" : "lm_head.weight";
  const float* head = s.param(head_name);
  if (want_grad && (B != keep_B_ || L != keep_L_)) decide_keep(B, L);
  const bool keep = want_grad && keep_mamba_;

  const bool bf16 = gemm_.precision() == Precision::BF16;
  // The weights' bf16 mirror for the products (bf16 mode): made on first use, rounded again when something wrote the
  // weights since (an upload); the optimizer's update keeps it current otherwise.
  const bool mirror = bf16 && weight_mirror_;
  if (mirror && !s.has_mirror()) s.enable_mirror(st);
  else if (mirror && !s.mirror_valid()) s.refresh_mirror(st);
  const auto w16 = [&](const float* weight) { return mirror ? s.mirror_of(weight) : nullptr; };
  for (auto& lp : layers_) {
    Layer& l = *lp;
    l.mw.in_proj16 = w16(l.mw.in_proj), l.mw.out_proj16 = w16(l.mw.out_proj);
    l.aw.in_w16 = w16(l.aw.in_w), l.aw.out_w16 = w16(l.aw.out_w);
    l.fc1_16 = w16(l.fc1), l.fc2_16 = w16(l.fc2);
  }
  PhaseProfile prof(st);
  // Forward (spec §9.3): residual ← hidden + residual before every norm.
  embed(st, w.ids.as<int32_t>(), N, emb, Precision::F32, D, hidden);
  prof.mark("embed");
  // The residual stream lives in the layers' res_in / res_mid buffers (the norms' inputs, which the backward
  // needs): each step writes prev + hidden there and normalises it in one pass.
  const float* stream = hidden;  // the residual so far (layer 0: the embedding alone)
  // The bf16 mode's block outputs and input gradients in bf16 (set_block_io16): the Mamba-3 mixers' and GatedMLPs'
  // products write them there, the residual step and the norm backward read them. hid16: the last block's output is
  // in hidden16 (else in hidden, f32).
  const bool io16 = bf16 && block_io16_;
  if (io16) w.hidden16.reserve(act / 2), w.dnormed16.reserve(act / 2);
  uint16_t* const hidden16 = io16 ? w.hidden16.as<uint16_t>() : nullptr;
  uint16_t* const dnormed16 = io16 ? w.dnormed16.as<uint16_t>() : nullptr;
  bool hid16 = false;
  const auto last_out = [&]() -> const float* { return hid16 ? nullptr : hidden; };
  const auto last_out16 = [&]() -> const uint16_t* { return hid16 ? hidden16 : nullptr; };
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& l = *layers_[i];
    l.res_in.reserve(act);
    const bool normed_bf16 = bf16 && !l.attention;
    if (normed_bf16) l.normed16.reserve(act / 2);
    else l.normed.reserve(act);
    residual_norm_forward_gpu(st, stream, i == 0 ? nullptr : last_out(), N, D, l.norm.w, l.norm.b, eps,
                              l.res_in.as<float>(), normed_bf16 ? nullptr : l.normed.as<float>(),
                              normed_bf16 ? l.normed16.as<uint16_t>() : nullptr, i == 0 ? nullptr : last_out16());
    stream = l.res_in.as<float>();
    prof.mark("norm/residual");
    if (l.attention) {
      l.attn->forward(*ctx_, gemm_, l.aw, l.normed.as<float>(), B, L, hidden);
      hid16 = false;
      prof.mark("attn_fwd");
    } else {
      w.mamba->forward(*ctx_, gemm_, l.mw, B, L, l.f32_or_null(l.normed), io16 ? nullptr : hidden,
                       keep ? &l.mamba_kept : nullptr, l.bf16_or_null(l.normed16), hidden16);
      hid16 = io16;
      prof.mark("mamba_fwd");
    }
    if (l.fc1) {
      l.res_mid.reserve(act);
      if (bf16) l.normed2_16.reserve(act / 2);
      else l.normed2.reserve(act);
      l.mlp_h.reserve(size_t(N * 2 * dff) * 4), l.mlp_o.reserve(size_t(N * dff) * 4);
      residual_norm_forward_gpu(st, stream, last_out(), N, D, l.norm2.w, l.norm2.b, eps, l.res_mid.as<float>(),
                                bf16 ? nullptr : l.normed2.as<float>(), bf16 ? l.normed2_16.as<uint16_t>() : nullptr,
                                last_out16());
      stream = l.res_mid.as<float>();
      prof.mark("norm/residual");
      gated_mlp_forward_gpu(*ctx_, gemm_, l.fc1, l.fc2, D, dff, l.f32_or_null(l.normed2), N, l.mlp_h.as<float>(),
                            l.mlp_o.as<float>(), io16 ? nullptr : hidden, l.bf16_or_null(l.normed2_16), l.fc1_16,
                            l.fc2_16, hidden16);
      hid16 = io16;
      prof.mark("mlp_fwd");
    }
  }
  // The embedding gradient's plan (a host sort of the ids) now, while the device runs the forward pass just queued;
  // before the embedding it left the device idle once the previous step's update was done. Its upload is queued after
  // the forward, long before the embedding backward reads it.
  if (want_grad) w.embedding_plan.rebuild(st, host_ids, N);
  const NormSlot norm_f{s.param("backbone.norm_f.weight"), c.rms_norm ? nullptr : s.param("backbone.norm_f.bias"),
                        s.grad("backbone.norm_f.weight"), c.rms_norm ? nullptr : s.grad("backbone.norm_f.bias")};
  float* normed_f = hidden;  // the last hidden is folded into the residual: its buffer is free
  residual_norm_forward_gpu(st, stream, layers_.empty() ? nullptr : last_out(), N, D, norm_f.w, norm_f.b, eps,
                            residual, normed_f, nullptr, layers_.empty() ? nullptr : last_out16());
  prof.mark("norm/residual");

  // Loss; the gradient of the mean over the labelled positions, times `scale`, flows from here.
  float* dnormed = w.dnormed.as<float>();
  const double grad_scale = scale / double(labelled);
  // The loss's sum comes back with the step: read once the whole step is done, so the host never waits between the
  // forward and the backward.
  const double* loss_sum =
      lm_head_cross_entropy_enqueue(*ctx_, gemm_, normed_f, N, D, head, V, w.targets.as<int32_t>(), grad_scale,
                                    want_grad ? dnormed : nullptr, want_grad ? s.grad(head_name) : nullptr,
                                    w.head_scratch, w16(head));
  MAMBA3_CUDA_CHECK(cudaMemcpyAsync(w.host_loss.raw(), loss_sum, sizeof(double), cudaMemcpyDeviceToHost, st));
  const auto loss = [&] {
    MAMBA3_CUDA_CHECK(cudaStreamSynchronize(st));
    return *w.host_loss.as<double>() / double(labelled);
  };
  prof.mark("lm_head+loss");
  if (!want_grad) {
    prof.report();
    return loss();
  }

  // Backward: `g` is the gradient of the residual stream.
  float* g = w.grad.as<float>();
  // In the bf16 mode each norm backward also writes g's rounding, which the next layer's products (fc2's and
  // out_proj's dx and dW) read instead of rounding g again (one pass over g fewer per product pair). Attention
  // layers round it themselves; the embedding reads the f32 g.
  uint16_t* g16 = nullptr;
  if (bf16) {
    w.grad16.reserve(act / 2);
    g16 = w.grad16.as<uint16_t>();
  }
  // g16 where g's next reader takes it: layer l's MLP, or its Mamba-3 mixer (the first reader once the MLP is done).
  const auto g16_if = [&](bool reads16) { return reads16 ? g16 : nullptr; };
  const auto first_reads16 = [](const Layer& l) { return l.fc1 || !l.attention; };
  // The norms' weight sums queued and launched together after the last norm (the same bits).
  w.norm_scratch.defer = norm_sums_deferred_by_default();
  w.norm_scratch.queued.clear(), w.norm_scratch.used_floats = 0;  // (left only by a backward that threw)
  norm_backward_gpu(st, residual, dnormed, N, D, norm_f.w, norm_f.b, eps, g, false, norm_f.dw, norm_f.db,
                    w.norm_scratch, g16_if(!layers_.empty() && first_reads16(*layers_.back())));
  prof.mark("norm_bwd");
  for (size_t i = layers_.size(); i-- > 0;) {
    Layer& l = *layers_[i];
    if (l.fc1) {
      w.mlp_scratch.reserve(size_t(N * 3 * dff) * 4);
      gated_mlp_backward_gpu(*ctx_, gemm_, l.fc1, l.fc2, D, dff, l.f32_or_null(l.normed2), N, l.mlp_h.as<float>(),
                             l.mlp_o.as<float>(), g, io16 ? nullptr : dnormed, l.dfc1, l.dfc2,
                             w.mlp_scratch.as<float>(), l.bf16_or_null(l.normed2_16), l.fc1_16, l.fc2_16, g16,
                             dnormed16);
      prof.mark("mlp_bwd");
      norm_backward_gpu(st, l.res_mid.as<float>(), io16 ? nullptr : dnormed, N, D, l.norm2.w, l.norm2.b, eps, g, true,
                        l.norm2.dw, l.norm2.db, w.norm_scratch, g16_if(!l.attention), dnormed16);
      prof.mark("norm_bwd");
    }
    if (l.attention) {
      l.attn->backward(*ctx_, gemm_, l.aw, l.ag, l.normed.as<float>(), B, L, g, dnormed);
      prof.mark("attn_bwd");
    } else {
      w.mamba->backward(*ctx_, gemm_, l.mw, l.mg, B, L, l.f32_or_null(l.normed), g, io16 ? nullptr : dnormed,
                        keep ? &l.mamba_kept : nullptr, l.bf16_or_null(l.normed16), g16, dnormed16);
      prof.mark("mamba_bwd");
    }
    const bool din16 = io16 && !l.attention;  // the layer's input gradient came in bf16
    norm_backward_gpu(st, l.res_in.as<float>(), din16 ? nullptr : dnormed, N, D, l.norm.w, l.norm.b, eps, g, true,
                      l.norm.dw, l.norm.db, w.norm_scratch, g16_if(i > 0 && first_reads16(*layers_[i - 1])),
                      din16 ? dnormed16 : nullptr);
    prof.mark("norm_bwd");
  }
  flush_norm_grad_sums(st, w.norm_scratch);
  embedding_backward_gpu(st, w.embedding_plan, g, D, s.grad("backbone.embedding.weight"));
  prof.mark("embed_bwd");
  prof.report();
  return loss();
}

}  // namespace mamba3::cuda
