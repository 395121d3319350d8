#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>

#include "bench/bench.h"
#include "export/lut_kernel.h"
#include "train/clustering.h"

namespace edkm::bench {
namespace {

PackedWeight pack(const at::Tensor& w, int bits) {
  DKMConfig cfg;
  cfg.bits = bits;
  at::Tensor c = init_palette(w, cfg).to(at::kHalf).to(at::kFloat);
  return PackedWeight::from(palettize(w, c, cfg));
}

int64_t weight_bytes(const Llama& m) {
  int64_t b = 0;
  for (const auto& name : m.projection_names())
    if (name != "model.embed_tokens.weight" || !m.config().tie_embeddings) {
      const at::Tensor& t = m.weight(name);
      // Embedding lookups read one row per token; every projection is read whole.
      b += name == "model.embed_tokens.weight" ? t.size(1) * t.element_size() : t.numel() * t.element_size();
    }
  return b;
}

// Seconds per token of greedy decoding after a one-token prompt.
double decode_seconds(const Llama& m, int tokens) {
  at::NoGradGuard g;
  KVCache cache = m.new_cache(1, tokens + 1);
  at::Tensor next = at::zeros({1, 1}, at::kLong);
  m.forward(next, cache);  // warm-up step
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < tokens; ++i) next = m.forward(next, cache).argmax(-1);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / tokens;
}

}  // namespace

LutBenchResult run_lut_bench(int reps, int decode_tokens) {
  LutBenchResult r;
  r.threads = at::get_num_threads();
  at::manual_seed(0);
  {
    const std::string name = "matvec 4096x11008";
    at::Tensor w = at::randn({4096, 11008}) * 0.02, x = at::randn({11008});
    at::Tensor wb = w.to(at::kBFloat16), xb = x.to(at::kBFloat16);
    r.rows.push_back({name, "fp32", best_seconds([&] { at::mv(w, x); }, reps), w.numel() * 4});
    r.rows.push_back({name, "bf16", best_seconds([&] { at::mv(wb, xb); }, reps), w.numel() * 2});
    for (int bits : {3, 4}) {
      PalettizedLinear lin(pack(w, bits));
      r.rows.push_back({name, fmt::format("{}-bit LUT", bits), best_seconds([&] { lin.matvec(x); }, reps),
                        lin.weight().bytes()});
    }
  }
  {
    const std::string name = "decode 4-layer dim-2048";
    LlamaConfig c;
    c.dim = 2048, c.hidden_dim = 5504, c.n_layers = 4, c.n_heads = 16, c.n_kv_heads = 16;
    c.vocab_size = 32000, c.max_seq_len = 512, c.tie_embeddings = false;
    Llama dense = Llama::random(c, at::kFloat, 0);
    r.rows.push_back({name, "fp32", decode_seconds(dense, decode_tokens), weight_bytes(dense)});
    for (int bits : {3, 4}) {
      ClusteringPlan plan;
      plan.defaults.bits = bits;
      plan.include_embeddings = true;
      Clustering cl(dense, plan.resolve(dense));
      CompressedModel cm = make_compressed(dense, cl.palettize(dense), {}, nullptr);
      Llama packed = packed_llama(cm);
      const SizeReport s = size_of(cm);
      int64_t bytes = 0;
      for (const auto& t : s.tensors) bytes += t.name == "model.embed_tokens.weight" ? c.dim * 4 : t.bytes;
      r.rows.push_back({name, fmt::format("{}-bit LUT", bits), decode_seconds(packed, decode_tokens), bytes});
    }
    dense.to(at::kBFloat16);
    r.rows.insert(r.rows.end() - 2, {name, "bf16", decode_seconds(dense, decode_tokens), weight_bytes(dense)});
  }
  return r;
}

std::string LutBenchResult::table() const {
  std::string s = fmt::format("products from packed palettes vs dense, {} threads\n", threads);
  s += fmt::format("{:<26} {:<10} {:>12} {:>14} {:>12} {:>10}\n", "workload", "storage", "ms", "weight MB read", "vs fp32",
                   "vs bf16");
  double fp32 = 0, bf16 = 0;
  for (const auto& row : rows) {
    if (row.storage == "fp32") fp32 = row.seconds;
    if (row.storage == "bf16") bf16 = row.seconds;
    s += fmt::format("{:<26} {:<10} {:>12.3f} {:>14.1f} {:>11.2f}x {:>9.2f}x\n", row.workload, row.storage,
                     row.seconds * 1e3, row.bytes / 1e6, fp32 / row.seconds, bf16 > 0 ? bf16 / row.seconds : 0.0);
  }
  return s;
}

nlohmann::json to_json(const LutBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& x : r.rows)
    rows.push_back({{"workload", x.workload}, {"storage", x.storage}, {"seconds", x.seconds}, {"weight_bytes", x.bytes}});
  return {{"benchmark", "lut"}, {"threads", r.threads}, {"rows", rows}};
}

}  // namespace edkm::bench
