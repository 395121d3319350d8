// A GGUF file as a Llama and a tokenizer (gguf.h). The names, the rotary permutation and the
// tokenizer keys are those of llama.cpp's convert_hf_to_gguf.py, read backwards.
#include "model/io/gguf.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <map>
#include <set>

#include "common/error.h"
#include "common/mapped_file.h"
#include "model/io/llama2c.h"

namespace edkm::gguf {
namespace {

using json = nlohmann::json;

// Typed reads of metadata keys, with errors naming the file and key.
struct Meta {
  const json& m;
  const std::string& source;

  bool has(const std::string& key) const { return m.contains(key); }
  const json& get(const std::string& key) const {
    if (!has(key)) throw_input("{}: GGUF metadata has no '{}'", source, key);
    return m.at(key);
  }
  int64_t integer(const std::string& key) const {
    const json& v = get(key);
    if (!v.is_number_integer()) throw_input("{}: GGUF metadata '{}' must be an integer, is {}", source, key, v.dump());
    return v.get<int64_t>();
  }
  double number(const std::string& key) const {
    const json& v = get(key);
    if (!v.is_number()) throw_input("{}: GGUF metadata '{}' must be a number, is {}", source, key, v.dump());
    return v.get<double>();
  }
  std::string string(const std::string& key) const {
    const json& v = get(key);
    if (!v.is_string()) throw_input("{}: GGUF metadata '{}' must be a string", source, key);
    return v.get<std::string>();
  }
  const json& array(const std::string& key, size_t size) const {
    const json& v = get(key);
    if (!v.is_array() || v.size() != size)
      throw_input("{}: GGUF metadata '{}' must be a list of {} entries", source, key, size);
    return v;
  }
};

// GGUF tensor names (llama.cpp's gguf-py constants, MODEL_TENSOR) and the Hugging Face names
// edkm keeps: global ones, then the leaves of each "blk.<l>.".
const std::pair<const char*, const char*> kGlobalNames[] = {
    {"token_embd.weight", tensor_name::kEmbed},
    {"output_norm.weight", tensor_name::kFinalNorm},
    {"output.weight", tensor_name::kLmHead},
};
const std::pair<const char*, const char*> kLayerNames[] = {
    {"attn_norm.weight", tensor_name::kAttnNorm}, {"attn_q.weight", tensor_name::kQ},
    {"attn_k.weight", tensor_name::kK},           {"attn_v.weight", tensor_name::kV},
    {"attn_output.weight", tensor_name::kO},      {"attn_q.bias", tensor_name::kQBias},
    {"attn_k.bias", tensor_name::kKBias},         {"attn_v.bias", tensor_name::kVBias},
    {"attn_output.bias", tensor_name::kOBias},    {"attn_q_norm.weight", tensor_name::kQNorm},
    {"attn_k_norm.weight", tensor_name::kKNorm},  {"ffn_norm.weight", tensor_name::kMlpNorm},
    {"ffn_gate.weight", tensor_name::kGate},      {"ffn_up.weight", tensor_name::kUp},
    {"ffn_down.weight", tensor_name::kDown},      {"ffn_gate.bias", tensor_name::kGateBias},
    {"ffn_up.bias", tensor_name::kUpBias},        {"ffn_down.bias", tensor_name::kDownBias},
};

// The Hugging Face name of a GGUF tensor, or "" if it is none edkm knows.
std::string hf_name(const std::string& gguf_name) {
  for (const auto& [g, hf] : kGlobalNames)
    if (gguf_name == g) return hf;
  if (gguf_name.rfind("blk.", 0) != 0) return "";
  const size_t dot = gguf_name.find('.', 4);
  if (dot == std::string::npos || dot == 4) return "";
  const std::string layer = gguf_name.substr(4, dot - 4), leaf = gguf_name.substr(dot + 1);
  if (layer.find_first_not_of("0123456789") != std::string::npos || layer.size() > 6) return "";
  for (const auto& [g, hf] : kLayerNames)
    if (leaf == g) return layer_tensor_name(std::stoll(layer), hf);
  return "";
}

LlamaConfig read_config(const Meta& m, const std::map<std::string, const TensorInfo*>& tensors) {
  const std::string arch = m.string("general.architecture");
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3")
    throw_input("{}: GGUF architecture '{}' is not supported (llama, qwen2 and qwen3 are)", m.source, arch);
  const std::string p = arch + ".";
  LlamaConfig c;
  c.model_type = arch;
  c.dim = m.integer(p + "embedding_length");
  c.hidden_dim = m.integer(p + "feed_forward_length");
  c.n_layers = m.integer(p + "block_count");
  c.n_heads = m.integer(p + "attention.head_count");
  c.n_kv_heads = m.has(p + "attention.head_count_kv") ? m.integer(p + "attention.head_count_kv") : c.n_heads;
  c.max_seq_len = m.integer(p + "context_length");
  c.norm_eps = m.number(p + "attention.layer_norm_rms_epsilon");
  c.rope_theta = m.has(p + "rope.freq_base") ? m.number(p + "rope.freq_base") : 10000.0;
  if (m.has(p + "attention.key_length")) c.head_size = m.integer(p + "attention.key_length");
  if (c.n_heads > 0 && c.head_dim() > 0 && m.has(p + "rope.dimension_count") &&
      m.integer(p + "rope.dimension_count") != c.head_dim())
    throw_input("{}: {}rope.dimension_count {} differs from the head size {} (partial rotary is not supported)",
                m.source, p, m.integer(p + "rope.dimension_count"), c.head_dim());
  const std::string scaling = m.has(p + "rope.scaling.type") ? m.string(p + "rope.scaling.type") : "none";
  if (scaling == "linear") {
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    c.rope_scaling.factor = m.number(p + "rope.scaling.factor");
  } else if (scaling != "none") {
    throw_input("{}: {}rope.scaling.type '{}' is not supported (none and linear are)", m.source, p, scaling);
  }
  if (tensors.count("rope_freqs.weight"))
    throw_input("{}: per-frequency rope factors (rope_freqs.weight, Llama-3.1's llama3 scaling in GGUF) are not "
                "supported; convert the Hugging Face checkpoint instead", m.source);
  if (m.has(p + "attention.sliding_window")) {
    if (arch != "llama") throw_input("{}: {}attention.sliding_window is not supported for {}", m.source, p, arch);
    c.model_type = "mistral";
    c.sliding_window = m.integer(p + "attention.sliding_window");
  }
  auto has = [&](const char* leaf) { return tensors.count(std::string("blk.0.") + leaf) > 0; };
  auto embed = tensors.find("token_embd.weight");
  if (embed == tensors.end()) throw_input("{}: no token_embd.weight tensor", m.source);
  if (embed->second->ne.size() != 2) throw_input("{}: token_embd.weight is not a matrix", m.source);
  c.vocab_size = embed->second->ne[1];
  c.tie_embeddings = !tensors.count("output.weight");
  c.qkv_bias = has("attn_q.bias");
  c.o_bias = has("attn_output.bias");
  c.mlp_bias = has("ffn_gate.bias");
  c.qk_norm = has("attn_q_norm.weight");
  if (m.has("tokenizer.ggml.bos_token_id")) c.bos_id = m.integer("tokenizer.ggml.bos_token_id");
  if (m.has("tokenizer.ggml.eos_token_id")) c.eos_id = m.integer("tokenizer.ggml.eos_token_id");
  c.validate(m.source);
  return c;
}

// ---------------------------------------------------------------------------------------------
// The tokenizer, as the tokenizer.json that Hugging Face would have for it.

// llama.cpp's token types (llama_token_type).
enum TokenType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

// The pre-tokenizer of a byte-level BPE by tokenizer.ggml.pre (llama.cpp's llama_vocab_pre_type),
// as the model's own tokenizer.json states it.
json byte_level_pre_tokenizer(const std::string& pre, const std::string& source) {
  const json byte_level_regex = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  const json byte_level_only = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}};
  auto split = [](const char* regex) {
    return json{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
  };
  if (pre == "gpt-2") return byte_level_regex;
  if (pre == "smollm" || pre == "starcoder")
    return {{"type", "Sequence"},
            {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level_regex}}};
  if (pre == "llama-bpe" || pre == "llama3")
    return {{"type", "Sequence"},
            {"pretokenizers",
             {split("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
              byte_level_only}}};
  if (pre == "qwen2")
    return {{"type", "Sequence"},
            {"pretokenizers",
             {split("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"),
              byte_level_only}}};
  throw_input("{}: tokenizer.ggml.pre '{}' is not supported (gpt-2, smollm, starcoder, llama-bpe, qwen2 are)",
              source, pre);
}

// SentencePiece BPE has scores, not merges: as Hugging Face's converter does, every split of a
// piece into two pieces of the vocabulary is a merge, ranked by the score of the piece it makes
// (ties by the ids of its halves). Splits fall between UTF-8 code points.
json merges_from_scores(const json& tokens, const json& scores, const json& types) {
  std::map<std::string, int64_t> id;
  for (size_t i = 0; i < tokens.size(); ++i) id.emplace(tokens[i].get_ref<const std::string&>(), i);
  struct Merge {
    double score;
    int64_t left, right;
    std::string text;
  };
  std::vector<Merge> merges;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (types[i].get<int64_t>() != kNormal && types[i].get<int64_t>() != kUserDefined) continue;
    const std::string& piece = tokens[i].get_ref<const std::string&>();
    for (size_t cut = 1; cut < piece.size(); ++cut) {
      if ((static_cast<unsigned char>(piece[cut]) & 0xC0) == 0x80) continue;  // inside a code point
      auto l = id.find(piece.substr(0, cut)), r = id.find(piece.substr(cut));
      if (l != id.end() && r != id.end())
        merges.push_back({scores[i].get<double>(), l->second, r->second, l->first + " " + r->first});
    }
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    if (a.score != b.score) return a.score > b.score;
    return a.left != b.left ? a.left < b.left : a.right < b.right;
  });
  json out = json::array();
  for (const Merge& mg : merges) out.push_back(mg.text);
  return out;
}

