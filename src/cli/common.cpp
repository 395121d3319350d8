#include "cli/common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <iostream>

#include "common/error.h"

namespace edkm::cli {

void add_model_args(CLI::App* cmd, ModelArgs& a) {
  cmd->add_option("-m,--model", a.model, "Hugging Face directory, GGUF file, llama2.c .bin checkpoint or edkm compressed file")->required();
  cmd->add_option("--tokenizer", a.tokenizer, "Tokenizer file (default: found beside the model)");
  cmd->add_option("--dtype", a.dtype, "Compute dtype: auto, fp32, bf16, fp16")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}));
  cmd->add_option("--device", a.device, "auto, cpu, cuda or cuda:N");
}

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "fp32") return at::kFloat;
  if (s == "bf16") return at::kBFloat16;
  if (s == "fp16") return at::kHalf;
  throw_invalid("unknown dtype '{}' (expected fp32, bf16 or fp16)", s);
}

at::Device parse_device(const std::string& s) {
  if (s == "auto") return at::hasCUDA() ? at::Device("cuda") : at::Device("cpu");
  try {
    at::Device d(s);
    if (d.is_cuda() && !at::hasCUDA()) throw_invalid("device '{}' requested but this build/machine has no CUDA", s);
    return d;
  } catch (const c10::Error&) {
    throw_invalid("unknown device '{}' (expected cpu, cuda or cuda:N)", s);
  }
}

LoadedModel load_for_inference(const ModelArgs& a, bool require_tokenizer, bool verbose) {
  LoadedModel m = load_model(a.model, a.tokenizer, require_tokenizer);
  const at::Device device = parse_device(a.device);
  at::ScalarType dtype = m.model.dtype();
  if (a.dtype == "auto") {
    if (dtype != at::kBFloat16 || !device.is_cpu()) dtype = dtype == at::kHalf && device.is_cpu() ? at::kFloat : dtype;
    if (dtype == at::kDouble) dtype = at::kFloat;
  } else {
    dtype = parse_dtype(a.dtype);
  }
  if (dtype == at::kHalf && device.is_cpu())
    throw_invalid("fp16 has no CPU kernels in this libtorch; use --dtype fp32 or bf16 on CPU");
  m.model.to(dtype);
  m.model.to(device);
  const LlamaConfig& c = m.model.config();
  if (verbose)
    std::cerr << fmt::format("edkm: {} ({:.2f}M parameters, {} layers, dim {}, vocab {}, context {}) {} on {}, {} threads\n",
                           a.model, c.num_parameters() / 1e6, c.n_layers, c.dim, c.vocab_size, c.max_seq_len,
                           c10::toString(dtype), device.str(), at::get_num_threads());
  return m;
}

CLI::Validator finite_in(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return fmt::format("'{}' is not a number", s);
        if (!std::isfinite(v)) return fmt::format("{} is not a finite number", s);
        if (v < lo || v > hi)
          return std::isinf(hi) ? fmt::format("{} is less than {}", s, lo) : fmt::format("{} is outside [{}, {}]", s, lo, hi);
        return {};
      },
      std::isinf(hi) ? fmt::format("NUMBER >= {}", lo) : fmt::format("NUMBER in [{}, {}]", lo, hi));
}

CLI::Validator positive_finite() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return fmt::format("'{}' is not a number", s);
        if (!std::isfinite(v) || v <= 0) return fmt::format("{} is not a positive finite number", s);
        return {};
      },
      "POSITIVE");
}

void add_dkm_options(CLI::App* cmd, DKMConfig& cfg, const std::vector<std::string>& only) {
  for_each_dkm_setting(cfg, [&](const DKMSetting& s, auto& field) {
    if (!only.empty() && std::find(only.begin(), only.end(), s.name) == only.end()) return;
    using T = std::decay_t<decltype(field)>;
    if constexpr (std::is_same_v<T, bool>) {
      cmd->add_flag(s.flag, field, s.help);
    } else if constexpr (std::is_enum_v<T>) {
      cmd->add_option_function<std::string>(s.flag, [&field](const std::string& v) { parse_setting(v, field); }, s.help)
          ->check(CLI::Validator(
              [](std::string& v) -> std::string {
                T parsed;
                try {
                  parse_setting(v, parsed);
                } catch (const std::invalid_argument& e) {
                  return e.what();
                }
                return {};
              },
              "TEXT"));
    } else {
      cmd->add_option(s.flag, field, s.help)
          ->check(CLI::Validator(
              [s](std::string& v) -> std::string {
                double x = 0;
                if (!CLI::detail::lexical_cast(v, x)) return fmt::format("'{}' is not a number", v);
                if (!s.in_range(x)) return fmt::format("{} must be {}, got {}", s.name, s.range_text(), v);
                return {};
              },
              "NUMBER " + s.range_text()));
    }
  });
}

std::vector<InputPath> model_inputs(const ModelArgs& a) { return {{"-m", a.model}, {"--tokenizer", a.tokenizer}}; }

void print_json(const nlohmann::json& j) { std::cout << j.dump(2) << "\n"; }

}  // namespace edkm::cli
