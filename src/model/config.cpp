#include "model/config.h"

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace edkm {

int64_t LlamaConfig::num_parameters() const {
  const int64_t per_layer = 2 * dim + dim * dim * 2 + dim * kv_dim() * 2 + 3 * dim * hidden_dim;
  return vocab_size * dim * (tie_embeddings ? 1 : 2) + n_layers * per_layer + dim;
}

void LlamaConfig::validate(const std::string& source) const {
  auto positive = [&](int64_t v, const char* name) {
    if (v <= 0) throw_input("{}: {} must be positive, got {}", source, name, v);
  };
  positive(dim, "dim (hidden_size)");
  positive(hidden_dim, "hidden_dim (intermediate_size)");
  positive(n_layers, "n_layers (num_hidden_layers)");
  positive(n_heads, "n_heads (num_attention_heads)");
  positive(n_kv_heads, "n_kv_heads (num_key_value_heads)");
  positive(vocab_size, "vocab_size");
  positive(max_seq_len, "max_seq_len (max_position_embeddings)");
  if (dim % n_heads != 0) throw_input("{}: dim {} is not divisible by n_heads {}", source, dim, n_heads);
  if (head_dim() % 2 != 0) throw_input("{}: head dim {} must be even for rotary embeddings", source, head_dim());
  if (n_heads % n_kv_heads != 0)
    throw_input("{}: n_heads {} is not a multiple of n_kv_heads {}", source, n_heads, n_kv_heads);
  if (!(norm_eps > 0)) throw_input("{}: norm_eps must be positive", source);
  if (!(rope_theta > 0)) throw_input("{}: rope_theta must be positive", source);
}

LlamaConfig LlamaConfig::from_hf(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw_input("{}: config is not a JSON object", source);
  auto need = [&](const char* key) -> const nlohmann::json& {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) throw_input("{}: missing config field '{}'", source, key);
    return *it;
  };
  auto integer = [&](const char* key) {
    const auto& v = need(key);
    if (!v.is_number_integer()) throw_input("{}: config field '{}' must be an integer", source, key);
    return v.get<int64_t>();
  };
  if (j.contains("model_type")) {
    const std::string type = j["model_type"].is_string() ? j["model_type"].get<std::string>() : "";
    if (type != "llama" && type != "mistral")
      throw_input("{}: model_type '{}' is not a LLaMA-family model (expected llama or mistral)", source, type);
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    throw_input("{}: hidden_act {} is not supported (LLaMA uses silu)", source, j["hidden_act"].dump());
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
    throw_input("{}: rope_scaling is not supported", source);
  LlamaConfig c;
  c.dim = integer("hidden_size");
  c.hidden_dim = integer("intermediate_size");
  c.n_layers = integer("num_hidden_layers");
  c.n_heads = integer("num_attention_heads");
  c.n_kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                     ? integer("num_key_value_heads") : c.n_heads;
  c.vocab_size = integer("vocab_size");
  c.max_seq_len = integer("max_position_embeddings");
  c.norm_eps = j.value("rms_norm_eps", 1e-6);
  c.rope_theta = j.value("rope_theta", 10000.0);
  c.tie_embeddings = j.value("tie_word_embeddings", false);
  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_id = j["bos_token_id"];
  if (j.contains("eos_token_id") && j["eos_token_id"].is_number_integer()) c.eos_id = j["eos_token_id"];
  c.validate(source);
  return c;
}

nlohmann::json LlamaConfig::to_hf() const {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"hidden_size", dim},
          {"intermediate_size", hidden_dim},
          {"num_hidden_layers", n_layers},
          {"num_attention_heads", n_heads},
          {"num_key_value_heads", n_kv_heads},
          {"vocab_size", vocab_size},
          {"max_position_embeddings", max_seq_len},
          {"rms_norm_eps", norm_eps},
          {"rope_theta", rope_theta},
          {"tie_word_embeddings", tie_embeddings},
          {"hidden_act", "silu"},
          {"bos_token_id", bos_id},
          {"eos_token_id", eos_id},
          {"torch_dtype", "float32"}};
}

std::string layer_tensor_name(int64_t layer, const std::string& leaf) {
  return "model.layers." + std::to_string(layer) + "." + leaf;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> tensor_shapes(const LlamaConfig& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> s;
  s.push_back({tensor_name::kEmbed, {c.vocab_size, c.dim}});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    s.push_back({layer_tensor_name(l, tensor_name::kAttnNorm), {c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kQ), {c.dim, c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kK), {c.kv_dim(), c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kV), {c.kv_dim(), c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kO), {c.dim, c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kMlpNorm), {c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kGate), {c.hidden_dim, c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kUp), {c.hidden_dim, c.dim}});
    s.push_back({layer_tensor_name(l, tensor_name::kDown), {c.dim, c.hidden_dim}});
  }
  s.push_back({tensor_name::kFinalNorm, {c.dim}});
  if (!c.tie_embeddings) s.push_back({tensor_name::kLmHead, {c.vocab_size, c.dim}});
  return s;
}

}  // namespace edkm