std::unique_ptr<Tokenizer> read_tokenizer(const Meta& m) {
  if (!m.has("tokenizer.ggml.model")) return nullptr;
  const std::string model = m.string("tokenizer.ggml.model");
  const json& tokens = m.get("tokenizer.ggml.tokens");
  if (!tokens.is_array() || tokens.empty()) throw_input("{}: tokenizer.ggml.tokens must be a list", m.source);
  for (const json& t : tokens)
    if (!t.is_string()) throw_input("{}: tokenizer.ggml.tokens holds a non-string", m.source);
  json types = m.has("tokenizer.ggml.token_type") ? m.array("tokenizer.ggml.token_type", tokens.size())
                                                  : json(std::vector<int>(tokens.size(), kNormal));
  for (const json& t : types)
    if (!t.is_number_integer()) throw_input("{}: tokenizer.ggml.token_type holds a non-integer", m.source);
  auto token_id = [&](const char* key) -> int64_t {
    const std::string k = std::string("tokenizer.ggml.") + key;
    if (!m.has(k)) return -1;
    const int64_t id = m.integer(k);
    if (id < 0 || id >= static_cast<int64_t>(tokens.size()))
      throw_input("{}: {} {} is not a token id (0..{})", m.source, k, id, tokens.size() - 1);
    return id;
  };
  const int64_t bos = token_id("bos_token_id"), eos = token_id("eos_token_id"), unk = token_id("unknown_token_id");

  json tj = {{"version", "1.0"}, {"added_tokens", json::array()}};
  json vocab = json::object();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string& t = tokens[i].get_ref<const std::string&>();
    if (vocab.contains(t)) throw_input("{}: tokenizer.ggml.tokens lists '{}' twice", m.source, t);
    vocab[t] = i;
    const int64_t type = types[i].get<int64_t>();
    if (type == kControl || type == kUserDefined || (type == kUnknown && model == "llama"))
      tj["added_tokens"].push_back({{"id", i}, {"content", t}, {"single_word", false}, {"lstrip", false},
                                    {"rstrip", false}, {"normalized", false}, {"special", type != kUserDefined}});
  }
  const bool add_bos = m.has("tokenizer.ggml.add_bos_token") ? m.get("tokenizer.ggml.add_bos_token") == true
                                                              : model == "llama";
  if (add_bos && bos >= 0) {
    const std::string b = tokens[bos];
    tj["post_processor"] = {{"type", "TemplateProcessing"},
                            {"single", {{{"SpecialToken", {{"id", b}, {"type_id", 0}}}},
                                        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                            {"special_tokens", {{b, {{"id", b}, {"ids", {bos}}, {"tokens", {b}}}}}}};
  }
  if (model == "gpt2") {
    const json& merges = m.get("tokenizer.ggml.merges");
    if (!merges.is_array()) throw_input("{}: tokenizer.ggml.merges must be a list", m.source);
    // Files without it predate llama.cpp's pre-tokenizer types: its "default" splitting.
    const std::string pre = m.has("tokenizer.ggml.pre") ? m.string("tokenizer.ggml.pre") : "default";
    tj["pre_tokenizer"] = byte_level_pre_tokenizer(pre, m.source);
    tj["decoder"] = {{"type", "ByteLevel"}};
    // llama.cpp skips the merges for words that are whole tokens with the Llama-3 pre-tokenizer.
    tj["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges},
                   {"ignore_merges", pre == "llama-bpe" || pre == "llama3"}};
  } else if (model == "llama") {
    const json& scores = m.array("tokenizer.ggml.scores", tokens.size());
    for (const json& s : scores)
      if (!s.is_number()) throw_input("{}: tokenizer.ggml.scores holds a non-number", m.source);
    tj["normalizer"] = {{"type", "Sequence"},
                        {"normalizers", {{{"type", "Prepend"}, {"prepend", "\u2581"}},
                                         {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}};
    tj["decoder"] = {{"type", "Sequence"},
                     {"decoders", {{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
                                   {{"type", "ByteFallback"}},
                                   {{"type", "Fuse"}},
                                   {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
    tj["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_from_scores(tokens, scores, types)},
                   {"byte_fallback", true}, {"fuse_unk", true}};
    if (unk >= 0) tj["model"]["unk_token"] = tokens[unk];
  } else {
    throw_input("{}: tokenizer.ggml.model '{}' is not supported (gpt2 and llama are)", m.source, model);
  }
  return hf_tokenizer(tj.dump(), m.source, eos >= 0 ? tokens[eos].get<std::string>() : "");
}

}  // namespace

Model load(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path);
  const Header h = parse_header(file->bytes(), path);
  const Meta m{h.metadata, path};
  std::map<std::string, const TensorInfo*> by_name;
  for (const TensorInfo& t : h.tensors) by_name[t.name] = &t;
  const LlamaConfig c = read_config(m, by_name);

  std::map<std::string, at::Tensor> weights;
  for (const TensorInfo& t : h.tensors) {
    const std::string name = hf_name(t.name);
    if (name.empty()) throw_input("{}: tensor '{}' is not part of a {} model edkm reads", path, t.name, c.model_type);
    at::Tensor w = at::empty(t.shape(), at::kFloat);
    const auto* src = reinterpret_cast<const uint8_t*>(file->data() + h.data_start + t.offset);
    const int64_t row = t.ne[0], rows = t.numel() / row, row_bytes = static_cast<int64_t>(t.bytes) / rows;
    float* dst = w.data_ptr<float>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) dequantize(t.type, src + r * row_bytes, row, dst + r * row);
    });
    // convert_hf_to_gguf.py interleaves the rotary halves of llama q and k (weights and biases)
    // for ggml's rope; Qwen's files keep Hugging Face's rotate-half layout (NEOX rope).
    if (c.model_type == "llama" || c.model_type == "mistral") {
      const bool q = name.find("q_proj") != std::string::npos, k = name.find("k_proj") != std::string::npos;
      if (q || k) {
        const int64_t heads = q ? c.n_heads : c.n_kv_heads;
        w = w.dim() == 1 ? meta_to_hf_rows(w.view({-1, 1}), heads).view({-1}) : meta_to_hf_rows(w, heads);
        w = w.contiguous();
      }
    }
    weights[name] = w;
  }
  return {Llama(c, std::move(weights), path), read_tokenizer(m)};
}

}  // namespace edkm::gguf
