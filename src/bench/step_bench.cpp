// `edkm bench step`: what DKM adds to one fine-tuning step of a LLaMA-7B-shaped model, measured
// beside the same step without it and with the straight-through baselines in its place.
#include <ATen/ATen.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <optional>
#include <vector>

#include "bench/bench.h"
#include "common/error.h"
#include "common/memory.h"
#include "train/clustering.h"
#include "train/trainer.h"

namespace edkm::bench {
namespace {

LlamaConfig step_config(const StepBenchOptions& o) {
  LlamaConfig c;
  c.dim = o.dim;
  c.hidden_dim = o.hidden;
  c.n_layers = o.layers;
  c.n_heads = c.n_kv_heads = o.heads;
  c.vocab_size = o.vocab;
  c.max_seq_len = o.seq_len;
  c.tie_embeddings = false;
  c.validate("bench step");
  return c;
}

// Random token windows, each with its next-token targets: `batch` per step.
Dataset random_tokens(const StepBenchOptions& o, int64_t examples) {
  Dataset d;
  d.source = d.digest = "random tokens";
  d.kind = "text";
  at::Tensor t = at::randint(0, o.vocab, {examples, o.seq_len + 1}, at::kInt).contiguous();
  const int* p = t.data_ptr<int>();
  for (int64_t e = 0; e < examples; ++e) {
    const int* row = p + e * (o.seq_len + 1);
    d.train.push_back({std::vector<int>(row, row + o.seq_len), std::vector<int>(row + 1, row + o.seq_len + 1)});
  }
  return d;
}

std::string mode_name(const std::optional<TrainMethod>& method, int bits) {
  if (!method) return "fine-tune";
  switch (*method) {
    case TrainMethod::kDKM: return fmt::format("DKM {}-bit", bits);
    case TrainMethod::kHardKMeans: return fmt::format("hard k-means {}-bit", bits);
    case TrainMethod::kQAT: return fmt::format("QAT {}-bit", bits);
  }
  return "?";
}

// The clustering's parts of a step, as train() runs them (the soft weights in the autocast
// dtype), each on its own between device synchronisations; the step's gradients are random.
void time_parts(const StepBenchOptions& o, Llama& model, Clustering& clustering, at::ScalarType dtype,
                StepBenchRow& row) {
  std::vector<std::pair<std::string, at::Tensor*>> clustered;
  for (auto& [name, w] : model.weights())
    if (clustering.contains(name)) {
      w.requires_grad_(true);  // train() hands the weights back detached
      clustered.emplace_back(name, &w);
    }
  auto now = [&] {
    synchronize(o.device);
    return std::chrono::steady_clock::now();
  };
  auto seconds = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  for (int s = 0; s < o.steps; ++s) {
    const auto t0 = now();
    const StepWeights made = clustering.step(model, /*advance=*/true, dtype);
    const auto t1 = now();
    for (int pass = 0; pass < 2; ++pass)
      for (const auto& [name, w] : clustered) made.weight(name, *w);
    const auto t2 = now();
    for (const auto& [name, w] : clustered) w->mutable_grad() = at::randn_like(*w).mul_(1e-3);
    const auto t3 = now();
    made.backward(model);
    const auto t4 = now();
    row.before_forward_seconds += seconds(t0, t1) / o.steps;
    row.in_layers_seconds += seconds(t1, t2) / o.steps;
    row.after_backward_seconds += seconds(t3, t4) / o.steps;
  }
}

// One row; `method` empty: plain fine-tuning.
StepBenchRow measure(const StepBenchOptions& o, const LlamaConfig& cfg, const std::optional<TrainMethod>& method) {
  TensorMemory::reset_peak(o.device);
  Llama model = Llama::random(cfg, at::kFloat, /*seed=*/0);
  model.to(o.device);
  Clustering clustering;
  const bool cluster = method.has_value();
  if (cluster) {
    ClusteringPlan plan;
    plan.defaults.bits = o.bits;
    clustering = Clustering(model, plan.resolve(model), *method);
  }
  TrainOptions t;
  t.batch = o.batch;
  t.lr = 1e-5;
  t.checkpoint_layers = true;
  t.quiet = true;
  t.autocast = o.device.is_cuda() ? at::kBFloat16 : at::ScalarType::Undefined;
  // One untimed step (allocations, library start-up), then the timed ones, on fresh batches.
  const Dataset warm = random_tokens(o, o.batch), timed = random_tokens(o, o.batch * o.steps);
  t.steps = 1;
  train(model, cluster ? &clustering : nullptr, warm, t);
  t.steps = o.steps;
  synchronize(o.device);
  TrainReport r = train(model, cluster ? &clustering : nullptr, timed, t);
  synchronize(o.device);
  StepBenchRow row;
  row.mode = mode_name(method, o.bits);
  row.peak_tensor_bytes = TensorMemory::peak(o.device);
  row.seconds_per_step = r.seconds / std::max<int64_t>(1, r.steps_done);
  if (cluster) time_parts(o, model, clustering, t.autocast, row);
  return row;
}

}  // namespace

StepBenchResult run_step_bench(const StepBenchOptions& opts) {
  TensorMemory::install();
  StepBenchResult res;
  res.options = opts;
  const LlamaConfig cfg = step_config(opts);
  res.parameters = cfg.num_parameters();
  for (const std::optional<TrainMethod>& m : std::vector<std::optional<TrainMethod>>{
           std::nullopt, TrainMethod::kDKM, TrainMethod::kHardKMeans, TrainMethod::kQAT})
    res.rows.push_back(measure(opts, cfg, m));
  const StepBenchRow base = res.rows.front();
  for (StepBenchRow& row : res.rows) {
    row.memory_over_finetune = double(row.peak_tensor_bytes) / double(base.peak_tensor_bytes);
    row.time_over_finetune = row.seconds_per_step / base.seconds_per_step;
  }
  return res;
}

std::string format_table(const StepBenchResult& r) {
  const StepBenchOptions& o = r.options;
  std::string s = fmt::format(
      "one fine-tuning step on {}: {:.1f}M parameters ({} layers, dim {}, SwiGLU {}), batch {} x {} tokens, "
      "AdamW, checkpointed layers{}; mean of {} steps after an untimed one\n",
      o.device.str(), r.parameters / 1e6, o.layers, o.dim, o.hidden, o.batch, o.seq_len,
      o.device.is_cuda() ? ", bf16 autocast" : "", o.steps);
  s += fmt::format("{:<20} {:>16} {:>10} {:>22}\n", "mode", "peak tensor GiB", "s/step", "vs fine-tune (mem, time)");
  for (const auto& row : r.rows)
    s += fmt::format("{:<20} {:>16.2f} {:>10.3f} {:>+10.1f}% {:>+10.1f}%\n", row.mode, row.peak_tensor_bytes / 1073741824.0,
                     row.seconds_per_step, 100.0 * (row.memory_over_finetune - 1), 100.0 * (row.time_over_finetune - 1));
  s += "the clustering's parts of a step, each timed alone, s (in layers: every clustered weight made twice):\n";
  s += fmt::format("{:<20} {:>14} {:>10} {:>14} {:>10} {:>16}\n", "mode", "before forward", "in layers", "after backward",
                   "sum", "step - fine-tune");
  for (size_t i = 1; i < r.rows.size(); ++i) {
    const StepBenchRow& row = r.rows[i];
    s += fmt::format("{:<20} {:>14.4f} {:>10.4f} {:>14.4f} {:>10.4f} {:>16.4f}\n", row.mode, row.before_forward_seconds,
                     row.in_layers_seconds, row.after_backward_seconds,
                     row.before_forward_seconds + row.in_layers_seconds + row.after_backward_seconds,
                     row.seconds_per_step - r.rows.front().seconds_per_step);
  }
  return s;
}

nlohmann::json to_json(const StepBenchResult& r) {
  const StepBenchOptions& o = r.options;
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& row : r.rows)
    rows.push_back({{"mode", row.mode}, {"peak_tensor_bytes", row.peak_tensor_bytes},
                    {"seconds_per_step", row.seconds_per_step},
                    {"memory_over_finetune", row.memory_over_finetune}, {"time_over_finetune", row.time_over_finetune},
                    {"before_forward_seconds", row.before_forward_seconds}, {"in_layers_seconds", row.in_layers_seconds},
                    {"after_backward_seconds", row.after_backward_seconds}});
  return {{"benchmark", "step"},
          {"device", o.device.str()},
          {"parameters", r.parameters},
          {"layers", o.layers},
          {"dim", o.dim},
          {"hidden", o.hidden},
          {"batch", o.batch},
          {"seq_len", o.seq_len},
          {"bits", o.bits},
          {"steps", o.steps},
          {"rows", rows},
          {"dkm_over_finetune_memory", r.rows.at(1).memory_over_finetune},
          {"dkm_over_finetune_time", r.rows.at(1).time_over_finetune}};
}

}  // namespace edkm::bench
