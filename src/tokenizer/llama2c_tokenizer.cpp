// llama2.c's tokenizer.bin: int32 max_token_length, then per token float score, int32 length,
// bytes. Encoding follows llama2.c's encode(): BOS, a dummy-prefix " " token when the text is
// not empty, one token per UTF-8 code point (bytes + 3 when the code point is not in the
// vocabulary), then repeatedly merge the adjacent pair whose concatenation is the vocabulary
// entry with the highest score (leftmost on ties). llama2.c rescans all pairs for each merge
// (quadratic); a heap of candidate pairs with lazy invalidation makes the same merges in the
// same order in O(n log n).
#include <cstring>
#include <sstream>
#include <queue>
#include <unordered_map>

#include "common/error.h"
#include "tokenizer/tokenizer.h"

namespace edkm {
namespace {

class Llama2cTokenizer final : public Tokenizer {
 public:
  Llama2cTokenizer(std::string data, const std::string& path, int vocab_size) : Tokenizer(path, std::move(data)) {
    std::istringstream in(this->data());
    int32_t max_len = 0;
    if (!in.read(reinterpret_cast<char*>(&max_len), 4) || max_len <= 0 || max_len > 4096)
      throw_input("{}: not a llama2.c tokenizer (bad max_token_length header)", path);
    while (vocab_size == 0 || static_cast<int>(pieces_.size()) < vocab_size) {
      float score;
      int32_t len;
      if (!in.read(reinterpret_cast<char*>(&score), 4)) break;
      if (!in.read(reinterpret_cast<char*>(&len), 4) || len < 0 || len > max_len)
        throw_input("{}: corrupt token {} (length field)", path, pieces_.size());
      std::string s(static_cast<size_t>(len), '\0');
      if (!in.read(s.data(), len)) throw_input("{}: truncated at token {}", path, pieces_.size());
      pieces_.push_back(std::move(s));
      scores_.push_back(score);
    }
    if (vocab_size > 0 && static_cast<int>(pieces_.size()) < vocab_size)
      throw_input("{}: holds {} tokens, the model needs {}", path, pieces_.size(), vocab_size);
    if (pieces_.size() < 259) throw_input("{}: only {} tokens (byte fallback needs 3 + 256)", path, pieces_.size());
    for (size_t i = 0; i < pieces_.size(); ++i) lookup_.emplace(pieces_[i], static_cast<int>(i));
  }

  std::vector<int> encode(const std::string& text, bool bos, bool eos) const override {
    std::vector<int> ids;
    if (!text.empty()) ids.push_back(find(" "));
    for (size_t i = 0; i < text.size();) {
      size_t n = 1;  // a code point: a lead byte and up to three continuation bytes
      while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
      int id = find(text.substr(i, n));
      if (id >= 0) {
        ids.push_back(id);
      } else {
        for (size_t b = 0; b < n; ++b) ids.push_back(static_cast<unsigned char>(text[i + b]) + 3);
      }
      i += n;
    }
    merge(ids);
    if (bos) ids.insert(ids.begin(), bos_id());
    if (eos) ids.push_back(eos_id());
    return ids;
  }

  std::string piece(int prev, int token) const override {
    if (token < 0 || token >= vocab_size()) throw_invalid("token {} out of range [0, {})", token, vocab_size());
    const std::string& p = pieces_[token];
    std::string_view s = p;
    if (prev == bos_id() && !s.empty() && s[0] == ' ') s.remove_prefix(1);
    unsigned int byte;
    char close;
    if (s.size() == 6 && std::sscanf(std::string(s).c_str(), "<0x%02X%c", &byte, &close) == 2 && close == '>')
      return std::string(1, static_cast<char>(byte));
    return std::string(s);
  }

  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  Kind kind() const override { return Kind::kLlama2c; }

 private:
  int find(const std::string& s) const {
    auto it = lookup_.find(s);
    return it == lookup_.end() ? -1 : it->second;
  }

  void merge(std::vector<int>& ids) const {
    const int n = static_cast<int>(ids.size());
    std::vector<int> prev(n), next(n);
    std::vector<bool> alive(n, true);
    for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
    struct Cand {
      float score;
      int left, left_id, right_id, merged;
      bool operator<(const Cand& o) const {  // max-heap: higher score, then leftmost
        return score < o.score || (score == o.score && left > o.left);
      }
    };
    std::priority_queue<Cand> heap;
    auto consider = [&](int l) {
      if (l < 0 || next[l] < 0) return;
      int r = next[l];
      int m = find(pieces_[ids[l]] + pieces_[ids[r]]);
      if (m >= 0) heap.push({scores_[m], l, ids[l], ids[r], m});
    };
    for (int i = 0; i + 1 < n; ++i) consider(i);
    while (!heap.empty()) {
      Cand c = heap.top();
      heap.pop();
      const int r = next[c.left];
      if (!alive[c.left] || r < 0 || ids[c.left] != c.left_id || ids[r] != c.right_id) continue;
      ids[c.left] = c.merged;
      alive[r] = false;
      next[c.left] = next[r];
      if (next[r] >= 0) prev[next[r]] = c.left;
      consider(prev[c.left]);
      consider(c.left);
    }
    std::vector<int> out;
    for (int i = 0; i < n; ++i)
      if (alive[i]) out.push_back(ids[i]);
    ids.swap(out);
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> lookup_;
};

}  // namespace

std::unique_ptr<Tokenizer> llama2c_tokenizer(std::string data, const std::string& name, int vocab_size) {
  return std::make_unique<Llama2cTokenizer>(std::move(data), name, vocab_size);
}

std::string Tokenizer::file_name() const {
  switch (kind()) {
    case Kind::kSentencePiece: return "tokenizer.model";
    case Kind::kHuggingFace: return "tokenizer.json";
    case Kind::kLlama2c: break;
  }
  return "tokenizer.bin";
}

std::string Tokenizer::decode(const std::vector<int>& tokens) const {
  std::string out;
  int prev = -1;
  for (int t : tokens) {
    if (t != bos_id() && t != eos_id()) out += piece(prev, t);
    prev = t;
  }
  return out;
}

}  // namespace edkm
