#include "train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "train/checkpoint.h"
#include "train/loss_curve.h"
#include "train/optimizer.h"

namespace mamba3 {

namespace fs = std::filesystem;

void TrainOptions::validate() const {
  MAMBA3_CHECK(steps >= 1, "--steps must be ≥ 1 (got {})", steps);
  MAMBA3_CHECK(batch >= 1, "--batch must be ≥ 1 (got {})", batch);
  MAMBA3_CHECK(seq_len >= 1, "--seq-len must be ≥ 1 (got {})", seq_len);
  MAMBA3_CHECK(accum >= 1, "--accum must be ≥ 1 (got {})", accum);
  MAMBA3_CHECK(std::isfinite(lr) && lr > 0, "--lr must be > 0 (got {})", lr);
  MAMBA3_CHECK(min_lr_ratio >= 0 && min_lr_ratio <= 1, "min_lr_ratio must lie in [0, 1] (got {})", min_lr_ratio);
  MAMBA3_CHECK(warmup >= 0, "--warmup must be ≥ 0 (got {})", warmup);
  LrSchedule::parse_kind(schedule);
  MAMBA3_CHECK(decay_fraction > 0 && decay_fraction <= 1, "decay_fraction must lie in (0, 1] (got {})",
               decay_fraction);
  MAMBA3_CHECK(weight_decay >= 0, "--weight-decay must be ≥ 0 (got {})", weight_decay);
  MAMBA3_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "AdamW betas must lie in [0, 1)");
  MAMBA3_CHECK(eps > 0, "AdamW eps must be > 0 (got {})", eps);
  MAMBA3_CHECK(clip >= 0, "--clip must be ≥ 0 (got {}; 0 turns clipping off)", clip);
  MAMBA3_CHECK(eval_every >= 0 && save_every >= 0 && log_every >= 1,
               "--eval-every and --save-every must be ≥ 0, log_every ≥ 1");
  MAMBA3_CHECK(eval_windows >= 1, "eval_windows must be ≥ 1 (got {})", eval_windows);
}

nlohmann::json TrainOptions::to_json() const {
  return {{"steps", steps},          {"batch", batch},
          {"seq_len", seq_len},      {"accum", accum},
          {"lr", lr},                {"min_lr_ratio", min_lr_ratio},
          {"warmup", warmup},        {"schedule", schedule},
          {"decay_fraction", decay_fraction}, {"weight_decay", weight_decay},
          {"beta1", beta1},          {"beta2", beta2},
          {"eps", eps},              {"clip", clip},
          {"eval_every", eval_every}, {"eval_windows", eval_windows},
          {"save_every", save_every}, {"log_every", log_every},
          {"seed", seed}};
}

