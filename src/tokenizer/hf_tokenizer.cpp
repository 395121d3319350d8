// Hugging Face tokenizer.json: the pipeline of the `tokenizers` library, for the BPE models the
// LLaMA family uses.
//
//   added tokens  split the text first (leftmost, longest match); each becomes its own id
//   normalizer    NFC (utf8proc), Prepend, Replace (of a string), or a Sequence of them
//   pre-tokenizer Split (a regex, PCRE2 with Unicode properties: \p{L}, \p{N}, (?i:...),
//                 lookahead), ByteLevel (GPT-2's byte-to-character map, optionally its regex),
//                 Metaspace, or a Sequence of them
//   model         BPE: merges applied lowest rank first, leftmost among equals; ignore_merges
//                 (a word in the vocabulary is one token); byte_fallback (<0xAB> tokens) or the
//                 unknown token (fused when fuse_unk)
//   post-processor TemplateProcessing's leading special token is the BOS; ByteLevel changes no id
//   decoder       ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, or a Sequence
//
// Two families of files result: byte-level BPE (GPT-2, Llama-3, Qwen2/3, SmolLM2), whose tokens
// are strings of byte characters, and SentencePiece-style BPE (Llama-2, Mistral, TinyLlama),
// whose words start with U+2581 and whose unknown characters fall back to byte tokens.
// Anything else in the file is refused with the JSON path of the field.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "common/atomic_file.h"
#include "common/error.h"
#include "tokenizer/tokenizer.h"

namespace edkm {
namespace {

using json = nlohmann::json;

// The UTF-8 length of the code point that starts with byte c (1 for a stray continuation byte,
// so that malformed text still advances).
size_t utf8_len(unsigned char c) {
  if (c >= 0xF0) return 4;
  if (c >= 0xE0) return 3;
  if (c >= 0xC0) return 2;
  return 1;
}

std::string utf8_encode(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Every occurrence of `from` replaced, in one pass (replacing in place would move the rest of
// the string at each occurrence: quadratic in a long text).
void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty() || s.find(from) == std::string::npos) return;
  std::string out;
  size_t last = 0;
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, last)) {
    out.append(s, last, at - last);
    out += to;
    last = at + from.size();
  }
  out.append(s, last, std::string::npos);
  s = std::move(out);
}

// GPT-2's map from bytes to printable characters: the printable Latin-1 bytes stand for
// themselves, the other 68 take the code points from U+0100 on, in byte order.
struct ByteLevelMap {
  std::array<std::string, 256> to_char;
  std::unordered_map<std::string, uint8_t> to_byte;
  ByteLevelMap() {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      to_char[b] = utf8_encode(printable ? static_cast<uint32_t>(b) : next++);
      to_byte[to_char[b]] = static_cast<uint8_t>(b);
    }
  }
};
const ByteLevelMap& byte_level() {
  static const ByteLevelMap m;
  return m;
}

// GPT-2's pre-tokenization regex (ByteLevel with use_regex).
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A compiled PCRE2 pattern in UTF mode with Unicode properties for \s, \w, \d (as the
// Oniguruma patterns of `tokenizers` mean them).
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                          &err, &offset, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw_input("{}: invalid regex at offset {}: {}", where, offset, reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // where JIT is unavailable, the interpreter runs
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // f(begin, end) for every non-empty match of the pattern in s, left to right.
  template <typename F>
  void for_each_match(const std::string& s, F&& f) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    size_t at = 0;
    while (at < s.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at, PCRE2_NO_UTF_CHECK,
                                 md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) throw_input("regex match failed (PCRE2 error {})", rc);
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      if (ov[1] > ov[0]) {
        f(ov[0], ov[1]);
        at = ov[1];
      } else {
        at = ov[0] + utf8_len(static_cast<unsigned char>(s[ov[0]]));  // an empty match: step one character
      }
    }
  }

 private:
  pcre2_code* code_ = nullptr;
};

// "string" pattern of Replace / Split ({"String": s} or {"Regex": r}).
std::string string_pattern(const json& p, const std::string& where) {
  if (p.is_object() && p.contains("String") && p["String"].is_string()) return p["String"].get<std::string>();
  throw_input("{}: only {{\"String\": ...}} patterns are supported here, got {}", where, p.dump());
}

