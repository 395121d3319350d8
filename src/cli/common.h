// Options and helpers shared by the commands.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json_fwd.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "cluster/settings.h"
#include "common/atomic_file.h"
#include "pipeline/load.h"

namespace edkm::cli {

struct ModelArgs {
  std::string model;
  std::string tokenizer;
  std::string dtype = "auto";   // auto | fp32 | bf16 | fp16
  std::string device = "auto";  // auto | cpu | cuda | cuda:N
};

// --model (required), --tokenizer, --dtype, --device.
void add_model_args(CLI::App* cmd, ModelArgs& args);

// Loads the model (and tokenizer if required), casts and moves it, and prints a one-line
// summary to stderr. dtype auto: bf16 files stay bf16, everything else runs in fp32 (fp16 has
// no CPU kernels in libtorch 1.13).
LoadedModel load_for_inference(const ModelArgs& args, bool require_tokenizer = true, bool verbose = true);

at::ScalarType parse_dtype(const std::string& s);
at::Device parse_device(const std::string& s);

// A finite number in [lo, hi] (hi = infinity: no upper bound). Unlike CLI::Range it refuses NaN,
// which fails every comparison, and says "not a finite number" for Inf instead of printing the
// range of a double in 309 digits.
CLI::Validator finite_in(double lo, double hi = HUGE_VAL);
// A finite number > 0.
CLI::Validator positive_finite();

// The flags of DKMConfig's settings (cluster/settings.h), writing into cfg; `only` restricts them
// to the settings of those names.
void add_dkm_options(CLI::App* cmd, DKMConfig& cfg, const std::vector<std::string>& only = {});

// The inputs that ModelArgs names, for check_outputs_distinct.
std::vector<InputPath> model_inputs(const ModelArgs& args);

// Prints JSON to stdout (indented), for --json.
void print_json(const nlohmann::json& j);

}  // namespace edkm::cli
