// `edkm bench tokenizer`: encode speed of tokenizers on one text, each timed on its own.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>

#include "bench/bench.h"
#include "common/atomic_file.h"
#include "tokenizer/tokenizer.h"

namespace edkm::bench {

TokenizerBenchResult run_tokenizer_bench(const TokenizerBenchOptions& opts) {
  TokenizerBenchResult res;
  res.text = opts.text;
  const std::string text = read_file(opts.text);
  res.bytes = static_cast<int64_t>(text.size());
  for (const std::string& path : opts.tokenizers) {
    std::unique_ptr<Tokenizer> tok = load_tokenizer(path);
    TokenizerBenchRow row{path};
    // The first round also fills the tokenizer's word cache, as in any long run; the best of
    // the rounds is reported, as `tokenizers` is timed by tests/fixtures/make_tokenizer_fixtures.py.
    row.seconds = 1e300;
    for (int r = 0; r < std::max(1, opts.reps); ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      row.tokens = static_cast<int64_t>(tok->encode(text, false, false).size());
      row.seconds = std::min(row.seconds, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    res.rows.push_back(row);
  }
  return res;
}

std::string TokenizerBenchResult::table() const {
  std::string s = fmt::format("encode {} ({} bytes), best of the rounds\n", text, bytes);
  s += fmt::format("{:<60} {:>10} {:>10} {:>14}\n", "tokenizer", "tokens", "seconds", "tokens/s");
  for (const auto& r : rows)
    s += fmt::format("{:<60} {:>10} {:>10.3f} {:>14.0f}\n", r.tokenizer, r.tokens, r.seconds, r.tokens / r.seconds);
  return s;
}

nlohmann::json to_json(const TokenizerBenchResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& row : r.rows)
    rows.push_back({{"tokenizer", row.tokenizer}, {"tokens", row.tokens}, {"seconds", row.seconds},
                    {"tokens_per_second", row.tokens / row.seconds}});
  return {{"benchmark", "tokenizer"}, {"text", r.text}, {"bytes", r.bytes}, {"rows", rows}};
}

}  // namespace edkm::bench
