// `mamba3 task NAME --model-config FILE --steps N [--device cpu] [--out DIR] [--seed S] …`: trains a fresh model on a
// state-tracking task (parity, mod_arith, mod_arith_brackets; see src/tasks/state_tracking.h and
// docs/state_tracking.md), evaluates it at the test lengths and prints the accuracy per length. With --out: DIR/
// result.json, DIR/accuracy.svg (accuracy vs length), DIR/loss.svg and the trained model (config.json +
// model.safetensors, loadable by `mamba3 generate`).
// `mamba3 task-plot --out FILE.svg RESULT.json …`: one accuracy-vs-length plot of several runs of the same task.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#ifdef MAMBA3_HAVE_CUDA_TRAIN
#include "cuda/train/train_engine_gpu.h"
#endif
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/parallel.h"
#include "io/safetensors.h"
#include "tasks/accuracy_plot.h"
#include "tasks/task_runner.h"
#include "train/checkpoint.h"
#include "train/loss_curve.h"

namespace mamba3::cli {

namespace {

struct TaskArgs {
  std::string name, model_config, out, device = "cpu", precision = "f32", label, labels;
  int threads = 0;
  tasks::TaskTrainOptions options;
};

std::string model_label(const ModelConfig& c) {
  std::string s = "Mamba-3";
  if (c.ssm.no_rotary && c.ssm.euler) return s + " (no rotary, Euler)";
  if (c.ssm.no_rotary) return s + " (no rotary)";
  if (c.ssm.euler) return s + " (Euler)";
  return s;
}

void run(const TaskArgs& a) {
  MAMBA3_CHECK(a.device == "cpu" || a.device == "cuda", "--device must be cpu or cuda (got '{}')", a.device);
#ifndef MAMBA3_HAVE_CUDA_TRAIN
  MAMBA3_CHECK(a.device == "cpu", "--device cuda: this build has no CUDA backend (build with -DMAMBA3_CUDA=ON)");
#endif
  tasks::TaskSpec spec = tasks::task_spec(a.name);
  if (!a.labels.empty()) spec.labels = tasks::parse_labels(a.labels);
  const ModelConfig config = ModelConfig::load(a.model_config);
  tasks::TaskTrainOptions o = a.options;
  o.validate();
  if (a.threads > 0) set_threads(a.threads);
  if (!a.out.empty()) prepare_output_dir(a.out);
  o.progress = stderr;
#ifdef MAMBA3_HAVE_CUDA_TRAIN
  if (a.device == "cuda") {
    const cuda::DeviceInfo dev = cuda::device_info();
    MAMBA3_CHECK(dev.available, "--device cuda: no usable CUDA device ({})", dev.why_not);
    o.engine = cuda::cuda_train_engine_factory(cuda::parse_precision(a.precision));
    std::fprintf(stderr, "training on %s (%s); evaluation on the CPU\n", dev.name.c_str(), a.precision.c_str());
  }
#endif
  std::fprintf(stderr, "task %s: train lengths %lld-%lld, %s labels, %s, %lld steps of %lld sequences, %d threads\n",
               spec.name.c_str(), static_cast<long long>(spec.train_min), static_cast<long long>(spec.train_max),
               tasks::labels_name(spec.labels).c_str(), config.ssm.describe().c_str(), static_cast<long long>(o.steps),
               static_cast<long long>(o.batch), max_threads());
  const tasks::TaskRunResult r = tasks::run_task(spec, config, o);

  std::printf("task %s  model %s  steps %lld  train %.1f s  eval %.1f s\n", spec.name.c_str(),
              model_label(config).c_str(), static_cast<long long>(o.steps), r.train_seconds, r.eval_seconds);
  std::printf("%8s  %8s  %9s  %7s\n", "length", "accuracy", "scaled", "samples");
  for (const tasks::LengthAccuracy& acc : r.accuracy)
    std::printf("%8lld  %7.2f%%  %8.2f%%  %7lld%s\n", static_cast<long long>(acc.length), 100 * acc.accuracy(),
                100 * acc.scaled(spec.classes), static_cast<long long>(acc.samples),
                acc.length > spec.train_max ? "" : "  (training length)");
  if (a.out.empty()) return;

  namespace fs = std::filesystem;
  const nlohmann::json j = tasks::task_result_json(spec, config, o, r, a.device, max_threads());
  AtomicFile f((fs::path(a.out) / "result.json").string());
  f.write(j.dump(2) + "\n");
  f.commit();
  tasks::AccuracySeries s{a.label.empty() ? model_label(config) : a.label, {}};
  for (const tasks::LengthAccuracy& acc : r.accuracy) s.points.push_back({acc.length, acc.accuracy()});
  tasks::write_accuracy_plot((fs::path(a.out) / "accuracy.svg").string(), {s}, "task " + spec.name,
                             1.0 / double(spec.classes), spec.train_max);
  write_loss_curve((fs::path(a.out) / "loss.svg").string(), r.records, "task " + spec.name + ": training loss");
  config.save((fs::path(a.out) / "config.json").string());
  write_safetensors((fs::path(a.out) / "model.safetensors").string(), checkpoint_tensors(config, r.params),
                    {{"format", "pt"}, {"mamba3_task", spec.name}});
  std::fprintf(stderr, "wrote %s/{result.json, accuracy.svg, loss.svg, config.json, model.safetensors}\n",
               a.out.c_str());
}

void plot(const std::vector<std::string>& results, const std::string& out, const std::string& title) {
  std::vector<tasks::AccuracySeries> series;
  std::string task;
  double chance = 0;
  int64_t train_max = 0;
  for (const std::string& path : results) {
    std::ifstream in(path);
    MAMBA3_CHECK(in.good(), "{}: cannot open the result file", path);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
      const std::string t = j.at("task").get<std::string>();
      MAMBA3_CHECK(task.empty() || t == task, "{}: task '{}' differs from the other results' '{}'", path, t, task);
      task = t;
      chance = 1.0 / j.at("classes").get<double>();
      train_max = j.at("train_lengths").at(1).get<int64_t>();
      const ModelConfig c = ModelConfig::from_json(j.at("model_config"), path);
      tasks::AccuracySeries s{model_label(c), {}};
      for (const auto& a : j.at("accuracy")) s.points.push_back({a.at("length").get<int64_t>(), a.at("accuracy")});
      series.push_back(std::move(s));
    } catch (const nlohmann::json::exception& e) {
      fail("{}: not a `mamba3 task` result.json: {}", path, e.what());
    }
  }
  MAMBA3_CHECK(!series.empty(), "task-plot: no result files given");
  tasks::write_accuracy_plot(out, series, title.empty() ? "task " + task : title, chance, train_max);
}

}  // namespace