// Whether v is an integer in 0..max. nlohmann's get<int>() of a float, or of an integer beyond
// int, is undefined behaviour: every number read as an int is checked with this first.
bool is_int_in(const json& v, int64_t max) {
  if (!v.is_number_integer()) return false;
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= static_cast<uint64_t>(max);
  return v.get<int64_t>() >= 0 && v.get<int64_t>() <= max;
}

// The largest token id accepted (2^24: six times the largest vocabularies in use).
constexpr int kMaxId = 1 << 24;

std::string type_of(const json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) throw_input("{}: an object with a \"type\" is expected", where);
  return j["type"].get<std::string>();
}

// A component of type Sequence holds its parts in `list_key`: calls read(part, where) for each
// and returns true. Any other type returns false, for the caller to read.
template <typename Read>
bool read_sequence(const json& j, const std::string& where, const char* list_key, Read&& read) {
  if (type_of(j, where) != "Sequence") return false;
  const json& list = j.at(list_key);
  for (size_t i = 0; i < list.size(); ++i) read(list[i], fmt::format("{}.{}[{}]", where, list_key, i));
  return true;
}

// ----------------------------------------------------------------------------------------------
// Normalizers, pre-tokenizers and decoders, flattened into lists of steps.

struct NormalizeStep {
  enum Kind { kNFC, kPrepend, kReplace } kind;
  std::string a, b;
};

void read_normalizer(const json& j, const std::string& where, std::vector<NormalizeStep>& out) {
  if (j.is_null()) return;
  if (read_sequence(j, where, "normalizers", [&](const json& part, const std::string& w) { read_normalizer(part, w, out); }))
    return;
  const std::string t = type_of(j, where);
  if (t == "NFC") {
    out.push_back({NormalizeStep::kNFC, "", ""});
  } else if (t == "Prepend") {
    out.push_back({NormalizeStep::kPrepend, j.at("prepend").get<std::string>(), ""});
  } else if (t == "Replace") {
    out.push_back({NormalizeStep::kReplace, string_pattern(j.at("pattern"), where + ".pattern"), j.at("content").get<std::string>()});
  } else {
    throw_input("{}: normalizer type '{}' is not supported (NFC, Prepend, Replace, Sequence are)", where, t);
  }
}

// NFC (Unicode canonical composition), by length rather than to the first NUL.
std::string nfc(const std::string& s) {
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                          static_cast<utf8proc_ssize_t>(s.size()), &out,
                                          static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) throw_input("text cannot be NFC-normalized: {}", utf8proc_errmsg(n));
  std::string r(reinterpret_cast<char*>(out), static_cast<size_t>(n));
  std::free(out);
  return r;
}

struct PreTokenizeStep {
  enum Kind { kSplit, kByteLevel, kMetaspace } kind;
  explicit PreTokenizeStep(Kind k) : kind(k) {}
  std::shared_ptr<const Regex> regex;  // kSplit; kByteLevel with use_regex
  bool isolated = true;                // kSplit: Isolated (matches are pieces), or Removed
  bool add_prefix_space = false;       // kByteLevel
  std::string replacement;             // kMetaspace
  std::string prepend_scheme;          // kMetaspace: always | first | never
  bool split = true;                   // kMetaspace
};

