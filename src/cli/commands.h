#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace edkm::cli {

// Each command file defines a register_* function that adds its subcommand and the callback
// run once parsing succeeded.
using Runner = std::function<void()>;
void add_runner(CLI::App* sub, Runner run);
void register_commands(CLI::App& app);
// The program's own command line (data-parallel launchers re-run it as learners).
void set_command_line(int argc, char** argv);
const std::vector<std::string>& command_line();
void run_selected(CLI::App& app);

void register_bench(CLI::App& app);
void register_generate(CLI::App& app);
void register_perplexity(CLI::App& app);
void register_convert(CLI::App& app);
void register_compress(CLI::App& app);
void register_export(CLI::App& app);
void register_eval(CLI::App& app);
void register_quantize(CLI::App& app);

}  // namespace edkm::cli
