#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <memory>

#include "bench/bench.h"
#include "runtime/lut_kernel.h"
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
    if (name != tensor_name::kEmbed || !m.config().tie_embeddings) {
      const at::Tensor& t = m.weight(name);
      // Embedding lookups read one row per token; every projection is read whole.
      b += name == tensor_name::kEmbed ? t.size(1) * t.element_size() : t.numel() * t.element_size();
    }
  return b;
}

// Seconds per product when consecutive products read different copies of the weight, the
// copies together 2 GB, beyond any cache: the regime of decoding a model larger than the cache,
// where the bytes of the weight set the pace. make_copy() returns one product over a new copy.
double out_of_cache_seconds(int64_t bytes_per_copy, const std::function<std::function<void()>()>& make_copy, int reps) {
  const int64_t n = std::max<int64_t>(2, (int64_t(2) << 30) / bytes_per_copy + 1);
  std::vector<std::function<void()>> products;
  for (int64_t i = 0; i < n; ++i) products.push_back(make_copy());
  return best_seconds([&] { for (const auto& f : products) f(); }, std::max(1, reps / 4)) / static_cast<double>(n);
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
    at::Tensor w = at::randn({4096, 11008}) * 0.02, x = at::randn({11008});
    at::Tensor wb = w.to(at::kBFloat16), xb = x.to(at::kBFloat16);
    std::vector<PackedWeight> packed{pack(w, 3), pack(w, 4)};
    // In cache: the same matrix every time (this CPU's 480 MB L3 holds even the fp32 one).
    std::string name = "matvec 4096x11008";
    r.rows.push_back({name, "fp32", best_seconds([&] { at::mv(w, x); }, reps), w.numel() * 4});
    r.rows.push_back({name, "bf16", best_seconds([&] { at::mv(wb, xb); }, reps), w.numel() * 2});
    for (const auto& p : packed) {
      PalettizedLinear lin(p);
      r.rows.push_back({name, fmt::format("{}-bit LUT", p.bits), best_seconds([&] { lin.matvec(x); }, reps), p.bytes()});
    }
    name = "matvec, 2 GB of copies";
    auto dense = [&](const at::Tensor& m, const at::Tensor& v) {
      return out_of_cache_seconds(m.nbytes(), [&] {
        at::Tensor c = m.clone();
        return std::function<void()>([c, v] { at::mv(c, v); });
      }, reps);
    };
    r.rows.push_back({name, "fp32", dense(w, x), w.numel() * 4});
    r.rows.push_back({name, "bf16", dense(wb, xb), w.numel() * 2});
    for (const auto& p : packed) {
      const double t = out_of_cache_seconds(p.bytes(), [&] {
        PackedWeight c = p;
        c.indices = p.indices.clone();
        auto lin = std::make_shared<PalettizedLinear>(std::move(c));
        return std::function<void()>([lin, x] { lin->matvec(x); });
      }, reps);
      r.rows.push_back({name, fmt::format("{}-bit LUT", p.bits), t, p.bytes()});
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
      for (const auto& t : s.tensors) bytes += t.name == tensor_name::kEmbed ? c.dim * 4 : t.bytes;
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
  // Ratios against the dense rows of the same workload.
  auto seconds_of = [&](const std::string& workload, const std::string& storage) {
    for (const auto& row : rows)
      if (row.workload == workload && row.storage == storage) return row.seconds;
    return 0.0;
  };
  for (const auto& row : rows)
    s += fmt::format("{:<26} {:<10} {:>12.3f} {:>14.1f} {:>11.2f}x {:>9.2f}x\n", row.workload, row.storage,
                     row.seconds * 1e3, row.bytes / 1e6, seconds_of(row.workload, "fp32") / row.seconds,
                     seconds_of(row.workload, "bf16") / row.seconds);
  return s;
}

nlohmann::json to_json(const LutBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& x : r.rows)
    rows.push_back({{"workload", x.workload}, {"storage", x.storage}, {"seconds", x.seconds}, {"weight_bytes", x.bytes}});
  return {{"benchmark", "lut"}, {"threads", r.threads}, {"rows", rows}};
}

}  // namespace edkm::bench
