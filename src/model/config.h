// The hyper-parameters of a LLaMA-family decoder (LLaMA / LLaMA-2, TinyLlama, SmolLM, Mistral
// without sliding window, the llama2.c models), with Hugging Face config.json conversion.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace edkm {

struct LlamaConfig {
  int64_t dim = 0;          // hidden_size
  int64_t hidden_dim = 0;   // intermediate_size (SwiGLU)
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;   // grouped-query attention: n_heads / n_kv_heads queries per kv head
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool tie_embeddings = true;
  int64_t bos_id = 1;
  int64_t eos_id = 2;

  int64_t head_dim() const { return dim / n_heads; }
  int64_t kv_dim() const { return head_dim() * n_kv_heads; }
  int64_t num_parameters() const;

  // InputError naming `source` and the field when a value is missing or inconsistent.
  void validate(const std::string& source) const;
  static LlamaConfig from_hf(const nlohmann::json& j, const std::string& source);
  nlohmann::json to_hf() const;
};

// Hugging Face tensor names: the keys of Llama::weights() and of every file edkm reads or writes.
namespace tensor_name {
inline constexpr char kEmbed[] = "model.embed_tokens.weight";
inline constexpr char kFinalNorm[] = "model.norm.weight";
inline constexpr char kLmHead[] = "lm_head.weight";
// Leaves within layer l, named "model.layers.<l>.<leaf>" (layer_tensor_name).
inline constexpr char kAttnNorm[] = "input_layernorm.weight";
inline constexpr char kMlpNorm[] = "post_attention_layernorm.weight";
inline constexpr char kQ[] = "self_attn.q_proj.weight";
inline constexpr char kK[] = "self_attn.k_proj.weight";
inline constexpr char kV[] = "self_attn.v_proj.weight";
inline constexpr char kO[] = "self_attn.o_proj.weight";
inline constexpr char kGate[] = "mlp.gate_proj.weight";
inline constexpr char kUp[] = "mlp.up_proj.weight";
inline constexpr char kDown[] = "mlp.down_proj.weight";
// The linear projections of a layer, in the order Llama::projection_names() lists them.
inline constexpr const char* kProjections[] = {kQ, kK, kV, kO, kGate, kUp, kDown};
}  // namespace tensor_name

// "model.layers.<layer>.<leaf>".
std::string layer_tensor_name(int64_t layer, const std::string& leaf);
// Every tensor of a model with this config, by canonical name and shape, in a fixed order
// (embeddings, each layer, final norm, classifier when untied).
std::vector<std::pair<std::string, std::vector<int64_t>>> tensor_shapes(const LlamaConfig& c);

}  // namespace edkm
