// edkm quantize: the post-training baselines, written as models the other commands read.
//   kmeans  every selected weight hard-assigned to its k-means palette (a real compressed file)
//   rtn     round-to-nearest with a scale and zero point per group of weights along a row; stored
//           de-quantized (dense), recording the bits per weight a packed RTN file would take
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/atomic_file.h"
#include "common/error.h"
#include "export/format.h"
#include "train/clustering.h"
#include "train/compress.h"

namespace edkm::cli {

void register_quantize(CLI::App& app) {
  auto* cmd = app.add_subcommand("quantize", "Post-training baselines without fine-tuning: k-means palettes or RTN");
  auto args = std::make_shared<ModelArgs>();
  auto plan = std::make_shared<ClusteringPlan>();
  auto method = std::make_shared<std::string>("kmeans");
  auto out = std::make_shared<std::string>();
  auto config = std::make_shared<std::string>();
  auto rtn_group = std::make_shared<int64_t>(64);
  auto symmetric = std::make_shared<bool>(false);
  plan->defaults.bits = 3;
  add_model_args(cmd, *args);
  cmd->add_option("--method", *method, "kmeans or rtn")->check(CLI::IsMember({"kmeans", "rtn"}));
  cmd->add_option("-b,--bits", plan->defaults.bits, "Bits per weight")->check(CLI::Range(1, 8));
  cmd->add_option("-o,--out", *out, "Output model file")->required();
  cmd->add_option("--config", *config, "JSON compression config (which weights, per-name settings)");
  cmd->add_option("--group-size", plan->defaults.group_size, "k-means: rows per palette")->check(CLI::NonNegativeNumber);
  cmd->add_flag("--per-row-scale", plan->defaults.per_row_scale, "k-means: per-row scales");
  cmd->add_flag("--include-embeddings", plan->include_embeddings, "Also quantize embeddings and classifier");
  cmd->add_option("--rtn-group", *rtn_group, "RTN: weights per scale along a row (0: one per tensor)")->check(CLI::NonNegativeNumber);
  cmd->add_flag("--symmetric", *symmetric, "RTN: symmetric grid");
  add_runner(cmd, [=] {
    check_writable(*out);
    std::vector<InputPath> inputs = model_inputs(*args);
    inputs.push_back({"--config", *config});
    check_outputs_distinct({*out}, inputs);
    if (!config->empty()) plan->apply_json(nlohmann::json::parse(read_file(*config)), *config);
    ModelArgs a = *args;
    if (a.dtype == "auto") a.dtype = "fp32";
    LoadedModel m = load_for_inference(a, /*require_tokenizer=*/false);
    const auto chosen = plan->resolve(m.model);
    CompressedModel cm;
    if (*method == "kmeans") {
      Clustering c(m.model, chosen);
      std::vector<nlohmann::json> settings;
      for (const auto& w : c.weights()) settings.push_back(dkm_to_json(w.cfg));
      cm = make_compressed(m.model, c.palettize(m.model), settings, m.tokenizer.get());
    } else {
      double bits = 0, n = 0;
      for (const auto& [name, cfg] : chosen) {
        at::Tensor& w = m.model.weights()[name];
        w = rtn_quantize(w, {cfg.bits, *rtn_group, *symmetric});
        const int64_t rows = w.size(0), cols = w.size(1);
        const int64_t groups = *rtn_group > 0 ? rows * ((cols + *rtn_group - 1) / *rtn_group) : 1;
        bits += double(cfg.bits) * w.numel() + 32.0 * groups;  // fp16 scale and zero per group
        n += w.numel();
      }
      cm = make_compressed(m.model, {}, {}, m.tokenizer.get());
      cm.metadata["bits_per_weight"] = fmt::format("{:.6f}", bits / n);
      cm.metadata["rtn_group"] = std::to_string(*rtn_group);
    }
    cm.metadata["method"] = *method;
    cm.metadata["bits"] = std::to_string(plan->defaults.bits);
    write_compressed(*out, cm);
    std::cerr << fmt::format("edkm: wrote {} ({} {}-bit, {} weights)\n", *out, *method, plan->defaults.bits, chosen.size());
  });
}

}  // namespace edkm::cli
