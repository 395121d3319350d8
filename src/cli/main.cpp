// edkm command-line tool: a thin layer over the library; each subcommand lives in its own file.
#include <CLI/CLI.hpp>

#include <exception>
#include <iostream>

#include "cli/commands.h"
#include "common/error.h"

int main(int argc, char** argv) {
  CLI::App app{"edkm: train-time weight clustering (DKM / eDKM) for LLaMA-family models"};
  app.set_version_flag("--version", std::string(EDKM_VERSION));
  app.require_subcommand(1);
  edkm::cli::register_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    edkm::cli::run_selected(app);
  } catch (const std::exception& e) {
    std::cerr << "edkm: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
