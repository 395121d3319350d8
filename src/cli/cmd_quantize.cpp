// edkm quantize: the post-training baselines (pipeline/quantize.h).
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/atomic_file.h"
#include "pipeline/quantize.h"

namespace edkm::cli {

void register_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize", "Post-training baselines without fine-tuning: k-means palettes (plain or "
                                             "sensitivity-weighted), RTN or GPTQ");
  auto args = std::make_shared<ModelArgs>();
  auto o = std::make_shared<QuantizeOptions>();
  auto method = std::make_shared<std::string>(to_string(o->method));
  auto config = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  o->calib = std::string(EDKM_DEFAULT_ASSETS) + "/calib/c4_demo_300.jsonl";
  add_model_args(cmd, *args);
  cmd->add_option("--method", *method, "kmeans, sensitive-kmeans, rtn or gptq")
      ->check(CLI::IsMember({"kmeans", "sensitive-kmeans", "rtn", "gptq"}));
  add_dkm_options(cmd, o->plan.defaults, {"bits", "group_size", "per_row_scale", "init"});
  cmd->add_option("-o,--out", o->out, "Output model file")->required();
  cmd->add_option("--config", *config, "JSON compression config (which weights, per-name settings)");
  cmd->add_flag("--include-embeddings", o->plan.include_embeddings, "Also quantize embeddings and classifier");
  cmd->add_option("--rtn-group", o->rtn_group, "RTN: weights per scale along a row (0: one per tensor)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--gptq-group", o->gptq_group, "GPTQ: weights per scale along a row (0: one per row)")->check(CLI::NonNegativeNumber);
  cmd->add_flag("--symmetric", o->symmetric, "RTN, GPTQ: symmetric grid");
  cmd->add_option("--calib", o->calib, "sensitive-kmeans, GPTQ: calibration text (JSONL of {\"text\"}, Alpaca or plain text)");
  cmd->add_option("--calib-samples", o->calib_samples, "Calibration windows")->check(CLI::PositiveNumber);
  cmd->add_option("--calib-seq-len", o->calib_seq_len, "Tokens per calibration window")->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  cmd->add_flag("--checkpoint-layers", o->checkpoint_layers, "sensitive-kmeans: recompute layers in the backward (less memory)");
  cmd->add_flag("--json", *json, "Print the report as JSON");
  add_runner(cmd, [=] {
    check_writable(o->out);
    o->method = parse_ptq_method(*method);
    std::vector<InputPath> inputs = model_inputs(*args);
    inputs.push_back({"--config", *config});
    if (needs_calibration(o->method)) inputs.push_back({"--calib", o->calib});
    check_outputs_distinct({o->out}, inputs);
    if (!config->empty()) o->plan.apply_json(nlohmann::json::parse(read_file(*config)), *config);
    ModelArgs a = *args;
    if (a.dtype == "auto") a.dtype = "fp32";
    LoadedModel m = load_for_inference(a, /*require_tokenizer=*/needs_calibration(o->method));
    const QuantizeReport r = quantize(m, *o);
    if (*json) {
      print_json({{"out", r.out},
                  {"method", *method},
                  {"bits", o->plan.defaults.bits},
                  {"weights", r.quantized},
                  {"bits_per_weight", r.bits_per_weight},
                  {"calib_tokens", r.calib_tokens},
                  {"seconds", r.seconds},
                  {"peak_rss_mb", r.peak_rss / 1048576.0}});
    }
    std::cerr << fmt::format("edkm: wrote {} ({} {}-bit, {} weights, {:.3f} bits per weight, {:.1f} s, peak RSS {:.0f} MB)\n",
                             r.out, *method, o->plan.defaults.bits, r.quantized, r.bits_per_weight, r.seconds,
                             r.peak_rss / 1048576.0);
  });
}

}  // namespace edkm::cli
