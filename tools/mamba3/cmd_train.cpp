// `mamba3 train --config FILE --data TOKENS|TXT --out DIR [options]`: trains a language model from fresh weights
// (init_weights, seeded) or, with --resume, continues the checkpoint in DIR exactly. Every input is checked before
// the first step. Writes DIR/{config.json, model.safetensors, trainer_state.safetensors, log.jsonl, loss.svg}.
#include <cstdio>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "model/init_weights.h"
#include "model/language_model.h"
#include "text_encoder.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/trainer.h"

#ifdef MAMBA3_HAVE_CUDA_TRAIN
#include <memory>

#include "cuda/train/train_engine_gpu.h"
#include "cuda/train/train_gemm_algos.h"
#endif

#if __has_include("train/lm_gradients.h")
#include "train/lm_gradients.h"
#define MAMBA3_HAVE_LM_GRADIENTS 1
#endif

namespace mamba3::cli {

namespace {

struct TrainArgs {
  std::string config, data, out, tokenizer = "bytes", device = "cpu", precision = "bf16", gemm_algos;
  double val_fraction = 0.05;
  bool resume = false;
  int64_t stop_after = -1;
  TrainOptions options;
};

}  // namespace

void register_train(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Train a Mamba-3 language model (AdamW, checkpoints, validation)");
  static TrainArgs a;
  TrainOptions& o = a.options;
  cmd->add_option("-c,--config", a.config, "config.json of the model to train (optional with --resume)");
  cmd->add_option("-d,--data", a.data, "token file from `mamba3 prepare`, or a .txt file tokenized on the fly")
      ->required();
  cmd->add_option("-o,--out", a.out, "output directory (checkpoint, log.jsonl, loss.svg)")->required();
  cmd->add_option("-t,--tokenizer", a.tokenizer, "tokenizer for a text --data: tokenizer.json, rank file, 'bytes'")
      ->capture_default_str();
  cmd->add_option("--val-fraction", a.val_fraction, "validation share of a text --data")->capture_default_str();
  cmd->add_option("--device", a.device, "cpu or cuda")->capture_default_str();
  cmd->add_option("--precision", a.precision,
                  "cuda: bf16 (mixed: bf16 matrix-product inputs, f32 master weights, states and sums) or f32 (exact)")
      ->capture_default_str();
  cmd->add_option("--gemm-algos", a.gemm_algos,
                  "cuda: run the bf16 products whose shapes this table holds (from `mamba3 bench --device cuda --train "
                  "--tune-gemm FILE`) with its cuBLASLt algorithms (as MAMBA3_TRAIN_GEMM_ALGOS)");
  cmd->add_flag("--resume", a.resume, "continue the checkpoint in --out (its options, unless given again)");
  cmd->add_option("--stop-after", a.stop_after,
                  "stop after this step as if killed (no save beyond the last checkpoint; tests --resume)");
  // Options that a resumed run takes from the checkpoint unless given on the command line.
  CLI::Option* given[] = {
      cmd->add_option("--steps", o.steps, "optimizer steps in total")->capture_default_str(),
      cmd->add_option("--batch", o.batch, "sequences per micro-batch")->capture_default_str(),
      cmd->add_option("--seq-len", o.seq_len, "tokens per sequence")->capture_default_str(),
      cmd->add_option("--accum", o.accum, "micro-batches per optimizer step")->capture_default_str(),
      cmd->add_option("--lr", o.lr, "peak learning rate")->capture_default_str(),
      cmd->add_option("--min-lr-ratio", o.min_lr_ratio, "final learning rate / peak")->capture_default_str(),
      cmd->add_option("--warmup", o.warmup, "linear warmup steps")->capture_default_str(),
      cmd->add_option("--schedule", o.schedule, "cosine | wsd (warmup-stable-decay)")->capture_default_str(),
      cmd->add_option("--decay-fraction", o.decay_fraction, "wsd: share of steps spent decaying")
          ->capture_default_str(),
      cmd->add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay")->capture_default_str(),
      cmd->add_option("--beta1", o.beta1, "AdamW β1")->capture_default_str(),
      cmd->add_option("--beta2", o.beta2, "AdamW β2")->capture_default_str(),
      cmd->add_option("--clip", o.clip, "clip the global gradient norm (0 = off)")->capture_default_str(),
      cmd->add_option("--eval-every", o.eval_every, "validation every N steps (0 = never)")->capture_default_str(),
      cmd->add_option("--eval-windows", o.eval_windows, "validation sequences per evaluation")
          ->capture_default_str(),
      cmd->add_option("--save-every", o.save_every, "checkpoint every N steps (0 = at the end only)")
          ->capture_default_str(),
      cmd->add_option("--log-every", o.log_every, "log.jsonl line every N steps")->capture_default_str(),
      cmd->add_option("--seed", o.seed, "seed of the initial weights and of the data sampling")
          ->capture_default_str(),
  };
  static std::vector<CLI::Option*> flags(std::begin(given), std::end(given));
  cmd->callback([] {
    MAMBA3_CHECK(a.device == "cpu" || a.device == "cuda", "--device must be cpu or cuda (got '{}')", a.device);
    MAMBA3_CHECK(a.gemm_algos.empty() || a.device == "cuda", "--gemm-algos {}: only with --device cuda", a.gemm_algos);
#ifdef MAMBA3_HAVE_CUDA_TRAIN
    const cuda::Precision precision = cuda::parse_precision(a.precision);
    if (a.device == "cuda") {
      const cuda::DeviceInfo dev = cuda::device_info();
      MAMBA3_CHECK(dev.available, "--device cuda: no usable CUDA device ({})", dev.why_not);
      // Read (and checked against this device) before anything else, so a bad file stops the run at once.
      if (!a.gemm_algos.empty())
        cuda::set_process_gemm_algos(
            std::make_shared<const cuda::GemmAlgoTable>(cuda::GemmAlgoTable::load(a.gemm_algos)));
    }
#else
    MAMBA3_CHECK(a.device == "cpu", "--device cuda: this build has no CUDA backend (build with -DMAMBA3_CUDA=ON)");
#endif
    TrainJob job;
    job.out_dir = a.out;
    job.resume = a.resume;
    job.progress = stderr;
    job.stop_after = a.stop_after;
    if (a.resume) {
      const Checkpoint ck = load_checkpoint(a.out);
      // The checkpoint's options are the base; flags given now override them.
      TrainOptions merged = TrainOptions::from_json(ck.options, a.out + "/trainer_state.safetensors");
      const nlohmann::json saved = merged.to_json(), now = a.options.to_json();
      nlohmann::json result = saved;
      for (CLI::Option* f : flags) {
        if (f->count() == 0) continue;
        std::string key = f->get_name().substr(2);  // "--seq-len" → "seq_len"
        for (char& c : key)
          if (c == '-') c = '_';
        if (now.at(key) != saved.at(key))
          std::fprintf(stderr, "note: --%s %s overrides the checkpoint's %s (the run will differ from an "
                       "uninterrupted one)\n", f->get_name().substr(2).c_str(), now.at(key).dump().c_str(),
                       saved.at(key).dump().c_str());
        result[key] = now.at(key);
      }
      job.options = TrainOptions::from_json(result, "training options");
      job.config = ck.config;
      if (!a.config.empty()) {
        const ModelConfig given_config = ModelConfig::load(a.config);
        MAMBA3_CHECK(given_config.to_json() == ck.config.to_json(),
                     "--config {} differs from the checkpoint's config.json in {}", a.config, a.out);
      }
      std::fprintf(stderr, "resuming %s at step %lld of %lld\n", a.out.c_str(), static_cast<long long>(ck.step),
                   static_cast<long long>(job.options.steps));
    } else {
      MAMBA3_CHECK(!a.config.empty(), "--config is required (unless --resume)");
      job.options = a.options;
      job.config = ModelConfig::load(a.config);
      try {
        job.params = init_weights(job.config, job.options.seed);
        LanguageModel check(job.config, job.params, a.config);  // proves the config builds a model
      } catch (const std::exception& e) {
        fail("config {} cannot build a model: {}", a.config, e.what());
      }
    }
    job.options.validate();
    const Tokenizer tok = training_tokenizer(a.tokenizer);
    const TokenData data = load_training_data(a.data, text_encoder(tok), tok.vocab_size(), a.val_fraction);
    job.data = &data;
#ifdef MAMBA3_HAVE_LM_GRADIENTS
    job.loss = lm_loss_and_grad;
#ifdef MAMBA3_HAVE_CUDA_TRAIN
    if (a.device == "cuda") {
      job.engine = cuda::cuda_train_engine_factory(precision);
      std::fprintf(stderr, "training on %s (%s)\n", cuda::device_info().name.c_str(), cuda::precision_name(precision));
    }
#endif
#else
    check_token_data(data, job.config.vocab_size, job.options.seq_len + 1, job.options.eval_every > 0);
    prepare_output_dir(a.out);
    fail("training the language model needs its gradients (src/train/lm_gradients.h), which this build lacks");
#endif
    const TrainResult r = train(std::move(job));
    std::fprintf(stderr, "done: step %lld, checkpoint in %s\n", static_cast<long long>(r.final_step), a.out.c_str());
  });
}

}  // namespace mamba3::cli
