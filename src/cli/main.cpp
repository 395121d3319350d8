// edkm command-line tool: a thin layer over the library; each subcommand lives in its own file.
#include <CLI/CLI.hpp>

#include <malloc.h>

#include <cstdlib>
#include <exception>
#include <thread>
#include <iostream>

#include "cli/commands.h"
#include "common/checksum.h"
#include "common/error.h"
#include "common/threads.h"
#include "dist/dist.h"

namespace {

// "compress " for `edkm compress ...`: the subcommand whose --help to point at ("" for none).
std::string command_path(const CLI::App& app) {
  std::string path;
  for (const CLI::App* node = &app;;) {
    auto subs = node->get_subcommands();
    if (subs.empty()) return path;
    node = subs.front();
    path += node->get_name() + " ";
  }
}

}  // namespace

int main(int argc, char** argv) {
  // glibc serves large blocks with mmap and returns them on free, so every training step and
  // attention window would fault its tensors' pages in again (measured: perplexity of
  // stories260K on TinyStories 42 s, 40 of them in the kernel, against 20 s). Serve blocks up to
  // 1 GB from the heap and keep freed memory there, as caching allocators do.
  if (!mallopt(M_MMAP_THRESHOLD, 1 << 30) || !mallopt(M_TRIM_THRESHOLD, 1 << 30))
    std::cerr << "edkm: warning: could not tune malloc; large tensors will be re-faulted\n";
  CLI::App app{"edkm: train-time weight clustering (DKM / eDKM) for LLaMA-family models"};
  app.set_version_flag("--version", std::string(EDKM_VERSION));
  app.require_subcommand(1);
  app.fallthrough();
  int threads = 0;
  bool no_verify = false;
  app.add_option("-t,--threads", threads, "Intra-op threads (default: the cores idle when edkm starts)");
  app.add_flag("--no-verify", no_verify, "Do not verify the checksums of files read (faster for very large files)");
  edkm::cli::register_commands(app);
  edkm::cli::set_command_line(argc, argv);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Every error exits 1 with the same prefix, whether the command line or the work failed.
    std::cerr << "edkm: error: " << e.what() << " (see 'edkm " << command_path(app) << "--help')\n";
    return 1;
  }
  try {
    // Data-parallel learners on one machine share its cores.
    if (threads == 0 && edkm::Dist::env_requests_group()) {
      const int world = std::atoi(std::getenv("WORLD_SIZE"));
      threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, world));
    }
    edkm::configure_threads(threads);
    edkm::set_verify_checksums(!no_verify);
    edkm::cli::run_selected(app);
  } catch (const std::exception& e) {
    std::cerr << "edkm: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
