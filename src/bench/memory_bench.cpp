#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <unistd.h>

#include "bench/bench.h"
#include "cluster/edkm.h"
#include "common/atomic_file.h"
#include "common/error.h"
#include "common/memory.h"
#include "dist/dist.h"

namespace edkm::bench {
namespace {

// The slice the dense configurations run on: the first rows of q_proj.
at::Tensor slice_of(const MemoryBenchOptions& o) {
  at::Tensor q = llama7b_layer(at::kBFloat16, 1.0, 0)[0];
  return q.narrow(0, 0, std::max<int64_t>(1, o.slice / q.size(1))).contiguous();
}

MemoryBenchRow run_edkm(const at::Tensor& w, int bits, bool m, bool u, bool s, std::shared_ptr<Dist> dist) {
  DKMConfig cfg;
  cfg.bits = bits;
  at::Tensor p = init_palette(w, cfg);
  cfg.method = DKMMethod::kEDKM;
  cfg.marshal = m, cfg.uniquify = u, cfg.shard = s;
  at::Tensor grad = at::randn_like(w);
  MemoryBenchRow row;
  row.config = std::string(m || u || s ? "" : "plain dense") + (m ? "+M" : "") + (u ? "+U" : "") + (s ? "+S" : "");
  row.learners = dist ? dist->world() : 1;
  SaveStats stats;
  row.seconds = best_seconds(
      [&] {
        at::Tensor x = w.detach().requires_grad_(true);
        DKMResult r = dkm_with_stats(x, p, cfg, &stats, {}, dist);
        torch::autograd::backward({r.weight}, {grad});
      },
      1);
  row.device_bytes = stats.device_bytes;
  row.host_bytes = stats.host_bytes;
  return row;
}

MemoryBenchRow scaled(MemoryBenchRow r, double f) {
  r.extrapolated = true;
  r.seconds *= f;
  r.device_bytes = static_cast<int64_t>(r.device_bytes * f);
  r.host_bytes = static_cast<int64_t>(r.host_bytes * f);
  return r;
}

}  // namespace

nlohmann::json to_json(const MemoryBenchRow& r) {
  return {{"config", r.config}, {"learners", r.learners}, {"extrapolated", r.extrapolated}, {"seconds", r.seconds},
          {"device_bytes", r.device_bytes}, {"host_bytes", r.host_bytes}};
}

MemoryBenchRow row_from_json(const nlohmann::json& j) {
  MemoryBenchRow r;
  r.config = j.at("config");
  r.learners = j.at("learners");
  r.extrapolated = j.at("extrapolated");
  r.seconds = j.at("seconds");
  r.device_bytes = j.at("device_bytes");
  r.host_bytes = j.at("host_bytes");
  return r;
}

MemoryBenchRow run_memory_learner(const MemoryBenchOptions& o) {
  return run_edkm(slice_of(o), o.bits, true, true, true, default_dist());
}

MemoryBenchResult run_memory_bench(const MemoryBenchOptions& o) {
  TensorMemory::install();
  MemoryBenchResult res;
  res.threads = at::get_num_threads();
  std::vector<at::Tensor> layer = llama7b_layer(at::kBFloat16, 1.0, 0);
  for (const auto& m : layer) res.layer_weights += m.numel();
  at::Tensor slice = slice_of(o);
  res.slice = slice.numel();
  MemoryBenchRow unique_row;
  const double f = double(res.layer_weights) / res.slice;
  // (Measured first: after the dense configurations' gigabytes, the heap makes every later
  // allocation slower.)
  // The unique-value method on the whole layer: what stays allocated after the forward pass
  // beyond its output (counting allocator), and the time.
  {
    DKMConfig cfg;
    cfg.bits = o.bits;
    cfg.method = DKMMethod::kUnique;
    MemoryBenchRow row{"unique-value (ours)", 1, false, 0, 0, 0};
    std::vector<at::Tensor> pal, grads;
    for (const auto& w : layer) pal.push_back(init_palette(w, cfg)), grads.push_back(at::randn_like(w));
    int64_t saved = 0;
    row.seconds = best_seconds(
        [&] {
          saved = 0;
          for (size_t i = 0; i < layer.size(); ++i) {
            at::Tensor x = layer[i].detach().requires_grad_(true);
            const int64_t before = TensorMemory::current();
            DKMResult r = dkm(x, pal[i], cfg);
            saved += TensorMemory::current() - before - static_cast<int64_t>(r.weight.nbytes());
            torch::autograd::backward({r.weight}, {grads[i]});
          }
        },
        3);  // best of 3 after a warm-up, as `bench dkm` measures it: the first passes fault pages in
    row.device_bytes = saved;
    unique_row = row;
  }
  for (auto [m, u] : {std::pair{false, false}, {true, false}, {true, true}})
    res.rows.push_back(scaled(run_edkm(slice, o.bits, m, u, false, nullptr), f));
  // Sharding: real learner processes (this program, re-run), each measuring its share.
  for (int L : o.learners) {
    const std::string out = (std::filesystem::temp_directory_path() / fmt::format("edkm-mem-{}-{}.json", ::getpid(), L)).string();
    std::vector<std::string> argv{"edkm", "bench", "memory", "--learner-out", out,
                                  "--bits", std::to_string(o.bits), "--slice", std::to_string(o.slice)};
    if (int rc = launch_local(L, argv)) throw_input("sharded learners (L = {}) failed with status {}", L, rc);
    MemoryBenchRow r = row_from_json(nlohmann::json::parse(read_file(out)));
    std::filesystem::remove(out);
    res.rows.push_back(scaled(r, f));
  }
  res.rows.push_back(unique_row);
  return res;
}

std::string MemoryBenchResult::table() const {
  std::string s = fmt::format(
      "DKM memory for one LLaMA-7B decoder layer ({}M bf16 weights), saved for backward per learner; dense "
      "configurations measured on {}M weights of q_proj and scaled; {} threads\n",
      layer_weights / 1000000, slice / 1000000.0, threads);
  s += fmt::format("{:<22} {:>8} {:>14} {:>14} {:>14} {:>10} {:>12}\n", "config", "learners", "device MB", "host MB",
                   "total MB", "seconds", "vs plain");
  const double plain = rows.front().total();
  for (const auto& r : rows)
    s += fmt::format("{:<22} {:>8} {:>14.1f} {:>14.1f} {:>14.1f} {:>10.2f} {:>11.0f}x\n", r.config + (r.extrapolated ? " *" : ""),
                     r.learners, r.device_bytes / 1e6, r.host_bytes / 1e6, r.total() / 1e6, r.seconds, plain / std::max<int64_t>(1, r.total()));
  s += "* extrapolated linearly from the slice\n";
  return s;
}

nlohmann::json to_json(const MemoryBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& x : r.rows) rows.push_back(to_json(x));
  return {{"benchmark", "memory"}, {"threads", r.threads}, {"layer_weights", r.layer_weights}, {"slice", r.slice}, {"rows", rows}};
}

}  // namespace edkm::bench
