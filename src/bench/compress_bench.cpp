#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>

#include "bench/bench.h"
#include "common/memory.h"
#include "format/size.h"
#include "pipeline/load.h"

namespace edkm::bench {
namespace {

Llama clone(const Llama& m) {
  std::map<std::string, at::Tensor> w;
  for (const auto& [name, t] : m.weights()) w[name] = t.detach().clone();
  return Llama(m.config(), std::move(w), "copy");
}

// Bits per projection weight of RTN with a scale and a zero point (fp16 each) per group.
double rtn_bits(const Llama& m, const std::vector<std::pair<std::string, DKMConfig>>& plan, int bits, int64_t g) {
  double total = 0, n = 0;
  for (const auto& [name, cfg] : plan) {
    const at::Tensor& w = m.weight(name);
    const int64_t rows = w.size(0), cols = w.size(1);
    total += double(bits) * w.numel() + 32.0 * rows * ((cols + g - 1) / g);
    n += w.numel();
  }
  return total / n;
}

double palette_bits(const Llama& m, const std::vector<std::pair<std::string, DKMConfig>>& plan) {
  double bytes = 0, n = 0;
  for (const auto& [name, c] : plan) {
    const at::Tensor& w = m.weight(name);
    bytes += palettized_bytes(w.size(0), w.size(1), c.bits, c.cluster_dim, c.group_size, c.per_row_scale);
    n += w.numel();
  }
  return 8 * bytes / n;
}

// teacher: the distillation teacher's dtype; Undefined = no distillation.
MemoryRow measure_memory(const std::string& model_name, const Llama& base, const Dataset& data,
                         const CompressOptions& o, int bits, at::ScalarType teacher, int64_t steps) {
  Llama m = clone(base);
  TrainOptions t = o.train;
  t.steps = steps;
  t.quiet = true;
  t.eval_every = 0;
  t.checkpoint_path.clear();
  t.metrics_path.clear();
  Dataset small = data;
  small.val.resize(std::min<size_t>(small.val.size(), 2));
  Clustering c;
  if (bits > 0) {
    ClusteringPlan plan = o.plan;
    plan.defaults.bits = bits;
    c = Clustering(m, plan.resolve(m));
  }
  TensorMemory::reset_peak();
  reset_peak_rss();
  const int64_t before = TensorMemory::current();
  // The teacher's weights count against the run that needs them.
  const bool distill = teacher != at::ScalarType::Undefined;
  if (distill) t.teacher = frozen_teacher(m, teacher);
  TrainReport r = train(m, bits > 0 ? &c : nullptr, small, t);
  std::string mode = bits > 0 ? fmt::format("DKM {}-bit", bits) : "fine-tune";
  if (distill) mode += fmt::format(" + distillation ({} teacher)", teacher == at::kFloat ? "fp32" : "bf16");
  return {model_name, mode, TensorMemory::peak() - before, peak_rss_bytes(),
          r.seconds / std::max<int64_t>(1, r.steps_done)};
}

}  // namespace

// Memory rows per model: fine-tune, DKM, DKM + distillation from an fp32 and from a bf16
// teacher (the first is the reference).
constexpr size_t kMemoryModes = 4;

double CompressBenchRow::perplexity() const { return std::exp(val_loss); }

CompressBenchResult run_compress_bench(const CompressBenchOptions& opts, const CompressOptions& o) {
  TensorMemory::install();
  CompressBenchResult res;
  res.threads = at::get_num_threads();
  LoadedModel lm = load_model(opts.model);
  const Llama& base = lm.model;
  Dataset data = load_dataset(opts.data, *lm.tokenizer, o.data);
  res.train_tokens = data.train_tokens();
  for (const auto& e : data.val)
    for (int v : e.labels) res.val_tokens += v >= 0;
  const int pad = static_cast<int>(base.config().eos_id);
  auto eval = [&](const Llama& m, const WeightOverrides* ov) { return evaluate(m, ov, data.val, o.train.eval_batch, pad); };
  TrainOptions t = o.train;
  t.quiet = true;
  t.checkpoint_path.clear();
  t.metrics_path.clear();

  res.rows.push_back({"pretrained", 0, 32, eval(base, nullptr)});
  {
    Llama ft = clone(base);
    TrainReport r = train(ft, nullptr, data, t);
    res.steps = r.total_steps;
    res.rows.push_back({"fine-tuned, unclustered (reference)", 0, 32, eval(ft, nullptr)});
  }
  for (int bits : opts.bits) {
    ClusteringPlan plan = o.plan;
    plan.defaults.bits = bits;
    const auto chosen = plan.resolve(base);
    WeightOverrides rtn;
    for (const auto& [name, cfg] : chosen) rtn[name] = rtn_quantize(base.weight(name), {bits, opts.rtn_group, false});
    res.rows.push_back({fmt::format("RTN, group {}", opts.rtn_group), bits, rtn_bits(base, chosen, bits, opts.rtn_group),
                        eval(base, &rtn)});
    Clustering kmeans(base, chosen);
    WeightOverrides hard = kmeans.hard(base);
    res.rows.push_back({"k-means (post-training)", bits, palette_bits(base, chosen), eval(base, &hard)});
    // Fine-tuning with each training method, the same data and steps; evaluated as exported.
    auto fine_tune = [&](const std::string& label, TrainMethod method, bool distill) {
      Llama m = clone(base);
      Clustering c(m, chosen, method);
      TrainOptions tm = t;
      if (distill) tm.teacher = frozen_teacher(base, at::kFloat);
      train(m, &c, data, tm);
      std::vector<std::pair<std::string, DKMConfig>> layout;
      for (const auto& w : c.weights()) layout.emplace_back(w.name, w.cfg);
      WeightOverrides exported = c.hard(m);
      res.rows.push_back({label, bits, palette_bits(base, layout), eval(m, &exported)});
    };
    fine_tune("DKM fine-tuning (exported)", TrainMethod::kDKM, false);
    fine_tune("DKM + distillation (exported)", TrainMethod::kDKM, true);
    fine_tune("hard k-means fine-tuning (exported)", TrainMethod::kHardKMeans, false);
    fine_tune("QAT, grid per row (exported)", TrainMethod::kQAT, false);
  }

  // Memory: stories260K, and a 4-layer dim-512 model (12.6M parameters) where weights and
  // optimizer state are not negligible beside the activations.
  LlamaConfig big;
  big.dim = 512, big.hidden_dim = 1376, big.n_layers = 4, big.n_heads = 8, big.n_kv_heads = 8;
  big.vocab_size = base.config().vocab_size, big.max_seq_len = base.config().max_seq_len;
  Llama large = Llama::random(big, at::kFloat, 0);
  const int bits = opts.bits.empty() ? 3 : opts.bits.front();
  for (const auto& [name, model] : {std::pair<const char*, const Llama*>{"stories260K", &base}, {"4-layer dim-512", &large}}) {
    res.memory.push_back(measure_memory(name, *model, data, o, 0, at::ScalarType::Undefined, opts.memory_steps));
    for (at::ScalarType teacher : {at::ScalarType::Undefined, at::kFloat, at::kBFloat16})
      res.memory.push_back(measure_memory(name, *model, data, o, bits, teacher, opts.memory_steps));
  }
  return res;
}

std::string CompressBenchResult::markdown() const {
  std::string s = fmt::format("Held-out perplexity ({} tokens); fine-tuning: {} steps over {} training tokens; {} threads\n\n",
                              val_tokens, steps, train_tokens, threads);
  s += "| method | bits | bits/weight (projections) | held-out loss (nats/token) | perplexity |\n|---|---|---|---|---|\n";
  for (const auto& r : rows)
    s += fmt::format("| {} | {} | {:.3f} | {:.4f} | {:.3f} |\n", r.method, r.bits ? std::to_string(r.bits) : "fp32",
                     r.bits_per_weight, r.val_loss, r.perplexity());
  s += "\n| model | mode | peak tensor MiB | peak RSS MiB | s/step | tensor overhead vs fine-tune |\n|---|---|---|---|---|---|\n";
  for (size_t i = 0; i < memory.size(); ++i) {
    const MemoryRow& m = memory[i];
    const MemoryRow& ref = memory[i - i % kMemoryModes];
    s += fmt::format("| {} | {} | {:.1f} | {:.1f} | {:.3f} | {:+.1f}% |\n", m.model, m.mode, m.peak_tensor_bytes / 1048576.0,
                     m.peak_rss / 1048576.0, m.seconds_per_step,
                     100.0 * (double(m.peak_tensor_bytes) / ref.peak_tensor_bytes - 1));
  }
  return s;
}

nlohmann::json to_json(const CompressBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array(), mem = nlohmann::json::array();
  for (const auto& x : r.rows)
    rows.push_back({{"method", x.method}, {"bits", x.bits}, {"bits_per_weight", x.bits_per_weight},
                    {"val_loss", x.val_loss}, {"perplexity", x.perplexity()}});
  for (const auto& m : r.memory)
    mem.push_back({{"model", m.model}, {"mode", m.mode}, {"peak_tensor_bytes", m.peak_tensor_bytes},
                   {"peak_rss_bytes", m.peak_rss}, {"seconds_per_step", m.seconds_per_step}});
  return {{"benchmark", "compress"}, {"threads", r.threads}, {"train_tokens", r.train_tokens},
          {"val_tokens", r.val_tokens}, {"steps", r.steps}, {"rows", rows}, {"memory", mem}};
}

}  // namespace edkm::bench
