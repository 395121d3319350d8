// edkm perplexity: sliding-window perplexity of a text file.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/progress.h"
#include "eval/perplexity.h"
#include "common/text.h"

namespace edkm::cli {

void register_perplexity(CLI::App& app) {
  auto* cmd = app.add_subcommand("perplexity", "Sliding-window perplexity of a text file");
  auto args = std::make_shared<ModelArgs>();
  auto opts = std::make_shared<PerplexityOptions>();
  auto text = std::make_shared<std::string>();
  auto heldout = std::make_shared<double>(0.0);
  auto json = std::make_shared<bool>(false);
  auto quiet = std::make_shared<bool>(false);
  add_model_args(cmd, *args);
  cmd->add_option("--text", *text, "UTF-8 text file")->required();
  cmd->add_option("--context", opts->context, "Window length in tokens (default: the model's context)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--stride", opts->stride, "Window step (default: the context, i.e. disjoint windows)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--batch", opts->batch, "Windows per forward pass")->check(CLI::PositiveNumber);
  cmd->add_option("--heldout", *heldout, "Score only the tail of the text that `compress --val-fraction F` holds out")
      ->check(finite_in(0.0, 0.9));
  cmd->add_flag("--json", *json, "Print the results as JSON");
  cmd->add_flag("-q,--quiet", *quiet, "No progress bar");
  add_runner(cmd, [args, opts, text, heldout, json, quiet] {
    LoadedModel m = load_for_inference(*args);
    const std::string content = read_heldout_text(*text, *heldout);
    std::vector<int> tokens = m.tokenizer->encode(content, /*bos=*/true, /*eos=*/false);
    Progress bar("perplexity", 0, *quiet);
    PerplexityResult r = perplexity(m.model, tokens, *opts, [&](int64_t done, int64_t total, double nats) {
      bar.set_total(total);
      bar.update(done, fmt::format("nats/token {:.4f}", nats));
    });
    bar.finish(fmt::format("nats/token {:.4f}", r.nats_per_token()));
    if (*json) {
      print_json({{"model", args->model}, {"text", *text}, {"heldout", *heldout}, {"tokens", r.tokens}, {"windows", r.windows},
                  {"context", r.context}, {"stride", r.stride}, {"nats_per_token", r.nats_per_token()},
                  {"perplexity", r.perplexity()}, {"seconds", bar.elapsed()}});
    } else {
      std::cout << fmt::format("{}: {} tokens scored in {} windows (context {}, stride {})\n", *text, r.tokens,
                               r.windows, r.context, r.stride)
                << fmt::format("nats/token {:.4f}   perplexity {:.4f}\n", r.nats_per_token(), r.perplexity());
    }
  });
}

}  // namespace edkm::cli
