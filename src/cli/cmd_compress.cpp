// edkm compress: train-time weight clustering of a model (the main job).
#include <nlohmann/json.hpp>

#include <atomic>
#include <filesystem>
#include <csignal>
#include <fstream>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/atomic_file.h"
#include "common/error.h"
#include "dist/dist.h"
#include "pipeline/compress.h"

namespace edkm::cli {
namespace {

std::atomic<int> g_signal{0};

// First Ctrl-C or SIGTERM (what timeout, Slurm and container runtimes send): finish the step,
// write a checkpoint, stop. A second signal: the default (terminate).
void on_stop_signal(int sig) {
  g_signal = sig;
  std::signal(sig, SIG_DFL);
}

}  // namespace

void register_compress(CLI::App& app) {
  auto* cmd = app.add_subcommand("compress", "Fine-tune a model while DKM clusters its weights, and write it compressed");
  auto args = std::make_shared<ModelArgs>();
  auto o = std::make_shared<CompressOptions>();
  auto config = std::make_shared<std::string>();
  auto dense_dtype = std::make_shared<std::string>("keep");
  auto no_cluster = std::make_shared<bool>(false);
  auto nproc = std::make_shared<int>(1);
  auto json = std::make_shared<bool>(false);
  auto dist_timeout = std::make_shared<int>(300);
  auto dist_backend = std::make_shared<std::string>("auto");
  auto autocast = std::make_shared<std::string>("auto");
  add_model_args(cmd, *args);
  cmd->add_option("-d,--data", o->data_paths,
                  "Alpaca JSON/JSONL, {\"text\"} documents (C4) or plain text; several files (-d A -d B) "
                  "are one mixture, each held out on its own")
      ->required();
  cmd->add_option("-o,--out", o->out, "Compressed model file to write")->required();
  // clustering: every DKM setting (cluster/settings.h), then which weights
  add_dkm_options(cmd, o->plan.defaults);
  cmd->add_option("--config", *config, "JSON compression config (per-name-pattern settings)");
  cmd->add_flag("--include-embeddings", o->plan.include_embeddings, "Also cluster the embeddings and classifier");
  cmd->add_option("--min-weights", o->plan.min_weights, "Leave matrices with at most this many weights unclustered");
  cmd->add_flag("--no-cluster", *no_cluster, "Plain fine-tuning without DKM (a baseline)");
  auto method = std::make_shared<std::string>("dkm");
  cmd->add_option("--method", *method,
                  "dkm (default); or a straight-through baseline: hard-kmeans (nearest centroid, Lloyd step per "
                  "step) or qat (uniform grid per row, learned scale and zero point)")
      ->check(CLI::IsMember({"dkm", "hard-kmeans", "qat"}));
  cmd->add_option("--nproc", *nproc,
                  "Data-parallel learners on this machine (c10d Gloo on loopback); a learner started by torchrun, "
                  "Slurm or mpirun joins from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT instead")
      ->check(CLI::Range(1, 256));
  cmd->add_option("--dist-backend", *dist_backend,
                  "Collectives between learners: auto (NCCL when the device is a GPU and this is a CUDA build, "
                  "else Gloo), gloo or nccl")
      ->check(CLI::IsMember({"auto", "gloo", "nccl"}));
  cmd->add_option("--dist-timeout", *dist_timeout,
                  "Seconds to wait for the other learners to join, and for any collective, before failing")
      ->check(CLI::Range(1, 86400));
  // data
  cmd->add_option("--seq-len", o->data.seq_len, "Tokens per training sequence")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--val-fraction", o->data.val_fraction, "Held-out fraction (the end of the data)")->check(finite_in(0.0, 0.9));
  cmd->add_flag("--pack", o->data.pack, "Pack Alpaca examples into full sequences");
  // training
  cmd->add_option("--steps", o->train.steps, "Optimizer steps (default: one epoch)")->check(CLI::PositiveNumber);
  cmd->add_option("--batch", o->train.batch, "Sequences per micro-batch")->check(CLI::PositiveNumber);
  cmd->add_option("--grad-accum", o->train.grad_accum, "Micro-batches per step")->check(CLI::PositiveNumber);
  cmd->add_option("--lr", o->train.lr, "Peak learning rate (AdamW)")->check(positive_finite());
  cmd->add_option("--min-lr-ratio", o->train.min_lr_ratio, "Cosine floor as a fraction of --lr")->check(finite_in(0.0, 1.0));
  cmd->add_option("--warmup", o->train.warmup, "Warm-up steps")->check(CLI::NonNegativeNumber);
  cmd->add_option("--weight-decay", o->train.weight_decay, "AdamW weight decay (matrices only)")->check(finite_in(0.0));
  cmd->add_option("--grad-clip", o->train.grad_clip, "Max global gradient norm (0: off)")->check(finite_in(0.0));
  cmd->add_option("--eval-every", o->train.eval_every, "Validation every N steps")->check(CLI::NonNegativeNumber);
  cmd->add_option("--checkpoint-every", o->train.checkpoint_every, "Checkpoint every N steps")->check(CLI::NonNegativeNumber);
  cmd->add_option("--checkpoint", o->train.checkpoint_path, "Checkpoint file (default: OUT.ckpt)");
  auto* resume = cmd->add_flag("--resume", o->train.resume, "Continue from the checkpoint");
  cmd->add_flag("--overwrite", o->train.overwrite, "Start again although a checkpoint of an earlier run exists")
      ->excludes(resume);
  cmd->add_option("--metrics", o->train.metrics_path, "JSONL metrics file (default: OUT.metrics.jsonl)");
  cmd->add_option("--seed", o->train.seed, "Data order seed");
  cmd->add_flag("--gradient-checkpointing", o->train.checkpoint_layers, "Recompute decoder layers in backward");
  cmd->add_option("--sensitive-init", o->sensitive_init,
                  "Calibration text: start from sensitivity-weighted k-means palettes (Fisher information on its "
                  "first --calib-samples windows of --calib-seq-len tokens) instead of plain k-means");
  cmd->add_flag("--sensitive-updates,!--no-sensitive-updates", o->sensitive_updates,
                "With --sensitive-init (not QAT): weigh DKM's and hard k-means' centroid updates at every step by "
                "the same Fisher information (default), or not (--no-sensitive-updates: unweighted, as coremltools)");
  cmd->add_option("--calib-samples", o->calib_samples, "Calibration windows (default 128)")->check(CLI::PositiveNumber);
  cmd->add_option("--calib-seq-len", o->calib_seq_len, "Tokens per calibration window (default 512)")
      ->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  // distillation
  auto teacher_dtype = std::make_shared<std::string>("auto");
  cmd->add_flag("--distill", o->distill, "Train on the loaded model's token distributions (KL divergence; the model "
                                         "as loaded is the frozen teacher)");
  cmd->add_option("--distill-temperature", o->train.distill_temperature, "Softmax temperature of the distillation loss (default 1)")
      ->check(positive_finite());
  cmd->add_option("--distill-alpha", o->train.distill_alpha,
                  "Weight of the distillation loss; 1 - alpha goes to the data's cross-entropy (default 1)")
      ->check(finite_in(0.0, 1.0));
  cmd->add_option("--teacher-dtype", *teacher_dtype,
                  "The teacher's weights: auto (default: bf16 on a GPU, fp32 on a CPU), bf16, fp16 or fp32")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}));
  cmd->add_option("--autocast", *autocast,
                  "Mixed precision on a GPU: matrix products in bf16 or fp16 over fp32 master weights; auto (default: "
                  "bf16 on a GPU, off on a CPU), off, bf16 or fp16")
      ->check(CLI::IsMember({"auto", "off", "bf16", "fp16"}));
  cmd->add_option("--dense-dtype", *dense_dtype, "Storage of unclustered tensors: keep, fp32, bf16, fp16")
      ->check(CLI::IsMember({"keep", "fp32", "bf16", "fp16"}));
  cmd->add_flag("-q,--quiet", o->train.quiet, "No progress bar");
  cmd->add_flag("--json", *json, "Print the report as JSON");
  add_runner(cmd, [=] {
    if (*nproc > 1 && !Dist::env_requests_group()) std::exit(launch_local(*nproc, command_line()));
    std::shared_ptr<Dist> dist;
    ModelArgs a = *args;
    if (Dist::env_requests_group()) {
      const bool on_gpu = parse_device(a.device).is_cuda();
      const DistBackend backend = *dist_backend != "auto" ? parse_dist_backend(*dist_backend)
                                  : on_gpu && has_nccl()  ? DistBackend::kNCCL
                                                          : DistBackend::kGloo;
      dist = Dist::from_env(std::chrono::seconds(*dist_timeout), backend);
      set_default_dist(dist);
      o->train.dist = dist;
      // One GPU per learner, as torchrun places them: learner LOCAL_RANK on GPU LOCAL_RANK.
      if (on_gpu && (a.device == "auto" || a.device == "cuda")) a.device = fmt::format("cuda:{}", dist->local_rank());
    }
    const bool main_learner = !dist || dist->is_main();
    // Flags set the defaults; a --config file may refine them, per name pattern or globally.
    if (!config->empty()) {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(read_file(*config));
      } catch (const nlohmann::json::exception& e) {
        throw_input("{}: invalid JSON: {}", *config, e.what());
      }
      o->plan.apply_json(j, *config);
    }
    o->cluster = !*no_cluster;
    o->method = parse_train_method(*method);
    if (*dense_dtype != "keep") o->dense_dtype = parse_dtype(*dense_dtype);
    if (*teacher_dtype != "auto") o->teacher_dtype = parse_dtype(*teacher_dtype);
    if (o->train.checkpoint_path.empty()) o->train.checkpoint_path = o->out + ".ckpt";
    if (o->train.metrics_path.empty()) o->train.metrics_path = o->out + ".metrics.jsonl";
    std::vector<InputPath> inputs = model_inputs(*args);
    for (const std::string& path : o->data_paths) inputs.push_back({"-d", path});
    inputs.push_back({"--config", *config});
    inputs.push_back({"--sensitive-init", o->sensitive_init});
    check_outputs_distinct({o->out, o->train.checkpoint_path, o->train.metrics_path}, inputs);
    if (o->train.resume && !std::filesystem::exists(o->train.checkpoint_path))
      throw_input("{}: no checkpoint to resume from", o->train.checkpoint_path);
    if (a.dtype == "auto") a.dtype = "fp32";  // fp32 master weights; DKM rounds to --cluster-dtype
    LoadedModel m = load_for_inference(a, /*require_tokenizer=*/true, /*verbose=*/main_learner);
    const bool on_gpu = m.model.device().is_cuda();
    if (*autocast == "auto") o->train.autocast = on_gpu ? at::kBFloat16 : at::ScalarType::Undefined;
    else if (*autocast != "off") o->train.autocast = parse_dtype(*autocast);
    if (o->train.autocast != at::ScalarType::Undefined && !on_gpu)
      throw_invalid("--autocast {} needs a GPU (--device cuda); on a CPU, training runs in the model's dtype", *autocast);
    std::signal(SIGINT, on_stop_signal);
    std::signal(SIGTERM, on_stop_signal);
    o->train.should_stop = [] { return g_signal.load() != 0; };
    CompressReport r = compress(m, *o);
    if (r.train.interrupted) {
      std::cerr << fmt::format("edkm: interrupted after step {}; checkpoint written to {}; continue with --resume\n",
                               r.train.start_step + r.train.steps_done, o->train.checkpoint_path);
      std::exit(128 + (g_signal.load() ? g_signal.load() : SIGINT));
    }
    if (!main_learner) return;
    if (*json) print_json(r.to_json());
    else std::cout << r.text();
  });
}

}  // namespace edkm::cli
