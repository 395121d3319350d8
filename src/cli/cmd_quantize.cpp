// edkm quantize: the post-training baselines (pipeline/quantize.h).
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/atomic_file.h"
#include "pipeline/quantize.h"

namespace edkm::cli {

void register_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize", "Post-training baselines without fine-tuning: k-means palettes or RTN");
  auto args = std::make_shared<ModelArgs>();
  auto o = std::make_shared<QuantizeOptions>();
  auto method = std::make_shared<std::string>(to_string(o->method));
  auto config = std::make_shared<std::string>();
  add_model_args(cmd, *args);
  cmd->add_option("--method", *method, "kmeans or rtn")->check(CLI::IsMember({"kmeans", "rtn"}));
  add_dkm_options(cmd, o->plan.defaults, {"bits", "group_size", "per_row_scale", "init"});
  cmd->add_option("-o,--out", o->out, "Output model file")->required();
  cmd->add_option("--config", *config, "JSON compression config (which weights, per-name settings)");
  cmd->add_flag("--include-embeddings", o->plan.include_embeddings, "Also quantize embeddings and classifier");
  cmd->add_option("--rtn-group", o->rtn_group, "RTN: weights per scale along a row (0: one per tensor)")->check(CLI::NonNegativeNumber);
  cmd->add_flag("--symmetric", o->symmetric, "RTN: symmetric grid");
  add_runner(cmd, [=] {
    check_writable(o->out);
    std::vector<InputPath> inputs = model_inputs(*args);
    inputs.push_back({"--config", *config});
    check_outputs_distinct({o->out}, inputs);
    if (!config->empty()) o->plan.apply_json(nlohmann::json::parse(read_file(*config)), *config);
    o->method = parse_ptq_method(*method);
    ModelArgs a = *args;
    if (a.dtype == "auto") a.dtype = "fp32";
    LoadedModel m = load_for_inference(a, /*require_tokenizer=*/false);
    const QuantizeReport r = quantize(m, *o);
    std::cerr << fmt::format("edkm: wrote {} ({} {}-bit, {} weights)\n", r.out, *method, o->plan.defaults.bits, r.quantized);
  });
}

}  // namespace edkm::cli
