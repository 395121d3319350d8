// `edkm bench dkm`: forward + backward of DKM on one LLaMA-7B decoder layer, for each method,
// beside the element-wise floor (w * s), measured in one run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <chrono>

#include "bench/bench.h"
#include "cluster/cluster.h"
#include "cluster/layout.h"
#include "cluster/pattern_index.h"
#include "cluster/uspace.h"
#include "cluster/value_index.h"
#include "common/memory.h"

namespace edkm::bench {

double best_seconds(const std::function<void()>& f, int reps) {
  f();
  double best = 1e300;
  for (int i = 0; i < std::max(1, reps); ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

void synchronize(const at::Device& device) {
  // A copy to the host waits for everything queued before it on the current stream, which is
  // where all of edkm's work goes; portable across libtorch versions and devices.
  if (!device.is_cpu()) at::zeros({1}, at::device(device)).cpu();
}

std::vector<at::Tensor> llama7b_layer(at::ScalarType dtype, double scale, uint64_t seed) {
  at::manual_seed(seed);
  const int64_t d = std::max<int64_t>(1, int64_t(4096 * scale)), h = std::max<int64_t>(1, int64_t(11008 * scale));
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{d, 4096}, {d, 4096}, {d, 4096}, {d, 4096},
                                                           {h, 4096}, {h, 4096}, {d, 11008}};
  std::vector<at::Tensor> out;
  for (auto [r, c] : shapes) out.push_back((at::randn({r, c}) * 0.02).to(dtype));
  return out;
}

namespace {

int64_t bytes(const at::Tensor& t) { return t.defined() ? t.numel() * t.element_size() : 0; }

// One method on a set of matrices. A run is the forward of every matrix, then the backward of
// each, with the memory accounting described on DKMBenchRow: extra memory at any moment is the
// tensor bytes held beyond the inputs, the outputs and the weight gradients produced so far.
using Forward = std::function<at::Tensor(size_t i, const at::Tensor& w)>;

struct Case {
  DKMBenchRow row;
  at::Device device;
  const std::vector<at::Tensor>* mats;
  const std::vector<at::Tensor>* grads;
  Forward fwd;

  Case(std::string method, std::string scope, const std::vector<at::Tensor>& m,
       const std::vector<at::Tensor>& g, Forward f)
      : row{std::move(method), std::move(scope)}, device(m.front().device()), mats(&m), grads(&g), fwd(std::move(f)) {
    for (const auto& w : m) row.weights += w.numel();
  }

  // Returns the seconds the run took.
  double run_once() {
    synchronize(device);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<at::Tensor> ws, outs;
    for (const auto& m : *mats) ws.push_back(m.detach().requires_grad_(true));
    TensorMemory::reset_peak(device);
    const int64_t base = TensorMemory::current(device);
    int64_t out_bytes = 0;
    for (size_t i = 0; i < ws.size(); ++i) {
      outs.push_back(fwd(i, ws[i]));
      out_bytes += bytes(outs.back());
    }
    int64_t extra = TensorMemory::peak(device) - base - out_bytes;
    row.saved_bytes = std::max<int64_t>(0, TensorMemory::current(device) - base - out_bytes);
    int64_t grad_bytes = 0;
    for (size_t i = 0; i < ws.size(); ++i) {
      TensorMemory::reset_peak(device);
      const int64_t before = TensorMemory::current(device);
      torch::autograd::backward({outs[i]}, {(*grads)[i]});
      outs[i] = at::Tensor();
      out_bytes -= bytes((*mats)[i]);
      const int64_t stash = before - base - out_bytes - bytes((*mats)[i]) - grad_bytes;
      extra = std::max(extra, stash + TensorMemory::peak(device) - before - bytes(ws[i].grad()));
      grad_bytes += bytes(ws[i].grad());
    }
    row.extra_bytes = std::max<int64_t>(0, extra);
    synchronize(device);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

// A warm-up round, then `reps` rounds that run every case once each; every case keeps its best
// time. Alternating the cases exposes them alike to changes in machine speed during the run
// (other tenants of a shared host, clock changes), which would otherwise land on whichever
// case ran while the machine was slow and skew the ratios between them.
void measure_side_by_side(std::vector<Case*> cases, int reps) {
  for (Case* c : cases) c->run_once();
  for (Case* c : cases) c->row.seconds = 1e300;
  for (int r = 0; r < std::max(1, reps); ++r)
    for (Case* c : cases) c->row.seconds = std::min(c->row.seconds, c->run_once());
}

std::string mib(int64_t b) { return fmt::format("{:.1f}", b / 1048576.0); }

// The unique method's passes on one matrix, each timed on its own (best of reps), with the
// dtypes dkm() gives them: the unique-space arithmetic in fp64, the per-value tables in fp32.
// On a GPU the two scatter-adds also run with the warp-aggregated atomics that the kernels'
// shared-memory tiles replace where groups are large, in the same rounds.
std::vector<DKMPassRow> measure_passes(const std::string& name, const at::Tensor& w, const at::Tensor& grad,
                                       const DKMConfig& cfg, int reps) {
  using namespace detail;
  const GroupLayout layout = GroupLayout::of(w, cfg);
  const at::Tensor palette = init_palette(w, cfg).to(at::kDouble);
  const SoftKMeans p = SoftKMeans::from(cfg);
  std::vector<std::string> names = {"index", "uspace_forward", "emit", "gradient_sum", "uspace_backward", "gradient"};
#ifdef EDKM_CUDA
  const bool warp_rows = w.is_cuda();
  if (warp_rows) names.insert(names.end(), {"index, warp atomics", "gradient_sum, warp atomics"});
#endif
  std::vector<double> best(names.size(), 1e300);
  for (int r = 0; r < std::max(1, reps) + 1; ++r) {  // the first round warms up
    std::vector<double> t;
    synchronize(w.device());
    auto lap = [&, t0 = std::chrono::steady_clock::now()]() mutable {
      synchronize(w.device());
      const auto now = std::chrono::steady_clock::now();
      t.push_back(std::chrono::duration<double>(now - t0).count());
      t0 = now;
    };
    auto index = make_pattern_index(w, layout, cfg, at::Tensor());
    lap();
    const at::Tensor v = index->values().to(at::kDouble), n = index->counts().to(at::kDouble);
    at::Tensor out;
    UniqueSpaceState state = uspace_forward(v, n, palette, p, &out);
    lap();
    at::Tensor y = index->emit(out.to(at::kFloat));
    lap();
    at::Tensor g = index->aggregate(grad).to(at::kDouble);
    lap();
    UniqueSpaceGrad ug = uspace_backward(v, n, state, g, p);
    lap();
    at::Tensor dw = index->input_grad(grad, ug.jac.to(at::kFloat), ug.h.to(at::kFloat));
    lap();
#ifdef EDKM_CUDA
    if (warp_rows) {
      auto warp = make_cuda_pattern_index(w, layout, at::Tensor(), rounding_dtype(w, cfg.cluster_dtype),
                                          CudaScatter{CudaScatter::kWarpAtomics});
      lap();
      warp->aggregate(grad);
      lap();
    }
#endif
    if (r > 0)
      for (size_t i = 0; i < best.size(); ++i) best[i] = std::min(best[i], t[i]);
  }
  std::vector<DKMPassRow> rows;
  for (size_t i = 0; i < best.size(); ++i) rows.push_back({name, names[i], best[i]});
  return rows;
}

}  // namespace

DKMBenchResult run_dkm_bench(const DKMBenchOptions& opts) {
  TensorMemory::install();
  DKMBenchResult res;
  res.options = opts;
  res.threads = at::get_num_threads();
  DKMConfig cfg;
  cfg.bits = opts.bits;

  std::vector<at::Tensor> layer = llama7b_layer(opts.weight_dtype, opts.layer_scale);
  for (at::Tensor& w : layer) w = w.to(opts.device);
  std::vector<at::Tensor> grads, palettes;
  for (const auto& w : layer) {
    grads.push_back(at::randn_like(w));
    palettes.push_back(init_palette(w, cfg));
  }
  auto dkm_with = [&](DKMMethod m, const std::vector<at::Tensor>& pal) -> Forward {
    return [&pal, m, cfg](size_t i, const at::Tensor& w) {
      DKMConfig c = cfg;
      c.method = m;
      return dkm(w, pal[i], c).weight;
    };
  };
  const at::Tensor s = at::full({}, 1.5, at::TensorOptions(opts.weight_dtype).device(opts.device));
  Forward floor = [&](size_t, const at::Tensor& w) { return w * s; };

  Case floor_case("floor (w*s)", "layer", layer, grads, floor);
  Case unique_case("unique", "layer", layer, grads, dkm_with(DKMMethod::kUnique, palettes));
  Case auto_case("auto", "layer", layer, grads, dkm_with(DKMMethod::kAuto, palettes));
  measure_side_by_side({&floor_case, &unique_case, &auto_case}, opts.reps);
  const DKMBenchRow &floor_row = floor_case.row, &unique_row = unique_case.row, &auto_row = auto_case.row;

  // The dense method materialises N x k tensors per iteration: tens of GB for the layer. It
  // runs on the first rows of q_proj, beside the unique method on the same slice.
  const int64_t cols = layer[0].size(1);
  const int64_t slice_rows = std::min<int64_t>(layer[0].size(0), std::max<int64_t>(1, opts.dense_slice / cols));
  std::vector<at::Tensor> slice{layer[0].narrow(0, 0, slice_rows)};
  std::vector<at::Tensor> slice_grads{grads[0].narrow(0, 0, slice_rows)};
  std::vector<at::Tensor> slice_pal{init_palette(slice[0], cfg)};
  Case dense_case("dense", "slice", slice, slice_grads, dkm_with(DKMMethod::kDense, slice_pal));
  Case unique_slice_case("unique", "slice", slice, slice_grads, dkm_with(DKMMethod::kUnique, slice_pal));
  measure_side_by_side({&dense_case, &unique_slice_case}, opts.reps);
  const DKMBenchRow &dense_slice = dense_case.row, &unique_slice = unique_slice_case.row;
  DKMBenchRow dense_layer = dense_slice;
  const double f = double(unique_row.weights) / dense_slice.weights;
  dense_layer.scope = "layer";
  dense_layer.extrapolated = true;
  dense_layer.weights = unique_row.weights;
  dense_layer.seconds *= f;
  dense_layer.saved_bytes = int64_t(dense_layer.saved_bytes * f);
  dense_layer.extra_bytes = int64_t(dense_layer.extra_bytes * f);

  res.rows = {floor_row, unique_row, auto_row, dense_layer, dense_slice, unique_slice};
  // Where the unique method's time goes, on the layer's two shapes (q_proj and gate_proj).
  for (auto [i, name] : {std::pair<size_t, const char*>{0, "q_proj"}, {4, "gate_proj"}})
    for (DKMPassRow& row : measure_passes(name, layer[i], grads[i], cfg, opts.reps)) res.passes.push_back(row);
  res.speedup_vs_dense = dense_slice.seconds / unique_slice.seconds;
  res.memory_ratio = double(unique_row.extra_bytes) / double(dense_layer.extra_bytes);
  res.vs_floor = unique_row.seconds / floor_row.seconds;
  return res;
}

std::string format_table(const DKMBenchResult& r) {
  std::string s = fmt::format(
      "DKM forward+backward on {}, bits {}, {} weights N(0, 0.02), threads {}, best of {}\n", r.options.device.str(),
      r.options.bits, r.options.weight_dtype == at::kFloat ? "fp32" : "bf16", r.threads, r.options.reps);
  s += fmt::format("{:<12} {:<22} {:>12} {:>10} {:>12} {:>12}\n", "method", "scope", "weights",
                   "seconds", "saved MiB", "extra MiB");
  for (const auto& row : r.rows) {
    std::string scope = row.scope == "layer" ? "decoder layer" : "q_proj slice";
    if (row.extrapolated) scope += " (extrap.)";
    s += fmt::format("{:<12} {:<22} {:>12} {:>10.3f} {:>12} {:>12}\n", row.method, scope,
                     row.weights, row.seconds, mib(row.saved_bytes), mib(row.extra_bytes));
  }
  s += fmt::format("unique vs dense, same slice: {:.0f}x faster\n", r.speedup_vs_dense);
  s += fmt::format("unique / element-wise floor, layer: {:.2f}x the time\n", r.vs_floor);
  s += fmt::format("unique / dense extra memory, layer: {:.4f}% (dense extrapolated)\n",
                   100 * r.memory_ratio);
  s += fmt::format("unique method by pass, ms (each timed alone, best of {}):\n", r.options.reps);
  s += fmt::format("{:<28} {:>10} {:>10}\n", "pass", "q_proj", "gate_proj");
  const size_t per_matrix = r.passes.size() / 2;  // q_proj's passes, then gate_proj's
  for (size_t i = 0; i < per_matrix; ++i)
    s += fmt::format("{:<28} {:>10.2f} {:>10.2f}\n", r.passes[i].pass, 1e3 * r.passes[i].seconds,
                     1e3 * r.passes[per_matrix + i].seconds);
  return s;
}

nlohmann::json to_json(const DKMBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& row : r.rows)
    rows.push_back({{"method", row.method}, {"scope", row.scope}, {"extrapolated", row.extrapolated},
                    {"weights", row.weights}, {"seconds", row.seconds},
                    {"saved_bytes", row.saved_bytes}, {"extra_bytes", row.extra_bytes}});
  nlohmann::json passes = nlohmann::json::array();
  for (const auto& p : r.passes) passes.push_back({{"matrix", p.matrix}, {"pass", p.pass}, {"seconds", p.seconds}});
  return {{"benchmark", "dkm"},
          {"device", r.options.device.str()},
          {"weights", r.options.weight_dtype == at::kFloat ? "fp32" : "bf16"},
          {"bits", r.options.bits},
          {"reps", r.options.reps},
          {"layer_scale", r.options.layer_scale},
          {"threads", r.threads},
          {"rows", rows},
          {"passes", passes},
          {"speedup_unique_vs_dense", r.speedup_vs_dense},
          {"unique_over_floor_time", r.vs_floor},
          {"unique_over_dense_memory", r.memory_ratio}};
}

}  // namespace edkm::bench
