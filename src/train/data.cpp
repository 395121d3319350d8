#include "train/data.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <numeric>
#include <random>
#include <sstream>

#include "common/atomic_file.h"
#include "common/checksum.h"
#include "common/error.h"
#include "common/text.h"

namespace edkm {
namespace {

struct AlpacaRecord {
  std::string instruction, input, output;
};

// A JSON array of objects, or one object per line (JSONL).
std::vector<nlohmann::json> parse_records(const std::string& text, const std::string& path) {
  std::vector<nlohmann::json> items;
  size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw_input("{}: invalid JSON: {}", path, e.what());
    }
    for (auto& x : j) items.push_back(std::move(x));
  } else {
    std::istringstream in(text);
    std::string line;
    for (int64_t n = 1; std::getline(in, line); ++n) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      try {
        items.push_back(nlohmann::json::parse(line));
      } catch (const nlohmann::json::exception& e) {
        throw_input("{}:{}: invalid JSON line: {}", path, n, e.what());
      }
    }
  }
  return items;
}

// A string field of record i ("" when absent and not required).
std::string record_field(const nlohmann::json& x, size_t i, const char* key, bool required, const std::string& path) {
  if (!x.is_object()) throw_input("{}: example {} is not an object", path, i + 1);
  auto it = x.find(key);
  if (it == x.end() || it->is_null()) {
    if (required) throw_input("{}: example {} has no \"{}\"", path, i + 1, key);
    return "";
  }
  if (!it->is_string()) throw_input("{}: example {}: \"{}\" is not a string", path, i + 1, key);
  return it->get<std::string>();
}

// Records of documents ({"text": ...}, as C4 and most pre-training corpora ship) rather than
// Alpaca examples: the first record has "text" and no "instruction".
bool is_documents(const std::vector<nlohmann::json>& items) {
  return !items.empty() && items[0].is_object() && items[0].contains("text") && !items[0].contains("instruction");
}

std::vector<AlpacaRecord> parse_alpaca(const std::vector<nlohmann::json>& items, const std::string& path) {
  std::vector<AlpacaRecord> out;
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& x = items[i];
    out.push_back({record_field(x, i, "instruction", true, path), record_field(x, i, "input", false, path),
                   record_field(x, i, "output", true, path)});
  }
  return out;
}

bool looks_like_alpaca(const std::string& path, const std::string& text) {
  const std::string ext = std::filesystem::path(path).extension().string();
  if (ext == ".json" || ext == ".jsonl") return true;
  size_t first = text.find_first_not_of(" \t\r\n");
  return first != std::string::npos && (text[first] == '[' || text[first] == '{') && text.find("\"instruction\"") != std::string::npos;
}

// How many of n records (examples, documents) are held out: the last `fraction`, at least one
// when there are two or more.
size_t held_out(size_t n, double fraction) {
  size_t nval = static_cast<size_t>(std::llround(fraction * n));
  if (fraction > 0 && nval == 0 && n >= 2) nval = 1;
  return nval;
}

// Splits Alpaca examples: the last held_out() of them are held out.
void split(std::vector<Example>& all, double fraction, Dataset& d) {
  const int64_t ntrain = static_cast<int64_t>(all.size() - held_out(all.size(), fraction));
  d.train.assign(all.begin(), all.begin() + ntrain);
  d.val.assign(all.begin() + ntrain, all.end());
}

// Cuts one token stream (with labels) into windows of seq_len inputs.
std::vector<Example> windows(const std::vector<int>& toks, const std::vector<int>& labels, int64_t L) {
  std::vector<Example> out;
  for (int64_t s = 0; s + 1 < static_cast<int64_t>(toks.size()); s += L) {
    const int64_t e = std::min<int64_t>(s + L, toks.size() - 1);
    Example ex;
    ex.tokens.assign(toks.begin() + s, toks.begin() + e);
    ex.labels.assign(labels.begin() + s + 1, labels.begin() + e + 1);
    if (std::any_of(ex.labels.begin(), ex.labels.end(), [](int v) { return v >= 0; })) out.push_back(std::move(ex));
  }
  return out;
}

}  // namespace

int64_t Dataset::train_tokens() const {
  int64_t n = 0;
  for (const auto& e : train)
    for (int v : e.labels) n += v >= 0;
  return n;
}

std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (input.empty())
    return "Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction:\n" + instruction + "\n\n### Response:\n";
  return "Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.\n\n### Instruction:\n" + instruction +
         "\n\n### Input:\n" + input + "\n\n### Response:\n";
}

