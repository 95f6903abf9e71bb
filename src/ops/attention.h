#pragma once
// Multi-head attention of one sequence against its KV cache (spec §9.6): query head j reads kv head
// j / (H / Hkv) (grouped-query attention); scores q·k·scale, softmax over keys. Causal masking is bottom-right
// aligned: query t (absolute position pos0 + t) sees keys 0 … pos0 + t. Without causal every query sees all keys.
// Cost per query and head: 4·Lk·hd FLOPs, reads Lk·2·hd floats of cache.
#include <cstdint>

namespace mamba3 {

struct AttentionShape {
  int64_t heads, kv_heads, head_dim;
  float scale;
  bool causal;
};

// q: (Lq, H, hd); k, v: (Lk, Hkv, hd) with Lk ≥ pos0 + Lq when causal; out: (Lq, H, hd).
void attention(const AttentionShape& s, const float* q, int64_t Lq, int64_t pos0, const float* k, const float* v,
               int64_t Lk, float* out);

// Rotary embedding on the first `dim` channels of each of `heads` heads of x (heads, head_dim), at `position`:
// pairs (i, i + dim/2) (or (2i, 2i+1) when interleaved) rotated by position·base^(−2i/dim).
void rotary(float* x, int64_t heads, int64_t head_dim, int64_t dim, double base, bool interleaved, int64_t position);

}  // namespace mamba3
