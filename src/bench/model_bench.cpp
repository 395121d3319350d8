// `edkm bench model`: tokens/s of a training step (forward, loss, backward) for a 4-layer
// dim-512 LLaMA (vocab 32000, random weights) and for stories260K, in fp32 and in bf16,
// measured one after the other in the same run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench/bench.h"
#include "model/io/llama2c.h"
#include "model/llama.h"

namespace edkm::bench {
namespace {

ModelBenchRow measure(const std::string& name, Llama model, at::ScalarType dtype, int64_t batch, int64_t seq,
                      int reps) {
  model.to(dtype);
  for (auto& [n, t] : model.weights()) t = t.detach().requires_grad_(true);
  at::manual_seed(0);
  const int64_t vocab = model.config().vocab_size;
  at::Tensor x = at::randint(0, vocab, {batch, seq}, at::kLong), y = at::randint(0, vocab, {batch, seq}, at::kLong);
  auto step = [&] {
    next_token_loss(model.forward(x), y).backward();
    for (auto& [n, t] : model.weights()) t.mutable_grad().reset();
  };
  return {name, dtype == at::kBFloat16 ? "bf16" : "fp32", batch, seq, best_seconds(step, reps)};
}

}  // namespace

ModelBenchResult run_model_bench(const ModelBenchOptions& opts) {
  ModelBenchResult r;
  r.threads = at::get_num_threads();
  r.reps = opts.reps;
  LlamaConfig c;
  c.dim = 512, c.hidden_dim = 1376, c.n_layers = 4, c.n_heads = 8, c.n_kv_heads = 8;
  c.vocab_size = 32000, c.max_seq_len = 512, c.tie_embeddings = false;
  Llama small = Llama::random(c, at::kFloat, 0);
  for (at::ScalarType t : {at::kFloat, at::kBFloat16})
    r.rows.push_back(measure("4-layer dim-512 (random)", small, t, 4, 256, opts.reps));
  if (!opts.stories260k.empty()) {
    Llama stories = load_llama2c(opts.stories260k);
    for (at::ScalarType t : {at::kFloat, at::kBFloat16})
      r.rows.push_back(measure("stories260K", stories, t, 8, 512, opts.reps));
  }
  return r;
}

std::string format_table(const ModelBenchResult& r) {
  std::string s = fmt::format("training step (forward + loss + backward), threads {}, best of {}\n", r.threads, r.reps);
  s += fmt::format("{:<26} {:<6} {:>6} {:>6} {:>10} {:>12} {:>14}\n", "model", "dtype", "batch", "seq", "seconds",
                   "tokens/s", "vs fp32");
  double fp32 = 0;
  for (const auto& row : r.rows) {
    if (row.dtype == "fp32") fp32 = row.tokens_per_second();
    s += fmt::format("{:<26} {:<6} {:>6} {:>6} {:>10.3f} {:>12.0f} {:>13.2f}x\n", row.model, row.dtype, row.batch,
                     row.seq, row.seconds, row.tokens_per_second(), row.tokens_per_second() / fp32);
  }
  return s;
}

nlohmann::json to_json(const ModelBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& row : r.rows)
    rows.push_back({{"model", row.model}, {"dtype", row.dtype}, {"batch", row.batch}, {"seq", row.seq},
                    {"seconds", row.seconds}, {"tokens_per_second", row.tokens_per_second()}});
  return {{"benchmark", "model"}, {"threads", r.threads}, {"reps", r.reps}, {"rows", rows}};
}

}  // namespace edkm::bench