Dataset load_dataset(const std::string& path, const Tokenizer& tok, const DataOptions& opts) {
  if (opts.seq_len < 2) throw_invalid("seq_len must be at least 2, got {}", opts.seq_len);
  if (!(opts.val_fraction >= 0 && opts.val_fraction < 1))
    throw_invalid("val_fraction must be in [0, 1), got {}", opts.val_fraction);
  if (!std::filesystem::exists(path)) throw_input("{}: data file not found", path);
  const std::string text = read_file(path);
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) throw_input("{}: the data file is empty", path);
  Dataset d;
  d.source = path;
  Checksum sum;
  sum.update(text);
  d.digest = Checksum::format(sum.digest());
  std::vector<Example> all;
  std::vector<nlohmann::json> records;
  const bool json = looks_like_alpaca(path, text);
  if (json) records = parse_records(text, path);
  if (is_documents(records)) {
    // Each document is BOS + text + EOS; the training documents (and, apart, the held-out last
    // val_fraction of them) form one stream cut into windows, every token carrying the loss.
    d.kind = "documents";
    std::vector<std::string> docs;
    for (size_t i = 0; i < records.size(); ++i) {
      docs.push_back(record_field(records[i], i, "text", true, path));
      check_utf8(docs.back(), fmt::format("{} (document {})", path, i + 1));
    }
    const size_t ntrain = docs.size() - held_out(docs.size(), opts.val_fraction);
    auto stream = [&](size_t from, size_t to) {
      std::vector<int> toks;
      for (size_t i = from; i < to; ++i) {
        std::vector<int> t = tok.encode(docs[i], /*bos=*/true, /*eos=*/true);
        toks.insert(toks.end(), t.begin(), t.end());
      }
      return windows(toks, toks, opts.seq_len);
    };
    d.train = stream(0, ntrain);
    d.val = stream(ntrain, docs.size());
    if (d.train.empty()) throw_input("{}: too little text for one training window", path);
    return d;
  }
  if (json) {
    d.kind = "alpaca";
    std::vector<AlpacaRecord> recs = parse_alpaca(records, path);
    if (recs.empty()) throw_input("{}: no examples", path);
    std::vector<int> stream_toks, stream_labels;
    for (const auto& r : recs) {
      const std::string prompt = alpaca_prompt(r.instruction, r.input);
      // As alpaca-lora does: the prompt's tokens are those of the prompt alone; the rest of the
      // full sequence (response and EOS) carries the loss.
      std::vector<int> full = tok.encode(prompt + r.output, /*bos=*/true, /*eos=*/true);
      const size_t n_prompt = tok.encode(prompt, true, false).size();
      std::vector<int> labels(full.size(), kIgnoreIndex);
      for (size_t i = n_prompt; i < full.size(); ++i) labels[i] = full[i];
      if (opts.pack) {
        stream_toks.insert(stream_toks.end(), full.begin(), full.end());
        stream_labels.insert(stream_labels.end(), labels.begin(), labels.end());
        continue;
      }
      // One row per example: inputs full[0, n-1), targets full[1, n), cut at seq_len.
      Example ex;
      ex.tokens.assign(full.begin(), full.end() - 1);
      ex.labels.assign(labels.begin() + 1, labels.end());
      if (static_cast<int64_t>(ex.tokens.size()) > opts.seq_len) {
        ++d.truncated;
        ex.tokens.resize(opts.seq_len);
        ex.labels.resize(opts.seq_len);
      }
      if (std::none_of(ex.labels.begin(), ex.labels.end(), [](int v) { return v >= 0; })) {
        ++d.dropped;
        continue;
      }
      all.push_back(std::move(ex));
    }
    if (opts.pack) all = windows(stream_toks, stream_labels, opts.seq_len);
    if (all.empty())
      throw_input("{}: every example is longer than --seq-len {} before its response starts", path, opts.seq_len);
  } else {
    d.kind = "text";
    check_utf8(text, path);
    const size_t cut = heldout_offset(text, opts.val_fraction);
    std::vector<int> toks = tok.encode(text.substr(0, cut), /*bos=*/true, /*eos=*/false);
    d.train = windows(toks, toks, opts.seq_len);
    if (cut < text.size()) {
      toks = tok.encode(text.substr(cut), /*bos=*/true, /*eos=*/false);
      d.val = windows(toks, toks, opts.seq_len);
    }
    if (d.train.empty()) throw_input("{}: too little text for one training window", path);
    return d;
  }
  split(all, opts.val_fraction, d);
  if (d.train.empty()) throw_input("{}: no training examples left after holding out {:.0f}%", path, 100 * opts.val_fraction);
  return d;
}

Dataset load_datasets(const std::vector<std::string>& paths, const Tokenizer& tok, const DataOptions& opts) {
  if (paths.empty()) throw_invalid("no data file given");
  if (paths.size() == 1) return load_dataset(paths[0], tok, opts);
  Dataset mix;
  Checksum sum;
  for (const std::string& path : paths) {
    Dataset d = load_dataset(path, tok, opts);
    mix.source += (mix.source.empty() ? "" : " + ") + d.source;
    mix.kind += (mix.kind.empty() ? "" : " + ") + d.kind;
    sum.update(d.digest);  // the mixture's identity: its files' contents, in order
    mix.train.insert(mix.train.end(), std::make_move_iterator(d.train.begin()), std::make_move_iterator(d.train.end()));
    mix.val.insert(mix.val.end(), std::make_move_iterator(d.val.begin()), std::make_move_iterator(d.val.end()));
    mix.truncated += d.truncated;
    mix.dropped += d.dropped;
  }
  mix.digest = Checksum::format(sum.digest());
  return mix;
}

Batch make_batch(const std::vector<Example>& data, const std::vector<int64_t>& indices, int pad_id) {
  int64_t T = 0;
  for (int64_t i : indices) T = std::max<int64_t>(T, data[i].tokens.size());
  const int64_t B = static_cast<int64_t>(indices.size());
  Batch b{at::full({B, T}, pad_id, at::kLong), at::full({B, T}, kIgnoreIndex, at::kLong), 0};
  auto tp = b.tokens.accessor<int64_t, 2>();
  auto lp = b.labels.accessor<int64_t, 2>();
  for (int64_t r = 0; r < B; ++r) {
    const Example& e = data[indices[r]];
    for (size_t t = 0; t < e.tokens.size(); ++t) {
      tp[r][t] = e.tokens[t];
      lp[r][t] = e.labels[t];
      b.loss_tokens += e.labels[t] >= 0;
    }
  }
  return b;
}

std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Fisher-Yates with our own draws: std::shuffle's use of the engine is implementation-defined.
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng() % static_cast<uint64_t>(i + 1)]);
  return order;
}

}  // namespace edkm
