#include "cli/commands.h"

#include <map>

namespace edkm::cli {
namespace {
std::map<const CLI::App*, Runner>& runners() {
  static std::map<const CLI::App*, Runner> r;
  return r;
}
}  // namespace

void add_runner(CLI::App* sub, Runner run) { runners()[sub] = std::move(run); }

namespace {
std::vector<std::string>& argv_store() {
  static std::vector<std::string> v;
  return v;
}
}  // namespace

void set_command_line(int argc, char** argv) { argv_store().assign(argv, argv + argc); }
const std::vector<std::string>& command_line() { return argv_store(); }

void register_commands(CLI::App& app) {
  register_compress(app);
  register_generate(app);
  register_perplexity(app);
  register_export(app);
  register_eval(app);
  register_quantize(app);
  register_convert(app);
  register_bench(app);
}

void run_selected(CLI::App& app) {
  // The deepest parsed subcommand with a runner.
  const CLI::App* node = &app;
  Runner run;
  while (true) {
    auto it = runners().find(node);
    if (it != runners().end()) run = it->second;
    auto subs = node->get_subcommands();
    if (subs.empty()) break;
    node = subs.front();
  }
  if (run) run();
}

}  // namespace edkm::cli
