// The decode step allocates nothing once warmed up: the Mamba-3 mixer's step, and a whole Mamba-3 language model's
// step (the hot loop of generation). Counted by replacing the global operator new in this test binary.
// This file replaces the global operator new/delete (malloc/free underneath); GCC's mismatch warning does not
// know that the pair is replaced together.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include <nlohmann/json.hpp>

#include "model/init_weights.h"
#include "model/language_model.h"
#include "random_mixer.h"

namespace {
std::atomic<long> g_allocations{0};
}

void* operator new(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }

namespace mamba3::test {
namespace {

TEST(DecodeAllocations, MixerStepAllocatesNothing) {
  for (bool mimo : {false, true}) {
    Mamba3Config c;
    c.d_model = 64, c.d_state = 32, c.headdim = 16, c.is_mimo = mimo, c.mimo_rank = 2, c.is_outproj_norm = true;
    std::mt19937 rng(1);
    Mamba3Mixer m(c, random_mixer_weights(c, rng));
    Mamba3State s = m.new_state(3);
    Tensor u = random_tensor(rng, {3, c.d_model}), out = Tensor::empty(DType::F32, {3, c.d_model});
    m.step(u, s, out);  // warm-up: scratch is sized here
    const long before = g_allocations.load();
    for (int i = 0; i < 20; ++i) m.step(u, s, out);
    EXPECT_EQ(g_allocations.load() - before, 0) << (mimo ? "MIMO" : "SISO");
  }
}

TEST(DecodeAllocations, MambaLanguageModelStepAllocatesNothing) {
  nlohmann::json j = {{"d_model", 64}, {"n_layer", 2}, {"vocab_size", 100}, {"d_intermediate", 64},
                      {"ssm_cfg", {{"layer", "Mamba3"}, {"d_state", 16}, {"headdim", 16}}}};
  ModelConfig c = ModelConfig::from_json(j, "test");
  LanguageModel m(c, init_weights(c, 2), "test");
  ModelCache cache = m.new_cache(2);
  m.prefill(std::vector<int64_t>{1, 2, 3}, cache, 0);
  m.prefill(std::vector<int64_t>{4, 5}, cache, 1);
  Tensor logits = Tensor::empty(DType::F32, {2, c.vocab_padded()});
  std::vector<int64_t> ids = {7, 8};
  m.step(ids, cache, logits);
  const long before = g_allocations.load();
  for (int i = 0; i < 20; ++i) m.step(ids, cache, logits);
  EXPECT_EQ(g_allocations.load() - before, 0);
}

}  // namespace
}  // namespace mamba3::test
