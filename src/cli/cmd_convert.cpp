// edkm convert: between llama2.c checkpoints and Hugging Face safetensors directories.
#include <filesystem>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/error.h"
#include "model/io/hf.h"
#include "model/io/llama2c.h"

namespace edkm::cli {

void register_convert(CLI::App& app) {
  auto* cmd = app.add_subcommand("convert", "Convert llama2.c <-> Hugging Face safetensors directory");
  auto args = std::make_shared<ModelArgs>();
  auto out = std::make_shared<std::string>();
  auto format = std::make_shared<std::string>("hf");
  add_model_args(cmd, *args);
  cmd->add_option("-o,--out", *out, "Output directory (hf) or .bin file (llama2c)")->required();
  cmd->add_option("--format", *format, "hf or llama2c (v1, fp32)")->check(CLI::IsMember({"hf", "llama2c"}));
  add_runner(cmd, [args, out, format] {
    if (*format == "hf")
      check_outputs_distinct({*out + "/config.json", *out + "/model.safetensors"}, model_inputs(*args));
    else
      check_outputs_distinct({*out}, model_inputs(*args));
    LoadedModel m = load_model(args->model, args->tokenizer, /*require_tokenizer=*/false);
    if (*format == "hf") {
      const at::ScalarType dtype = args->dtype == "auto" ? m.model.dtype() : parse_dtype(args->dtype);
      save_hf_dir(m.model, *out, dtype, m.tokenizer.get());
      std::cerr << fmt::format("edkm: wrote {} (config.json, model.safetensors {}{})\n", *out, c10::toString(dtype),
                               m.tokenizer ? ", tokenizer" : "; no tokenizer found, pass --tokenizer to include one");
    } else {
      if (args->dtype != "auto" && args->dtype != "fp32")
        throw_invalid("llama2.c v1 checkpoints are fp32; drop --dtype {}", args->dtype);
      save_llama2c(m.model, *out);
      std::cerr << fmt::format("edkm: wrote {} (llama2.c v1, fp32)\n", *out);
    }
  });
}

}  // namespace edkm::cli
