// Bad inputs to the Mamba-3 layer fail with errors that name the field, tensor or shape.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "random_mixer.h"
#include "support/error_of.h"

namespace mamba3::test {
namespace {

using ::testing::HasSubstr;

Mamba3Config small() {
  Mamba3Config c;
  c.d_model = 32, c.d_state = 16, c.headdim = 16, c.chunk_size = 8;
  return c;
}


TEST(MixerErrors, InconsistentConfig) {
  auto with = [](auto edit) {
    Mamba3Config c = small();
    edit(c);
    return error_of([&] { c.validate("cfg"); });
  };
  EXPECT_THAT(with([](Mamba3Config& c) { c.headdim = 24; }), HasSubstr("not divisible by headdim 24"));
  EXPECT_THAT(with([](Mamba3Config& c) { c.rope_fraction = 0.25; }), HasSubstr("rope_fraction must be 0.5 or 1.0"));
  EXPECT_THAT(with([](Mamba3Config& c) { c.ngroups = 3; }), HasSubstr("not divisible by ngroups 3"));
  EXPECT_THAT(with([](Mamba3Config& c) { c.d_state = 2; }), HasSubstr("leaves no rotary angle"));
  EXPECT_THAT(with([](Mamba3Config& c) { c.chunk_size = 0; }), HasSubstr("chunk_size"));
  EXPECT_THAT(with([](Mamba3Config& c) { c.d_model = 0; }), HasSubstr("d_model"));
  EXPECT_THAT(with([](Mamba3Config& c) { c.is_mimo = true, c.mimo_rank = 0; }), HasSubstr("mimo_rank"));
  EXPECT_EQ(with([](Mamba3Config&) {}), "(no error)");
}

TEST(MixerErrors, ConfigJsonFields) {
  auto parse = [](const char* text) {
    return error_of([&] { Mamba3Config::from_json(nlohmann::json::parse(text), "ssm_cfg"); });
  };
  EXPECT_THAT(parse(R"({"d_state": "big"})"), HasSubstr("field 'd_state' must be an integer"));
  EXPECT_THAT(parse(R"({"is_mimo": 1})"), HasSubstr("field 'is_mimo' must be true or false"));
  EXPECT_THAT(parse(R"({"A_activation": "relu"})"), HasSubstr("A_activation"));
  EXPECT_THAT(parse(R"([1, 2])"), HasSubstr("expected a JSON object"));
  EXPECT_EQ(parse(R"({"d_model": 32, "some_future_key": 1})"), "(no error)");  // ignored, as officially
}

TEST(MixerErrors, MissingWrongOrUnexpectedParameters) {
  std::mt19937 rng(1);
  Mamba3Config c = small();
  TensorMap good = random_mixer_weights(c, rng);
  {
    TensorMap w = good;
    w.erase("D");
    EXPECT_THAT(error_of([&] { Mamba3Mixer(c, w, "", "ckpt.safetensors"); }),
                HasSubstr("ckpt.safetensors: missing parameter 'D'"));
  }
  {
    TensorMap w = good;
    w["in_proj.weight"] = random_tensor(rng, {10, c.d_model});
    std::string e = error_of([&] { Mamba3Mixer(c, w, "", "ckpt"); });
    EXPECT_THAT(e, HasSubstr("tensor 'in_proj.weight'"));
    EXPECT_THAT(e, HasSubstr("expected shape (" + std::to_string(c.d_in_proj()) + ", 32), got (10, 32)"));
  }
  {
    TensorMap w = good;
    w["norm.weight"] = random_tensor(rng, {c.d_inner()});  // present although is_outproj_norm is false
    EXPECT_THAT(error_of([&] { Mamba3Mixer(c, w, "", "ckpt"); }), HasSubstr("unexpected tensor 'norm.weight'"));
  }
  {
    TensorMap w;
    for (auto& [k, v] : good) w["layers.0.mixer." + k] = v;
    EXPECT_EQ(error_of([&] { Mamba3Mixer(c, w, "layers.0.mixer."); }), "(no error)");
    w.erase("layers.0.mixer.B_bias");
    EXPECT_THAT(error_of([&] { Mamba3Mixer(c, w, "layers.0.mixer."); }), HasSubstr("'layers.0.mixer.B_bias'"));
  }
}

TEST(MixerErrors, WrongInputShapes) {
  std::mt19937 rng(2);
  Mamba3Config c = small();
  Mamba3Mixer m(c, random_mixer_weights(c, rng));
  Mamba3State s = m.new_state(2);
  EXPECT_THAT(error_of([&] { m.prefill(random_tensor(rng, {2, 5, 31}), s); }), HasSubstr("input shape (2, 5, 31)"));
  EXPECT_THAT(error_of([&] { m.prefill(random_tensor(rng, {3, 5, 32}), s); }), HasSubstr("angle state"));
  EXPECT_THAT(error_of([&] { m.step(random_tensor(rng, {2, 1, 32}), s); }), HasSubstr("input shape (2, 1, 32)"));
  EXPECT_THAT(error_of([&] { m.prefill(random_tensor(rng, {2, 5, 32}).to(DType::BF16), s); }),
              HasSubstr("input must be F32"));
}

}  // namespace
}  // namespace mamba3::test
