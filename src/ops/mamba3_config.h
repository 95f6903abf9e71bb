#pragma once
// The Mamba-3 mixer's constructor options (spec §1.1) and the sizes derived from them (§1.2).
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace mamba3 {

// How A is obtained from its logit (spec §14 #1): heavy-tail is the definition at the spec's commit; checkpoints
// released before 2026-06-02 need softplus.
enum class AActivation { HeavyTail, Softplus };

struct Mamba3Config {
  int64_t d_model = 0;
  int64_t d_state = 128;
  double expand = 2;
  int64_t headdim = 64;
  int64_t ngroups = 1;
  double rope_fraction = 0.5;
  double A_floor = 1e-4;
  // Range of the initial Δ (official constructor arguments, spec §1.1; used by init_weights only).
  double dt_min = 0.001, dt_max = 0.1, dt_init_floor = 1e-4;
  bool is_outproj_norm = false;
  bool is_mimo = false;
  int64_t mimo_rank = 4;  // used only when is_mimo
  int64_t chunk_size = 64;
  AActivation a_activation = AActivation::HeavyTail;
  // Non-official ablation switches (spec §15; ssm_cfg keys "no_rotary" and "euler", written only when true).
  bool no_rotary = false;  // angle increments ≡ 0: Rot is the identity, the θ columns of in_proj are ignored
  bool euler = false;      // λ ≡ 1: β = 0, γ = Δ (exponential-Euler update), the trap columns are ignored

  int64_t rank() const { return is_mimo ? mimo_rank : 1; }                // R
  int64_t d_inner() const { return int64_t(expand * double(d_model)); }  // int(expand·d_model)
  int64_t nheads() const { return d_inner() / headdim; }                 // H
  int64_t num_angles() const;                                             // S
  int64_t d_in_proj() const { return 2 * d_inner() + 2 * d_state * ngroups * rank() + 3 * nheads() + num_angles(); }
  // Column offsets of the in_proj output segments (spec §2.1).
  int64_t off_x() const { return d_inner(); }
  int64_t off_B() const { return 2 * d_inner(); }
  int64_t off_C() const { return 2 * d_inner() + d_state * ngroups * rank(); }
  int64_t off_dt() const { return 2 * d_inner() + 2 * d_state * ngroups * rank(); }
  int64_t off_A() const { return off_dt() + nheads(); }
  int64_t off_trap() const { return off_dt() + 2 * nheads(); }
  int64_t off_angles() const { return off_dt() + 3 * nheads(); }

  // Throws mamba3::Error naming the offending field (context says where the config came from).
  void validate(const std::string& context = "Mamba3 config") const;
  // Reads the constructor arguments from a JSON object (ssm_cfg or golden metadata). Keys the official constructor
  // would ignore are ignored too; a known key with a wrong type or value is an error naming the field.
  static Mamba3Config from_json(const nlohmann::json& j, const std::string& context);
  std::string describe() const;
};

}  // namespace mamba3
