#pragma once
// Backward of ops/attention.h for one sequence (training: recomputes the softmax, flash-attention style).
// With p = softmax(scale·q·kᵀ) (masked as the forward masks) and o = p·v:
//   dv_j += Σ_t p_tj·do_t;  ds_tj = p_tj·(do_t·v_j − do_t·o_t);  dq_t = scale·Σ_j ds_tj·k_j;  dk_j += scale·Σ_t ds_tj·q_t.
// Query heads of a GQA group add into their shared kv head. Cost per query and head: 8·Lk·hd FLOPs.
#include <cstdint>

#include "ops/attention.h"

namespace mamba3 {

// q, out, dout, dq: (Lq, H, hd); k, v, dk, dv: (Lk, Hkv, hd). dq, dk, dv are overwritten. Parallel over heads.
void attention_backward(const AttentionShape& s, const float* q, int64_t Lq, int64_t pos0, const float* k,
                        const float* v, int64_t Lk, const float* out, const float* dout, float* dq, float* dk,
                        float* dv);

// The transpose of rotary(): rotates the gradient back (by −position·inv_freq).
void rotary_backward(float* dx, int64_t heads, int64_t head_dim, int64_t dim, double base, bool interleaved,
                     int64_t position);

}  // namespace mamba3
