// edkm bench dkm: the DKM side-by-side benchmark.
#include <nlohmann/json.hpp>

#include <iostream>

#include "bench/bench.h"
#include "cli/commands.h"

namespace edkm::cli {

void register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks that measure side by side in one run");
  bench->require_subcommand(1);

  auto* dkm = bench->add_subcommand(
      "dkm", "DKM forward+backward on one LLaMA-7B decoder layer: dense vs unique vs element-wise floor");
  auto opts = std::make_shared<bench::DKMBenchOptions>();
  auto json = std::make_shared<bool>(false);
  dkm->add_option("--bits", opts->bits, "Bits per weight (k = 2^bits)")->check(CLI::Range(1, 8));
  dkm->add_option("--reps", opts->reps, "Timed repetitions (the best is reported)")->check(CLI::Range(1, 100));
  dkm->add_option("--layer-scale", opts->layer_scale,
                  "Shrink the layer's output dimensions by this factor (1 = LLaMA-7B)")
      ->check(CLI::Range(1e-3, 1.0));
  dkm->add_option("--dense-slice", opts->dense_slice, "Weights the dense method is run on")
      ->check(CLI::Range(int64_t(1024), int64_t(1) << 30));
  dkm->add_flag("--json", *json, "Print the results as JSON");
  add_runner(dkm, [opts, json] {
    bench::DKMBenchResult r = bench::run_dkm_bench(*opts);
    if (*json)
      std::cout << bench::to_json(r).dump(2) << "\n";
    else
      std::cout << bench::format_table(r);
  });
}

}  // namespace edkm::cli