TrainOptions TrainOptions::from_json(const nlohmann::json& j, const std::string& context) {
  TrainOptions o;
  MAMBA3_CHECK(j.is_object(), "{}: training options are not a JSON object", context);
  try {
    for (const auto& [key, value] : j.items()) {
      if (key == "steps") o.steps = value.get<int64_t>();
      else if (key == "batch") o.batch = value.get<int64_t>();
      else if (key == "seq_len") o.seq_len = value.get<int64_t>();
      else if (key == "accum") o.accum = value.get<int64_t>();
      else if (key == "lr") o.lr = value.get<double>();
      else if (key == "min_lr_ratio") o.min_lr_ratio = value.get<double>();
      else if (key == "warmup") o.warmup = value.get<int64_t>();
      else if (key == "schedule") o.schedule = value.get<std::string>();
      else if (key == "decay_fraction") o.decay_fraction = value.get<double>();
      else if (key == "weight_decay") o.weight_decay = value.get<double>();
      else if (key == "beta1") o.beta1 = value.get<double>();
      else if (key == "beta2") o.beta2 = value.get<double>();
      else if (key == "eps") o.eps = value.get<double>();
      else if (key == "clip") o.clip = value.get<double>();
      else if (key == "eval_every") o.eval_every = value.get<int64_t>();
      else if (key == "eval_windows") o.eval_windows = value.get<int64_t>();
      else if (key == "save_every") o.save_every = value.get<int64_t>();
      else if (key == "log_every") o.log_every = value.get<int64_t>();
      else if (key == "seed") o.seed = value.get<uint64_t>();
      else fail("{}: unknown training option '{}'", context, key);
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: bad training option: {}", context, e.what());
  }
  return o;
}

namespace {

nlohmann::json record_json(const StepRecord& r) {
  nlohmann::json j = {{"step", r.step}, {"loss", r.loss}, {"lr", r.lr}, {"grad_norm", r.grad_norm},
                      {"tokens_per_s", r.tokens_per_s}};
  if (r.val_loss) {
    j["val_loss"] = *r.val_loss;
    j["val_ppl"] = std::exp(*r.val_loss);
  }
  return j;
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = std::llround(seconds);
  if (s >= 3600) return fmt::format("{}h{:02}m", s / 3600, s / 60 % 60);
  if (s >= 60) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

class Progress {
 public:
  Progress(std::FILE* out, int64_t total) : out_(out), total_(total), tty_(out && ::isatty(::fileno(out))) {}
  void update(const StepRecord& r, double eta_s, bool force) {
    if (!out_) return;
    std::string line = fmt::format("step {}/{}  loss {:.4f}  lr {:.3g}  {:.0f} tok/s  ETA {}", r.step, total_, r.loss,
                                   r.lr, r.tokens_per_s, format_duration(eta_s));
    if (r.val_loss) line += fmt::format("  val_loss {:.4f} val_ppl {:.2f}", *r.val_loss, std::exp(*r.val_loss));
    if (tty_) {
      std::fprintf(out_, "\r%-100s", line.c_str());
      if (r.val_loss || r.step == total_) std::fputc('\n', out_);  // keep evaluations on screen
    } else if (force || r.step % std::max<int64_t>(1, total_ / 20) == 0) {
      std::fprintf(out_, "%s\n", line.c_str());
    }
    std::fflush(out_);
  }

 private:
  std::FILE* out_;
  int64_t total_;
  bool tty_;
};

// Keeps log.jsonl entries of steps ≤ step (a resumed run replaces what the interrupted run logged after its
// checkpoint) and returns them.
std::vector<StepRecord> truncate_log(const std::string& path, int64_t step) {
  std::vector<StepRecord> kept;
  if (!fs::exists(path)) return kept;
  for (const StepRecord& r : read_train_log(path))
    if (r.step <= step) kept.push_back(r);
  AtomicFile f(path);
  for (const StepRecord& r : kept) f.write(record_json(r).dump() + "\n");
  f.commit();
  return kept;
}

double mean_val_loss(const TrainJob& job, TrainEngine& engine, const std::vector<int64_t>& windows,
                     int64_t n_windows) {
  const int64_t L = job.options.seq_len, B = job.options.batch;
  double sum = 0;
  for (int64_t first = 0; first < n_windows; first += B) {
    const int64_t n = std::min(B, n_windows - first);
    sum += double(n) * engine.loss(windows.data() + first * (L + 1), n, L);
  }
  return sum / double(n_windows);
}

}  // namespace

std::vector<StepRecord> read_train_log(const std::string& path) {
  std::ifstream in(path);
  MAMBA3_CHECK(in.good(), "{}: cannot open", path);
  std::vector<StepRecord> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    try {
      const nlohmann::json j = nlohmann::json::parse(line);
      StepRecord r;
      r.step = j.at("step").get<int64_t>();
      r.loss = j.at("loss").get<double>();
      r.lr = j.value("lr", 0.0);
      r.grad_norm = j.value("grad_norm", 0.0);
      r.tokens_per_s = j.value("tokens_per_s", 0.0);
      if (j.contains("val_loss")) r.val_loss = j["val_loss"].get<double>();
      out.push_back(r);
    } catch (const nlohmann::json::exception&) {
      // A line cut short by a kill mid-write: everything after it is ignored.
      break;
    }
  }
  return out;
}

TrainResult train(TrainJob job) {
  const TrainOptions& o = job.options;
  o.validate();
  MAMBA3_CHECK(job.data != nullptr, "no training data");
  MAMBA3_CHECK(job.loss || job.engine, "no loss function");
  const int64_t B = o.batch, L = o.seq_len, window = L + 1;
  prepare_output_dir(job.out_dir);
  const std::string log_path = (fs::path(job.out_dir) / "log.jsonl").string();
  const std::string svg_path = (fs::path(job.out_dir) / "loss.svg").string();

  TrainResult result;
  std::vector<StepRecord> history;
  AdamWConfig adam{o.beta1, o.beta2, o.eps, o.weight_decay};
  std::optional<Checkpoint> ck;
  if (job.resume) {
    ck = load_checkpoint(job.out_dir);
    job.config = ck->config;
    job.params = std::move(ck->params);
    MAMBA3_CHECK(ck->step < o.steps, "{}: the checkpoint is at step {}, nothing left to do for --steps {}",
                 job.out_dir, ck->step, o.steps);
  } else {
    MAMBA3_CHECK(!has_checkpoint(job.out_dir),
                 "{} already holds a checkpoint: pass --resume to continue it, or choose another output directory",
                 job.out_dir);
    MAMBA3_CHECK(!job.params.empty(), "no parameters to train");
  }
  check_token_data(*job.data, job.config.vocab_size, window, o.eval_every > 0);
  AdamW optimizer(adam, job.params);
  if (ck) {
    optimizer.load_state(ck->optimizer_tensors, ck->optimizer_steps, job.out_dir + "/trainer_state.safetensors");
    result.first_step = ck->step;
    ck.reset();
  }
  history = truncate_log(log_path, result.first_step);
  if (!job.resume) {  // a fresh run starts a fresh log
    AtomicFile f(log_path);
    f.commit();
  }
  std::FILE* log = std::fopen(log_path.c_str(), "a");
  MAMBA3_CHECK(log, "{}: cannot open for appending", log_path);
  struct Closer {
    std::FILE* f;
    ~Closer() { std::fclose(f); }
  } closer{log};

  LrSchedule schedule{LrSchedule::parse_kind(o.schedule), o.lr, o.min_lr_ratio, o.warmup, o.steps, o.decay_fraction};
  const WindowSampler sampler(job.data->train, window, o.seed);
  std::vector<int64_t> val_tokens;
  const int64_t n_val = o.eval_every > 0 ? validation_windows(job.data->val, window, o.eval_windows, val_tokens) : 0;
  const nlohmann::json options_json = o.to_json();
  Progress progress(job.progress, o.steps);
  std::vector<int64_t> tokens(size_t(B * window));
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  const std::string title = fmt::format("{} — loss", fs::path(job.out_dir).filename().string());

  std::unique_ptr<TrainEngine> engine = job.engine ? job.engine(job.config, job.params, optimizer)
                                                  : cpu_train_engine(job.config, job.params, optimizer, job.loss);
  auto save = [&](int64_t done) {
    engine->sync_to_host();
    save_checkpoint(job.out_dir, job.config, job.params, optimizer, done, options_json);
    write_loss_curve(svg_path, history, title);
  };

  for (int64_t step = result.first_step; step < o.steps; ++step) {
    const auto t0 = Clock::now();
    double loss = 0;
    for (int64_t micro = 0; micro < o.accum; ++micro) {
      for (int64_t b = 0; b < B; ++b) sampler.sample(step, micro * B + b, tokens.data() + b * window);
      const double l = engine->accumulate(tokens.data(), B, L, 1.0 / double(o.accum));
      MAMBA3_CHECK(std::isfinite(l), "step {}: the loss is {} (training diverged; lower --lr?)", step + 1, l);
      loss += l / double(o.accum);
    }
    StepRecord r;
    r.step = step + 1;
    r.loss = loss;
    r.grad_norm = engine->clip(o.clip);
    r.lr = schedule.at(step);
    engine->update(r.lr);
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    r.tokens_per_s = double(B * L * o.accum) / std::max(dt, 1e-9);
    const bool eval = o.eval_every > 0 && (r.step % o.eval_every == 0 || r.step == o.steps);
    if (eval) r.val_loss = mean_val_loss(job, *engine, val_tokens, n_val);
    if (r.step % o.log_every == 0 || eval || r.step == o.steps) {
      const std::string line = record_json(r).dump() + "\n";
      MAMBA3_CHECK(std::fputs(line.c_str(), log) >= 0 && std::fflush(log) == 0, "{}: write failed", log_path);
      history.push_back(r);
    }
    result.records.push_back(r);
    const double elapsed = std::chrono::duration<double>(Clock::now() - started).count();
    const double per_step = elapsed / double(r.step - result.first_step);
    progress.update(r, per_step * double(o.steps - r.step), eval);
    result.final_step = r.step;
    if (job.stop_after >= 0 && r.step >= job.stop_after) {
      engine->sync_to_host();
      result.params = job.params;
      return result;
    }
    if ((o.save_every > 0 && r.step % o.save_every == 0) || r.step == o.steps) save(r.step);
  }
  engine->sync_to_host();
  result.params = std::move(job.params);
  return result;
}

}  // namespace mamba3