void register_task(CLI::App& app) {
  auto* cmd = app.add_subcommand("task", "Train and evaluate on a state-tracking task (parity, mod_arith, "
                                         "mod_arith_brackets): accuracy per test length");
  static TaskArgs a;
  static std::vector<int64_t> lengths;
  tasks::TaskTrainOptions& o = a.options;
  cmd->add_option("name", a.name, "parity | mod_arith | mod_arith_brackets")->required();
  cmd->add_option("--model-config", a.model_config, "model config.json (vocab_size ≥ 12; e.g. configs/tasks/)")
      ->required();
  cmd->add_option("--steps", o.steps, "optimizer steps")->capture_default_str();
  cmd->add_option("--device", a.device, "where to train: cpu or cuda (evaluation runs on the CPU)")
      ->capture_default_str();
  cmd->add_option("--precision", a.precision, "cuda: f32 (exact) or bf16 (mixed precision)")->capture_default_str();
  cmd->add_option("-o,--out", a.out, "directory for result.json, accuracy.svg, loss.svg and the model");
  cmd->add_option("--seed", o.seed, "seed of the initial weights and of the training data")->capture_default_str();
  cmd->add_option("--batch", o.batch, "sequences per step (all of one length)")->capture_default_str();
  cmd->add_option("--lr", o.lr, "peak learning rate (warmup, then cosine to lr·min-lr-ratio)")->capture_default_str();
  cmd->add_option("--min-lr-ratio", o.min_lr_ratio, "final learning rate / peak")->capture_default_str();
  cmd->add_option("--warmup", o.warmup, "linear warmup steps")->capture_default_str();
  cmd->add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  cmd->add_option("--clip", o.clip, "clip the global gradient norm (0 = off)")->capture_default_str();
  cmd->add_option("--eval-samples", o.eval_samples, "test sequences per length")->capture_default_str();
  cmd->add_option("--eval-seed", o.eval_seed, "seed of the test set (shared by every model)")->capture_default_str();
  cmd->add_option("--test-lengths", lengths, "test lengths (default: the task's, see docs/state_tracking.md)")
      ->delimiter(',');
  cmd->add_option("--curriculum", o.curriculum,
                  "steps over which the longest training length grows from the shortest (0: off)")
      ->capture_default_str();
  cmd->add_option("--log-every", o.log_every, "progress line every N steps")->capture_default_str();
  cmd->add_option("--threads", a.threads, "CPU threads (default: all cores)");
  cmd->add_option("--label", a.label, "series name in accuracy.svg (default: from the config's switches)");
  cmd->add_option("--labels", a.labels,
                  "where the loss is taken: final (the answer only) or prefix (also after every complete prefix; "
                  "default: prefix for parity and mod_arith, final for mod_arith_brackets)");
  cmd->callback([] {
    a.options.test_lengths = lengths;
    run(a);
  });

  auto* pl = app.add_subcommand("task-plot", "One accuracy-vs-length SVG from several `mamba3 task` result.json files");
  static std::vector<std::string> results;
  static std::string out, title;
  pl->add_option("results", results, "result.json files of one task")->required();
  pl->add_option("-o,--out", out, "SVG file to write")->required();
  pl->add_option("--title", title, "plot title (default: the task)");
  pl->callback([] { plot(results, out, title); });
}

}  // namespace mamba3::cli