void read_pre_tokenizer(const json& j, const std::string& where, std::vector<PreTokenizeStep>& out) {
  if (j.is_null()) return;
  if (read_sequence(j, where, "pretokenizers", [&](const json& part, const std::string& w) { read_pre_tokenizer(part, w, out); }))
    return;
  const std::string t = type_of(j, where);
  if (t == "Split") {
    PreTokenizeStep s{PreTokenizeStep::kSplit};
    const json& p = j.at("pattern");
    const std::string pattern = p.contains("Regex") ? p["Regex"].get<std::string>() : string_pattern(p, where + ".pattern");
    // A String pattern is literal text: quote it for PCRE2.
    s.regex = std::make_shared<Regex>(p.contains("Regex") ? pattern : "\\Q" + pattern + "\\E", where + ".pattern");
    const std::string behavior = j.value("behavior", "Isolated");
    if (behavior != "Isolated" && behavior != "Removed")
      throw_input("{}: Split behavior '{}' is not supported (Isolated, Removed are)", where, behavior);
    if (j.value("invert", false)) throw_input("{}: Split with invert is not supported", where);
    s.isolated = behavior == "Isolated";
    out.push_back(std::move(s));
  } else if (t == "Digits") {
    // Digits are split from the rest (SmolLM2), one by one with individual_digits: a Split on
    // Unicode numerics (tokenizers tests char::is_numeric, i.e. \p{N}), Isolated.
    PreTokenizeStep s{PreTokenizeStep::kSplit};
    s.regex = std::make_shared<Regex>(j.value("individual_digits", false) ? "\\p{N}" : "\\p{N}+", where);
    out.push_back(std::move(s));
  } else if (t == "ByteLevel") {
    PreTokenizeStep s{PreTokenizeStep::kByteLevel};
    s.add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) s.regex = std::make_shared<Regex>(kGpt2Pattern, where);
    out.push_back(std::move(s));
  } else if (t == "Metaspace") {
    PreTokenizeStep s{PreTokenizeStep::kMetaspace};
    s.replacement = j.value("replacement", "\u2581");
    s.prepend_scheme = j.value("prepend_scheme", j.value("add_prefix_space", true) ? "always" : "never");
    s.split = j.value("split", true);
    if (s.prepend_scheme != "always" && s.prepend_scheme != "first" && s.prepend_scheme != "never")
      throw_input("{}: unknown prepend_scheme '{}'", where, s.prepend_scheme);
    out.push_back(std::move(s));
  } else {
    throw_input("{}: pre-tokenizer type '{}' is not supported (Split, Digits, ByteLevel, Metaspace, Sequence are)", where, t);
  }
}

struct DecodeStep {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string a, b;     // kReplace: from, to; kStrip: content; kMetaspace: replacement
  explicit DecodeStep(Kind k, std::string a_ = {}, std::string b_ = {}) : kind(k), a(std::move(a_)), b(std::move(b_)) {}
  int start = 0, stop = 0;  // kStrip
  bool prepend = false;     // kMetaspace: strip the leading space of the first token
};

void read_decoder(const json& j, const std::string& where, std::vector<DecodeStep>& out) {
  if (j.is_null()) return;
  if (read_sequence(j, where, "decoders", [&](const json& part, const std::string& w) { read_decoder(part, w, out); }))
    return;
  const std::string t = type_of(j, where);
  if (t == "ByteLevel") {
    out.emplace_back(DecodeStep::kByteLevel);
  } else if (t == "Replace") {
    out.emplace_back(DecodeStep::kReplace, string_pattern(j.at("pattern"), where + ".pattern"), j.at("content").get<std::string>());
  } else if (t == "ByteFallback") {
    out.emplace_back(DecodeStep::kByteFallback);
  } else if (t == "Fuse") {
    out.emplace_back(DecodeStep::kFuse);
  } else if (t == "Strip") {
    DecodeStep s{DecodeStep::kStrip, j.at("content").get<std::string>()};
    for (const char* key : {"start", "stop"})
      if (j.contains(key) && !is_int_in(j[key], 1 << 16))
        throw_input("{}.{}: expected an integer in 0..65536, got {}", where, key, j[key].dump());
    s.start = j.value("start", 0);
    s.stop = j.value("stop", 0);
    out.push_back(s);
  } else if (t == "Metaspace") {
    DecodeStep s{DecodeStep::kMetaspace, j.value("replacement", "\u2581")};
    s.prepend = j.value("prepend_scheme", j.value("add_prefix_space", true) ? "always" : "never") != "never";
    out.push_back(s);
  } else {
    throw_input("{}: decoder type '{}' is not supported (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, "
                "Sequence are)", where, t);
  }
}

// ----------------------------------------------------------------------------------------------

