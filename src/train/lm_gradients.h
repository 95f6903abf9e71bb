#pragma once
// Loss and gradient of a whole Mamba-3 language model on CPU (training): the forward of language_model.cpp with its
// activations kept, softmax cross-entropy fused with the lm_head, then the backward of every layer in reverse
// (spec §9: embedding, norms, residual stream, Mamba-3 and attention mixers, GatedMLP, norm_f, lm_head).
#include <cstdint>

#include "core/tensor.h"
#include "model/model_config.h"

namespace mamba3 {

// tokens: batch rows of L+1 ids each (row-major, (B, L+1)); inputs are [0, L), targets [1, L]. Returns the mean
// cross-entropy over the B·L targets (natural log). When grads is not null, (*grads)[name] receives the gradient
// of that mean loss w.r.t. every parameter in `params` (same official state_dict names and shapes, f32; tied
// embeddings: one tensor 'backbone.embedding.weight' gets both contributions). Tensors already in *grads with the
// right shape and dtype are reused (zeroed, then written), others are replaced; names that are not parameters are
// erased. Padded vocabulary rows get exactly what the math gives (their softmax mass through the lm_head).
// Stateless: the trainer may update params in place between calls. Attention layers with d_conv > 0 are supported.
double lm_loss_and_grad(const ModelConfig& config, const TensorMap& params, const int64_t* tokens, int64_t B,
                        int64_t L, TensorMap* grads);

// The same with the labels given apart (supervised sequence tasks, src/tasks): inputs (B, L) ids; targets (B, L),
// targets[i] the label of the output at input position i, or a negative value for "no loss here". Returns the mean
// cross-entropy over the labelled positions (at least one is required); the gradients are those of that mean.
// lm_loss_and_grad(tokens) equals this with inputs = tokens[:, :L] and targets = tokens[:, 1:].
double lm_loss_and_grad_labels(const ModelConfig& config, const TensorMap& params, const int64_t* inputs,
                               const int64_t* targets, int64_t B, int64_t L, TensorMap* grads);

}  // namespace mamba3
