// edkm info / size / export: what a compressed model holds, what a config would become, and a
// dense Hugging Face copy of a compressed model.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "format/format.h"
#include "format/size.h"
#include "pipeline/export.h"

namespace edkm::cli {

void register_export(CLI::App& app) {
  {
    auto* cmd = app.add_subcommand("info", "Per-tensor storage, bits per weight and compression ratio of a compressed model");
    auto file = std::make_shared<std::string>();
    auto json = std::make_shared<bool>(false);
    cmd->add_option("file", *file, "Compressed model (.edkm)")->required();
    cmd->add_flag("--json", *json, "Print the results as JSON");
    add_runner(cmd, [file, json] {
      CompressedModel m = read_compressed(*file);
      SizeReport r = size_of(m);
      if (*json) {
        nlohmann::json j = r.to_json();
        j["file"] = *file;
        j["config"] = m.config.to_hf();
        j["tokenizer"] = m.tokenizer_name;
        j["metadata"] = m.metadata;
        print_json(j);
      } else {
        const LlamaConfig& c = m.config;
        std::cout << fmt::format("{}: edkm format v{}, LLaMA dim {}, {} layers, {} heads ({} kv), vocab {}, tokenizer {}\n",
                                 *file, kFormatVersion, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
                                 m.tokenizer_name.empty() ? "none" : m.tokenizer_name)
                  << r.table(true);
      }
    });
  }
  {
    auto* cmd = app.add_subcommand("size", "Size of a model compressed with given settings, from its config.json alone");
    auto config = std::make_shared<std::string>();
    auto plan = std::make_shared<SizePlan>();
    auto json = std::make_shared<bool>(false);
    auto per_tensor = std::make_shared<bool>(false);
    cmd->add_option("--config", *config, "Hugging Face config.json (or a model directory holding one)")->required();
    cmd->add_option("-b,--bits", plan->bits, "Bits per weight index")->check(CLI::Range(1, 8));
    cmd->add_option("--group-size", plan->group_size, "Rows per palette (0: one per tensor)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--cluster-dim", plan->cluster_dim, "Weights per centroid vector")->check(CLI::PositiveNumber);
    cmd->add_flag("--per-row-scale", plan->per_row_scale, "Count per-row scales");
    cmd->add_flag("--include-embeddings", plan->include_embeddings, "Also palettize embeddings and classifier");
    cmd->add_flag("--per-tensor", *per_tensor, "List every tensor");
    cmd->add_flag("--json", *json, "Print the results as JSON");
    add_runner(cmd, [config, plan, json, per_tensor] {
      std::string path = *config;
      if (std::filesystem::is_directory(path)) path += "/config.json";
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(read_file(path));
      } catch (const nlohmann::json::exception& e) {
        throw_input("{}: invalid JSON: {}", path, e.what());
      }
      SizeReport r = size_from_config(LlamaConfig::from_hf(j, path), *plan);
      if (*json) print_json(r.to_json());
      else std::cout << r.table(*per_tensor);
    });
  }
  {
    auto* cmd = app.add_subcommand("export", "Write a compressed model as an ordinary Hugging Face directory (de-palettized)");
    auto file = std::make_shared<std::string>();
    auto out = std::make_shared<std::string>();
    auto dtype = std::make_shared<std::string>("bf16");
    cmd->add_option("file", *file, "Compressed model (.edkm)")->required();
    cmd->add_option("-o,--out", *out, "Output directory")->required();
    cmd->add_option("--dtype", *dtype, "bf16, fp16 or fp32")->check(CLI::IsMember({"bf16", "fp16", "fp32"}));
    add_runner(cmd, [file, out, dtype] {
      const std::string tokenizer = export_hf(*file, *out, parse_dtype(*dtype));
      std::cerr << fmt::format("edkm: wrote {} (config.json, model.safetensors in {}{})\n", *out, *dtype,
                               tokenizer.empty() ? "" : ", " + tokenizer);
    });
  }
}

}  // namespace edkm::cli