struct AddedToken {
  int id;
  std::string content;
  bool special, lstrip, rstrip;
};

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(std::string data, const std::string& name, const std::string& eos_token)
      : Tokenizer(name, std::move(data)) {
    json j;
    try {
      j = json::parse(this->data());
    } catch (const json::exception& e) {
      throw_input("{}: not a tokenizer.json (invalid JSON: {})", name, e.what());
    }
    try {
      read(j, name);
    } catch (const json::exception& e) {
      throw_input("{}: unexpected tokenizer.json contents: {}", name, e.what());
    }
    eos_token_ = eos_token;
    eos_ = eos_token.empty() ? -1 : id_of(eos_token);
    if (!eos_token.empty() && eos_ < 0) throw_input("{}: the EOS token '{}' is not in the vocabulary", name, eos_token);
  }

  std::vector<int> encode(const std::string& text, bool bos, bool eos) const override {
    std::vector<int> ids;
    if (bos && bos_ >= 0) ids.push_back(bos_);
    // Added tokens first: the text between them goes through the pipeline, one segment at a time.
    size_t at = 0;
    bool first = true;
    auto segment = [&](size_t begin, size_t end) {
      if (end > begin) encode_segment(text.substr(begin, end - begin), first, ids);
      first = false;
    };
    // Where each added token next occurs: searched again only once `at` has passed it, so that
    // the text is scanned once per added token, not once per match.
    std::vector<size_t> found(added_.size());
    for (size_t i = 0; i < added_.size(); ++i) found[i] = text.find(added_[i].content);
    while (at < text.size()) {
      size_t best_pos = std::string::npos, best_len = 0;
      const AddedToken* best = nullptr;
      for (size_t i = 0; i < added_.size(); ++i) {
        const AddedToken& t = added_[i];
        if (found[i] != std::string::npos && found[i] < at) found[i] = text.find(t.content, at);
        const size_t p = found[i];
        if (p == std::string::npos) continue;
        if (p < best_pos || (p == best_pos && t.content.size() > best_len)) best_pos = p, best_len = t.content.size(), best = &t;
      }
      if (!best) break;
      size_t seg_end = best_pos, next = best_pos + best_len;
      if (best->lstrip)
        while (seg_end > at && std::isspace(static_cast<unsigned char>(text[seg_end - 1]))) --seg_end;
      if (best->rstrip)
        while (next < text.size() && std::isspace(static_cast<unsigned char>(text[next]))) ++next;
      segment(at, seg_end);
      ids.push_back(best->id);
      at = next;
    }
    segment(at, text.size());
    if (eos && eos_ >= 0) ids.push_back(eos_);
    return ids;
  }

  std::string piece(int prev, int token) const override {
    if (token < 0 || token >= static_cast<int>(tokens_.size())) throw_invalid("token id {} out of range", token);
    std::string s = tokens_[token];
    if (added_ids_.count(token)) return s;
    for (const DecodeStep& d : decoders_) {
      switch (d.kind) {
        case DecodeStep::kByteLevel: {
          std::string bytes;
          for (size_t i = 0; i < s.size();) {
            const size_t n = utf8_len(static_cast<unsigned char>(s[i]));
            auto it = byte_level().to_byte.find(s.substr(i, n));
            if (it != byte_level().to_byte.end()) bytes += static_cast<char>(it->second);
            else bytes += s.substr(i, n);
            i += n;
          }
          s = std::move(bytes);
          break;
        }
        case DecodeStep::kReplace: replace_all(s, d.a, d.b); break;
        case DecodeStep::kByteFallback:
          if (s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>')
            s = std::string(1, static_cast<char>(std::strtol(s.substr(3, 2).c_str(), nullptr, 16)));
          break;
        case DecodeStep::kFuse: break;
        case DecodeStep::kStrip:
          // Applies to the whole decoded text: its start is the first token's start.
          if (prev < 0 || prev == bos_)
            for (int k = 0; k < d.start && s.compare(0, d.a.size(), d.a) == 0; ++k) s.erase(0, d.a.size());
          break;
        case DecodeStep::kMetaspace:
          replace_all(s, d.a, " ");
          if (d.prepend && (prev < 0 || prev == bos_) && !s.empty() && s[0] == ' ') s.erase(0, 1);
          break;
      }
    }
    return s;
  }

  int vocab_size() const override { return static_cast<int>(tokens_.size()); }
  int bos_id() const override { return bos_; }
  int eos_id() const override { return eos_; }
  std::string eos_token() const override { return eos_token_; }
  Kind kind() const override { return Kind::kHuggingFace; }

 private:
  void read(const json& j, const std::string& name) {
    const json& m = j.at("model");
    if (type_of(m, name + ": model") != "BPE")
      throw_input("{}: model type '{}' is not supported (BPE is)", name, m["type"].get<std::string>());
    for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (m.contains(affix) && m[affix].is_string() && !m[affix].get<std::string>().empty())
        throw_input("{}: model.{} is not supported", name, affix);
    if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() != 0)
      throw_input("{}: model.dropout is not supported (it makes encoding random)", name);
    for (auto it = m.at("vocab").begin(); it != m.at("vocab").end(); ++it) set_token(it.value(), it.key(), name);
    for (const json& a : j.value("added_tokens", json::array())) {
      if (!is_int_in(a.at("id"), kMaxId)) throw_input("{}: added token with id {}", name, a["id"].dump());
      AddedToken t{a["id"].get<int>(), a.at("content").get<std::string>(), a.value("special", false),
                   a.value("lstrip", false), a.value("rstrip", false)};
      if (a.value("single_word", false)) throw_input("{}: added token '{}': single_word is not supported", name, t.content);
      if (t.content.empty()) throw_input("{}: an added token (id {}) is empty", name, t.id);
      set_token(a["id"], t.content, name);
      added_ids_.insert(t.id);
      added_.push_back(std::move(t));
    }
    for (size_t i = 0; i < tokens_.size(); ++i)
      if (!assigned_[i]) throw_input("{}: no token has id {} (ids must run from 0 without gaps)", name, i);
    const json& merges = m.at("merges");
    merges_.reserve(merges.size());
    for (size_t r = 0; r < merges.size(); ++r) {
      std::string a, b;
      if (merges[r].is_string()) {
        const std::string s = merges[r].get<std::string>();
        const size_t sp = s.find(' ', 1);
        if (sp == std::string::npos) throw_input("{}: merge {} ('{}') is not two tokens", name, r, s);
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        a = merges[r].at(0).get<std::string>(), b = merges[r].at(1).get<std::string>();
      }
      const int ia = id_of(a), ib = id_of(b), im = id_of(a + b);
      if (ia < 0 || ib < 0 || im < 0)
        throw_input("{}: model.merges[{}] ('{}' + '{}'): token '{}' is not in the vocabulary", name, r, a, b,
                    ia < 0 ? a : ib < 0 ? b : a + b);
      merges_.emplace(pair_key(ia, ib), std::make_pair(static_cast<int>(r), im));
    }
    ignore_merges_ = m.value("ignore_merges", false);
    byte_fallback_ = m.value("byte_fallback", false);
    fuse_unk_ = m.value("fuse_unk", false);
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      unk_ = id_of(m["unk_token"].get<std::string>());
      if (unk_ < 0) throw_input("{}: model.unk_token is not in the vocabulary", name);
    }
    if (byte_fallback_) {
      for (int b = 0; b < 256; ++b) {
        byte_ids_[b] = id_of(fmt::format("<0x{:02X}>", b));
        if (byte_ids_[b] < 0) throw_input("{}: byte_fallback needs the token <0x{:02X}>", name, b);
      }
    }
    read_normalizer(j.value("normalizer", json()), name + ": normalizer", normalizers_);
    read_pre_tokenizer(j.value("pre_tokenizer", json()), name + ": pre_tokenizer", pre_tokenizers_);
    read_decoder(j.value("decoder", json()), name + ": decoder", decoders_);
    read_post_processor(j.value("post_processor", json()), name + ": post_processor");
    if (bos_ >= static_cast<int>(tokens_.size()))
      throw_input("{}: post_processor: the BOS id {} is not in the vocabulary", name, bos_);
  }

  // The BOS is the special token that TemplateProcessing puts before a single sequence.
  void read_post_processor(const json& j, const std::string& where) {
    if (j.is_null()) return;
    if (read_sequence(j, where, "processors", [&](const json& part, const std::string& w) { read_post_processor(part, w); }))
      return;
    const std::string t = type_of(j, where);
    if (t == "TemplateProcessing") {
      const json& single = j.at("single");
      for (size_t i = 0; i < single.size(); ++i) {
        if (single[i].contains("Sequence")) continue;
        const std::string id = single[i].at("SpecialToken").at("id").get<std::string>();
        const json& ids = j.at("special_tokens").at(id).at("ids");
        if (i == 0 && ids.size() == 1 && is_int_in(ids[0], kMaxId)) bos_ = ids[0].get<int>();
        else throw_input("{}: only a single leading special token (BOS) is supported in the template", where);
      }
    } else if (t != "ByteLevel") {
      throw_input("{}: post-processor type '{}' is not supported (TemplateProcessing, ByteLevel, Sequence are)", where, t);
    }
  }

  void set_token(const json& id_value, const std::string& s, const std::string& name) {
    if (!is_int_in(id_value, kMaxId))
      throw_input("{}: token '{}' has id {}, expected an integer in 0..{}", name, s, id_value.dump(), kMaxId);
    const int id = id_value.get<int>();
    if (static_cast<size_t>(id) >= tokens_.size()) tokens_.resize(id + 1), assigned_.resize(id + 1);
    tokens_[id] = s;
    assigned_[id] = true;
    vocab_[s] = id;
  }
  int id_of(const std::string& s) const {
    auto it = vocab_.find(s);
    return it == vocab_.end() ? -1 : it->second;
  }
  static uint64_t pair_key(int a, int b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  // Normalize, pre-tokenize, and run BPE on each word of a segment between added tokens.
  void encode_segment(std::string s, bool first, std::vector<int>& ids) const {
    for (const NormalizeStep& n : normalizers_) {
      if (n.kind == NormalizeStep::kNFC) s = nfc(s);
      else if (n.kind == NormalizeStep::kPrepend) s = n.a + s;
      else replace_all(s, n.a, n.b);
    }
    std::vector<std::string> words{std::move(s)};
    for (const PreTokenizeStep& p : pre_tokenizers_) {
      std::vector<std::string> next;
      for (std::string& w : words) {
        switch (p.kind) {
          case PreTokenizeStep::kSplit: split(w, *p.regex, p.isolated, next); break;
          case PreTokenizeStep::kByteLevel: {
            if (p.add_prefix_space && !w.empty() && w[0] != ' ') w = " " + w;
            std::vector<std::string> parts;
            if (p.regex) split(w, *p.regex, true, parts);
            else parts.push_back(w);
            for (const std::string& part : parts) {
              std::string mapped;
              for (unsigned char c : part) mapped += byte_level().to_char[c];
              next.push_back(std::move(mapped));
            }
            break;
          }
          case PreTokenizeStep::kMetaspace: {
            replace_all(w, " ", p.replacement);
            if ((p.prepend_scheme == "always" || (p.prepend_scheme == "first" && first)) &&
                w.compare(0, p.replacement.size(), p.replacement) != 0)
              w = p.replacement + w;
            if (!p.split) {
              next.push_back(w);
              break;
            }
            // Each word starts at a replacement character.
            size_t start = 0;
            for (size_t at = w.find(p.replacement, 1); at != std::string::npos; at = w.find(p.replacement, at + 1)) {
              next.push_back(w.substr(start, at - start));
              start = at;
            }
            next.push_back(w.substr(start));
            break;
          }
        }
      }
      words = std::move(next);
    }
    for (const std::string& w : words)
      if (!w.empty()) bpe(w, ids);
  }

  static void split(const std::string& s, const Regex& re, bool isolated, std::vector<std::string>& out) {
    size_t last = 0;
    re.for_each_match(s, [&](size_t b, size_t e) {
      if (b > last) out.push_back(s.substr(last, b - last));
      if (isolated) out.push_back(s.substr(b, e - b));
      last = e;
    });
    if (last < s.size()) out.push_back(s.substr(last));
  }

  // BPE on one word: its characters (or their byte tokens, or the unknown token), then merges by
  // rank, lowest first and leftmost among equals, with a heap of candidate pairs that are
  // dropped when a merge has consumed one of their symbols.
  void bpe(const std::string& word, std::vector<int>& ids) const {
    if (ignore_merges_) {
      const int id = id_of(word);
      if (id >= 0) {
        ids.push_back(id);
        return;
      }
    }
    const bool cacheable = word.size() < kCacheWordBytes;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      auto it = cache_.find(word);
      if (it != cache_.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int> sym;
    for (size_t i = 0; i < word.size();) {
      const size_t n = std::min(word.size() - i, utf8_len(static_cast<unsigned char>(word[i])));
      const int id = id_of(word.substr(i, n));
      if (id >= 0) {
        sym.push_back(id);
      } else if (byte_fallback_) {
        for (size_t k = 0; k < n; ++k) sym.push_back(byte_ids_[static_cast<unsigned char>(word[i + k])]);
      } else if (unk_ >= 0) {
        if (!(fuse_unk_ && !sym.empty() && sym.back() == unk_)) sym.push_back(unk_);
      } else {
        throw_input("{}: the character at byte {} of '{}' has no token, no byte fallback and no unknown token",
                    name(), i, word);
      }
      i += n;
    }
    const int n = static_cast<int>(sym.size());
    std::vector<int> prev(n), next(n);
    for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
    using Cand = std::tuple<int, int, int, int>;  // rank, left position, left id, right id
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int l) {
      if (l < 0 || next[l] < 0) return;
      auto it = merges_.find(pair_key(sym[l], sym[next[l]]));
      if (it != merges_.end()) heap.emplace(it->second.first, l, sym[l], sym[next[l]]);
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      auto [rank, l, a, b] = heap.top();
      heap.pop();
      const int r = next[l];
      if (sym[l] != a || r < 0 || sym[r] != b) continue;  // stale: a symbol was merged away
      sym[l] = merges_.at(pair_key(a, b)).second;
      sym[r] = -1;
      next[l] = next[r];
      if (next[r] >= 0) prev[next[r]] = l;
      push(prev[l]);
      push(l);
    }
    std::vector<int> out;
    for (int i = n > 0 ? 0 : -1; i >= 0; i = next[i]) out.push_back(sym[i]);
    ids.insert(ids.end(), out.begin(), out.end());
    if (!cacheable) return;
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() < kCacheWords) cache_.emplace(word, std::move(out));
  }

  // The word cache: words shorter than 256 bytes (as `tokenizers` caches), at most 2^18 of them.
  static constexpr size_t kCacheWords = 1 << 18;
  static constexpr size_t kCacheWordBytes = 256;

  std::vector<std::string> tokens_;  // by id
  std::vector<bool> assigned_;
  std::unordered_map<std::string, int> vocab_;
  std::unordered_map<uint64_t, std::pair<int, int>> merges_;  // (left, right) -> (rank, merged id)
  std::vector<AddedToken> added_;
  std::unordered_set<int> added_ids_;
  std::vector<NormalizeStep> normalizers_;
  std::vector<PreTokenizeStep> pre_tokenizers_;
  std::vector<DecodeStep> decoders_;
  bool ignore_merges_ = false, byte_fallback_ = false, fuse_unk_ = false;
  int unk_ = -1, bos_ = -1, eos_ = -1;
  std::string eos_token_;
  std::array<int, 256> byte_ids_{};
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int>> cache_;
};

}  // namespace

std::unique_ptr<Tokenizer> hf_tokenizer(std::string data, const std::string& name, const std::string& eos_token) {
  return std::make_unique<HfTokenizer>(std::move(data), name, eos_token);
}

std::string hf_eos_token(const std::string& tokenizer_json_path) {
  const auto config = std::filesystem::path(tokenizer_json_path).parent_path() / "tokenizer_config.json";
  if (!std::filesystem::exists(config)) return "";
  json c;
  try {
    c = json::parse(read_file(config.string()));
  } catch (const json::exception& e) {
    throw_input("{}: invalid JSON: {}", config.string(), e.what());
  }
  const json eos = c.value("eos_token", json());
  if (eos.is_string()) return eos.get<std::string>();
  if (eos.is_object() && eos.contains("content")) return eos["content"].get<std::string>();
  return "";
}

}  // namespace edkm
