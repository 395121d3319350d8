#include "model/config.h"

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace edkm {
namespace {

using json = nlohmann::json;

// What each model_type's config.json can say, so that a config written by to_hf() reads back
// the same. The forward pass never looks at model_type.
struct Family {
  const char* model_type;
  const char* architecture;
  bool qkv_bias;          // fixed by the family (Qwen2 always has them)
  bool attention_bias;    // the attention_bias key sets qkv_bias and o_bias together
  bool mlp_bias;          // the mlp_bias key
  bool qk_norm;           // fixed by the family (Qwen3 always has them)
  bool sliding_window;    // the sliding_window key applies to every layer
};

constexpr Family kFamilies[] = {
    {"llama", "LlamaForCausalLM", false, true, true, false, false},
    {"mistral", "MistralForCausalLM", false, false, false, false, true},
    {"qwen2", "Qwen2ForCausalLM", true, false, false, false, false},
    {"qwen3", "Qwen3ForCausalLM", false, true, false, true, false},
};

const Family* find_family(const std::string& type) {
  for (const Family& f : kFamilies)
    if (type == f.model_type) return &f;
  return nullptr;
}

const char* rope_type_name(RopeScaling::Type t) {
  switch (t) {
    case RopeScaling::Type::kLinear: return "linear";
    case RopeScaling::Type::kLlama3: return "llama3";
    case RopeScaling::Type::kNone: break;
  }
  return "default";
}

// Typed reads of config.json keys, with errors that name the file and the key.
struct Reader {
  const json& j;
  std::string source;
  std::string prefix;  // "rope_scaling." for keys of the nested object

  bool has(const char* key) const { return j.contains(key) && !j.at(key).is_null(); }
  const json& need(const char* key) const {
    if (!has(key)) throw_input("{}: missing config field '{}{}'", source, prefix, key);
    return j.at(key);
  }
  int64_t integer(const char* key) const {
    const json& v = need(key);
    if (!v.is_number_integer()) throw_input("{}: config field '{}{}' must be an integer", source, prefix, key);
    return v.get<int64_t>();
  }
  double number(const char* key) const {
    const json& v = need(key);
    if (!v.is_number()) throw_input("{}: config field '{}{}' must be a number", source, prefix, key);
    return v.get<double>();
  }
  bool boolean(const char* key) const {
    const json& v = need(key);
    if (!v.is_boolean()) throw_input("{}: config field '{}{}' must be true or false", source, prefix, key);
    return v.get<bool>();
  }
  std::string string(const char* key) const {
    const json& v = need(key);
    if (!v.is_string()) throw_input("{}: config field '{}{}' must be a string", source, prefix, key);
    return v.get<std::string>();
  }
  int64_t integer_or(const char* key, int64_t fallback) const { return has(key) ? integer(key) : fallback; }
  double number_or(const char* key, double fallback) const { return has(key) ? number(key) : fallback; }
  bool boolean_or(const char* key, bool fallback) const { return has(key) ? boolean(key) : fallback; }
};

// rope_theta and the scaling from transformers 4's rope_theta + rope_scaling, or from
// transformers 5's rope_parameters (which holds rope_theta itself).
void read_rope(const Reader& r, LlamaConfig& c) {
  json params;
  if (r.has("rope_parameters")) {
    params = r.j.at("rope_parameters");
    if (!params.is_object()) throw_input("{}: config field 'rope_parameters' must be an object", r.source);
    Reader p{params, r.source, "rope_parameters."};
    c.rope_theta = p.number("rope_theta");
  } else {
    c.rope_theta = r.number_or("rope_theta", 10000.0);
    if (!r.has("rope_scaling")) return;
    params = r.j.at("rope_scaling");
    if (!params.is_object()) throw_input("{}: config field 'rope_scaling' must be an object or null", r.source);
  }
  const std::string where = r.has("rope_parameters") ? "rope_parameters." : "rope_scaling.";
  Reader p{params, r.source, where};
  // transformers 4.45 renamed rope_scaling's "type" to "rope_type"; checkpoints carry either.
  const std::string type = p.has("rope_type") ? p.string("rope_type") : p.has("type") ? p.string("type") : "default";
  if (p.has("partial_rotary_factor") && p.number("partial_rotary_factor") != 1.0)
    throw_input("{}: {}partial_rotary_factor {} is not supported (edkm rotates the whole head)", r.source, where,
                params.at("partial_rotary_factor").dump());
  RopeScaling& s = c.rope_scaling;
  if (type == "default") {
    s = {};
  } else if (type == "linear") {
    s.type = RopeScaling::Type::kLinear;
    s.factor = p.number("factor");
  } else if (type == "llama3") {
    s.type = RopeScaling::Type::kLlama3;
    s.factor = p.number("factor");
    s.low_freq_factor = p.number("low_freq_factor");
    s.high_freq_factor = p.number("high_freq_factor");
    s.original_max_seq_len = p.integer("original_max_position_embeddings");
  } else {
    throw_input("{}: {}rope_type '{}' is not supported (default, linear and llama3 are)", r.source, where, type);
  }
}

}  // namespace

int64_t LlamaConfig::num_parameters() const {
  int64_t n = 0;
  for (const auto& [name, shape] : tensor_shapes(*this)) {
    int64_t size = 1;
    for (int64_t d : shape) size *= d;
    n += size;
  }
  return n;
}

void LlamaConfig::validate(const std::string& source) const {
  auto positive = [&](int64_t v, const char* name) {
    if (v <= 0) throw_input("{}: {} must be positive, got {}", source, name, v);
  };
  const Family* family = find_family(model_type);
  if (!family)
    throw_input("{}: model_type '{}' is not supported (llama, mistral, qwen2 and qwen3 are)", source, model_type);
  positive(dim, "dim (hidden_size)");
  positive(hidden_dim, "hidden_dim (intermediate_size)");
  positive(n_layers, "n_layers (num_hidden_layers)");
  positive(n_heads, "n_heads (num_attention_heads)");
  positive(n_kv_heads, "n_kv_heads (num_key_value_heads)");
  positive(vocab_size, "vocab_size");
  positive(max_seq_len, "max_seq_len (max_position_embeddings)");
  if (head_size < 0) throw_input("{}: head_dim must be positive, got {}", source, head_size);
  if (head_size == 0 && dim % n_heads != 0)
    throw_input("{}: dim {} is not divisible by n_heads {} (and no head_dim is given)", source, dim, n_heads);
  if (head_dim() % 2 != 0) throw_input("{}: head dim {} must be even for rotary embeddings", source, head_dim());
  if (n_heads % n_kv_heads != 0)
    throw_input("{}: n_heads {} is not a multiple of n_kv_heads {}", source, n_heads, n_kv_heads);
  if (!(norm_eps > 0)) throw_input("{}: norm_eps must be positive", source);
  if (!(rope_theta > 0)) throw_input("{}: rope_theta must be positive", source);
  if (sliding_window < 0) throw_input("{}: sliding_window must be positive, got {}", source, sliding_window);
  const RopeScaling& s = rope_scaling;
  if (s.type != RopeScaling::Type::kNone && !(s.factor > 0))
    throw_input("{}: rope scaling factor must be positive", source);
  if (s.type == RopeScaling::Type::kLlama3) {
    if (!(s.low_freq_factor > 0 && s.high_freq_factor > s.low_freq_factor))
      throw_input("{}: llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got {} and {}", source,
                  s.low_freq_factor, s.high_freq_factor);
    positive(s.original_max_seq_len, "rope scaling original_max_position_embeddings");
  }
  // The architecture must be one that model_type's config.json can state.
  auto expressible = [&](bool ok, const char* what) {
    if (!ok) throw_input("{}: model_type '{}' cannot have {}", source, model_type, what);
  };
  expressible(family->attention_bias ? qkv_bias == o_bias : qkv_bias == family->qkv_bias && !o_bias,
              family->qkv_bias ? "an o_proj bias, or no q/k/v biases" : "these attention biases");
  expressible(family->mlp_bias || !mlp_bias, "MLP biases");
  expressible(qk_norm == family->qk_norm, family->qk_norm ? "attention without q/k norms" : "q/k norms");
  expressible(family->sliding_window || sliding_window == 0, "a sliding window");
}

LlamaConfig LlamaConfig::from_hf(const json& j, const std::string& source) {
  if (!j.is_object()) throw_input("{}: config is not a JSON object", source);
  const Reader r{j, source, ""};
  LlamaConfig c;
  c.model_type = r.has("model_type") ? r.string("model_type") : "llama";
  const Family* family = find_family(c.model_type);
  if (!family)
    throw_input("{}: model_type '{}' is not supported (llama, mistral, qwen2 and qwen3 are)", source, c.model_type);
  if (r.has("hidden_act") && r.string("hidden_act") != "silu")
    throw_input("{}: hidden_act '{}' is not supported (the LLaMA family uses silu)", source, r.string("hidden_act"));
  c.dim = r.integer("hidden_size");
  c.hidden_dim = r.integer("intermediate_size");
  c.n_layers = r.integer("num_hidden_layers");
  c.n_heads = r.integer("num_attention_heads");
  c.n_kv_heads = r.integer_or("num_key_value_heads", c.n_heads);
  c.head_size = r.integer_or("head_dim", 0);
  c.vocab_size = r.integer("vocab_size");
  c.max_seq_len = r.integer("max_position_embeddings");
  c.norm_eps = r.number_or("rms_norm_eps", 1e-6);
  read_rope(r, c);
  c.tie_embeddings = r.boolean_or("tie_word_embeddings", false);
  c.qkv_bias = family->qkv_bias;
  if (family->attention_bias) c.qkv_bias = c.o_bias = r.boolean_or("attention_bias", false);
  if (family->mlp_bias) c.mlp_bias = r.boolean_or("mlp_bias", false);
  c.qk_norm = family->qk_norm;
  if (family->sliding_window) c.sliding_window = r.integer_or("sliding_window", 0);
  // Qwen2/3 name a window that applies to some layers only when use_sliding_window is set.
  if (r.boolean_or("use_sliding_window", false))
    throw_input("{}: use_sliding_window (sliding attention on some layers) is not supported", source);
  if (r.has("layer_types")) {
    const json& types = j.at("layer_types");
    const char* expected = c.sliding_window > 0 ? "sliding_attention" : "full_attention";
    if (!types.is_array()) throw_input("{}: config field 'layer_types' must be a list", source);
    for (const json& t : types)
      if (t != expected)
        throw_input("{}: layer_types has {}, but edkm gives every layer the same attention ({})", source, t.dump(),
                    expected);
  }
  if (r.has("bos_token_id") && j.at("bos_token_id").is_number_integer()) c.bos_id = r.integer("bos_token_id");
  if (r.has("eos_token_id") && j.at("eos_token_id").is_number_integer()) c.eos_id = r.integer("eos_token_id");
  c.validate(source);
  return c;
}

json LlamaConfig::to_hf() const {
  const Family* family = find_family(model_type);
  EDKM_ASSERT(family);  // validate() accepted model_type
  json rope = nullptr;
  if (rope_scaling.type != RopeScaling::Type::kNone) {
    rope = {{"rope_type", rope_type_name(rope_scaling.type)}, {"factor", rope_scaling.factor}};
    if (rope_scaling.type == RopeScaling::Type::kLlama3) {
      rope["low_freq_factor"] = rope_scaling.low_freq_factor;
      rope["high_freq_factor"] = rope_scaling.high_freq_factor;
      rope["original_max_position_embeddings"] = rope_scaling.original_max_seq_len;
    }
  }
  json j = {{"architectures", {family->architecture}},
            {"model_type", model_type},
            {"hidden_size", dim},
            {"intermediate_size", hidden_dim},
            {"num_hidden_layers", n_layers},
            {"num_attention_heads", n_heads},
            {"num_key_value_heads", n_kv_heads},
            {"head_dim", head_dim()},
            {"vocab_size", vocab_size},
            {"max_position_embeddings", max_seq_len},
            {"rms_norm_eps", norm_eps},
            {"rope_theta", rope_theta},
            {"rope_scaling", rope},
            {"tie_word_embeddings", tie_embeddings},
            {"hidden_act", "silu"},
            {"bos_token_id", bos_id},
            {"eos_token_id", eos_id},
            {"torch_dtype", "float32"}};
  if (family->attention_bias) j["attention_bias"] = qkv_bias;
  if (family->mlp_bias) j["mlp_bias"] = mlp_bias;
  if (family->sliding_window) j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
  else if (model_type != "llama") j["use_sliding_window"] = false;
  return j;
}

std::string layer_tensor_name(int64_t layer, const std::string& leaf) {
  return "model.layers." + std::to_string(layer) + "." + leaf;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> tensor_shapes(const LlamaConfig& c) {
  namespace n = tensor_name;
  std::vector<std::pair<std::string, std::vector<int64_t>>> s;
  s.push_back({n::kEmbed, {c.vocab_size, c.dim}});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    auto add = [&](const char* leaf, std::vector<int64_t> shape) { s.push_back({layer_tensor_name(l, leaf), shape}); };
    add(n::kAttnNorm, {c.dim});
    add(n::kQ, {c.q_dim(), c.dim});
    add(n::kK, {c.kv_dim(), c.dim});
    add(n::kV, {c.kv_dim(), c.dim});
    add(n::kO, {c.dim, c.q_dim()});
    if (c.qkv_bias) {
      add(n::kQBias, {c.q_dim()});
      add(n::kKBias, {c.kv_dim()});
      add(n::kVBias, {c.kv_dim()});
    }
    if (c.o_bias) add(n::kOBias, {c.dim});
    if (c.qk_norm) {
      add(n::kQNorm, {c.head_dim()});
      add(n::kKNorm, {c.head_dim()});
    }
    add(n::kMlpNorm, {c.dim});
    add(n::kGate, {c.hidden_dim, c.dim});
    add(n::kUp, {c.hidden_dim, c.dim});
    add(n::kDown, {c.dim, c.hidden_dim});
    if (c.mlp_bias) {
      add(n::kGateBias, {c.hidden_dim});
      add(n::kUpBias, {c.hidden_dim});
      add(n::kDownBias, {c.dim});
    }
  }
  s.push_back({n::kFinalNorm, {c.dim}});
  if (!c.tie_embeddings) s.push_back({n::kLmHead, {c.vocab_size, c.dim}});
  return s;
}

}  // namespace edkm
