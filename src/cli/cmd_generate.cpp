// edkm generate: stream text from a model.
#include <chrono>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/text.h"
#include "model/generate.h"

namespace edkm::cli {

void register_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate text, streaming tokens as they are sampled");
  auto args = std::make_shared<ModelArgs>();
  auto opts = std::make_shared<GenerateOptions>();
  auto seed = std::make_shared<int64_t>(-1);
  add_model_args(cmd, *args);
  cmd->add_option("-p,--prompt", opts->prompt, "Prompt text (default: empty, start from BOS)");
  cmd->add_option("-n,--max-tokens", opts->max_tokens, "New tokens to generate")->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--temperature", opts->sampler.temperature, "0 = greedy")->check(finite_in(0.0, 100.0));
  cmd->add_option("--top-p", opts->sampler.top_p, "Nucleus sampling mass (0 or 1: off)")->check(finite_in(0.0, 1.0));
  cmd->add_option("--seed", *seed, "Random seed (default: the time)");
  add_runner(cmd, [args, opts, seed] {
    check_utf8(opts->prompt, "--prompt");
    LoadedModel m = load_for_inference(*args);
    opts->sampler.seed = *seed >= 0 ? static_cast<uint64_t>(*seed)
                                    : static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
    GenerateStats st = generate(m.model, *m.tokenizer, *opts, [](const std::string& piece) {
      std::cout << piece << std::flush;
    });
    std::cout << "\n";
    std::cerr << fmt::format("edkm: {} tokens in {:.2f} s, {:.1f} tokens/s (prompt {} tokens, seed {})\n", st.generated,
                             st.seconds, st.tokens_per_second(), st.prompt_tokens, opts->sampler.seed);
    if (st.context_full)
      std::cerr << fmt::format("edkm: stopped at the model's context of {} tokens ({} prompt + {} new), before the {} "
                               "that -n asked for\n", m.model.config().max_seq_len, st.prompt_tokens, st.generated,
                               opts->max_tokens);
  });
}

}  // namespace edkm::cli
