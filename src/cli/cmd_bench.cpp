#include "cli/commands.h"

namespace edkm::cli {

void register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks that measure side by side in one run");
  bench->require_subcommand(1);
}

}  // namespace edkm::cli
