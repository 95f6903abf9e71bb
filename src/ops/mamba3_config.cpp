#include "ops/mamba3_config.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_field.h"

namespace mamba3 {

int64_t Mamba3Config::num_angles() const {
  int64_t split = int64_t(double(d_state) * rope_fraction);
  if (split % 2 != 0) split -= 1;
  return split / 2;
}

void Mamba3Config::validate(const std::string& context) const {
  MAMBA3_CHECK(d_model > 0, "{}: d_model must be positive, got {}", context, d_model);
  MAMBA3_CHECK(d_state > 0, "{}: d_state must be positive, got {}", context, d_state);
  MAMBA3_CHECK(expand > 0, "{}: expand must be positive, got {}", context, expand);
  MAMBA3_CHECK(headdim > 0, "{}: headdim must be positive, got {}", context, headdim);
  MAMBA3_CHECK(d_inner() > 0 && d_inner() % headdim == 0, "{}: d_inner = int(expand·d_model) = {} is not divisible by headdim {}",
               context, d_inner(), headdim);
  MAMBA3_CHECK(ngroups > 0, "{}: ngroups must be positive, got {}", context, ngroups);
  MAMBA3_CHECK(nheads() % ngroups == 0, "{}: nheads {} is not divisible by ngroups {}", context, nheads(), ngroups);
  MAMBA3_CHECK(rope_fraction == 0.5 || rope_fraction == 1.0, "{}: rope_fraction must be 0.5 or 1.0, got {}", context,
               rope_fraction);
  MAMBA3_CHECK(num_angles() > 0, "{}: d_state {} with rope_fraction {} leaves no rotary angle", context, d_state,
               rope_fraction);
  MAMBA3_CHECK(!is_mimo || mimo_rank >= 1, "{}: mimo_rank must be at least 1, got {}", context, mimo_rank);
  MAMBA3_CHECK(!is_mimo || d_state % 2 == 0, "{}: MIMO pairs (i, i + d_state/2) and needs an even d_state, got {}",
               context, d_state);
  MAMBA3_CHECK(chunk_size >= 1, "{}: chunk_size must be at least 1, got {}", context, chunk_size);
  MAMBA3_CHECK(A_floor >= 0, "{}: A_floor must be non-negative, got {}", context, A_floor);
  MAMBA3_CHECK(dt_min > 0 && dt_max >= dt_min && dt_init_floor >= 0,
               "{}: need 0 < dt_min ≤ dt_max and dt_init_floor ≥ 0, got dt_min {}, dt_max {}, dt_init_floor {}", context,
               dt_min, dt_max, dt_init_floor);
}


Mamba3Config Mamba3Config::from_json(const nlohmann::json& j, const std::string& context) {
  MAMBA3_CHECK(j.is_object(), "{}: expected a JSON object", context);
  Mamba3Config c;
  read_json_field(j, "d_model", c.d_model, context);
  read_json_field(j, "d_state", c.d_state, context);
  read_json_field(j, "expand", c.expand, context);
  read_json_field(j, "headdim", c.headdim, context);
  read_json_field(j, "ngroups", c.ngroups, context);
  read_json_field(j, "rope_fraction", c.rope_fraction, context);
  read_json_field(j, "A_floor", c.A_floor, context);
  read_json_field(j, "dt_min", c.dt_min, context);
  read_json_field(j, "dt_max", c.dt_max, context);
  read_json_field(j, "dt_init_floor", c.dt_init_floor, context);
  read_json_field(j, "is_outproj_norm", c.is_outproj_norm, context);
  read_json_field(j, "is_mimo", c.is_mimo, context);
  read_json_field(j, "mimo_rank", c.mimo_rank, context);
  read_json_field(j, "chunk_size", c.chunk_size, context);
  read_json_field(j, "no_rotary", c.no_rotary, context);
  read_json_field(j, "euler", c.euler, context);
  if (auto it = j.find("A_activation"); it != j.end()) {
    std::string v = it->is_string() ? it->get<std::string>() : "";
    if (v == "heavy_tail") {
      c.a_activation = AActivation::HeavyTail;
    } else if (v == "softplus") {
      c.a_activation = AActivation::Softplus;
    } else {
      fail("{}: field 'A_activation' must be \"heavy_tail\" or \"softplus\", got {}", context, it->dump());
    }
  }
  return c;
}

std::string Mamba3Config::describe() const {
  return fmt::format(
      "Mamba3({} d_model {}, d_state {}, headdim {}, heads {}, groups {}, rope {}, outnorm {}, chunk {}{}{})",
      is_mimo ? fmt::format("MIMO R={}", mimo_rank) : std::string("SISO"), d_model, d_state, headdim, nheads(), ngroups,
      rope_fraction, is_outproj_norm, chunk_size, no_rotary ? ", no_rotary" : "", euler ? ", euler" : "");
}

}  // namespace mamba3
