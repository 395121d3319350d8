// The hyper-parameters of a LLaMA-family decoder, with Hugging Face config.json conversion.
//
// One forward pass (model/llama.cpp) serves Llama 1/2/3.x, TinyLlama, SmolLM2, Mistral, Qwen2 and
// Qwen3 and the llama2.c models: where these architectures differ, the difference is a field here
// (biases, q/k norms, head size, rotary scaling, attention window), set once from config.json.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace edkm {

// How rotary frequencies are rescaled for a longer context than the model was trained on
// (config.json's rope_scaling, or rope_parameters in transformers 5).
struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;                   // linear, llama3
  double low_freq_factor = 1.0;          // llama3
  double high_freq_factor = 4.0;         // llama3
  int64_t original_max_seq_len = 0;      // llama3: original_max_position_embeddings

};

struct LlamaConfig {
  // Hugging Face model_type: llama, mistral, qwen2 or qwen3. It decides only which config.json
  // keys are read and written; the fields below describe the architecture.
  std::string model_type = "llama";
  int64_t dim = 0;          // hidden_size
  int64_t hidden_dim = 0;   // intermediate_size (SwiGLU)
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;   // grouped-query attention: n_heads / n_kv_heads queries per kv head
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_embeddings = true;
  int64_t head_size = 0;      // head_dim when config.json sets it (Qwen3, Mistral-Nemo); 0: dim / n_heads
  bool qkv_bias = false;      // q, k, v projections have biases (Qwen2; Llama's attention_bias)
  bool o_bias = false;        // o projection has a bias (Llama's attention_bias)
  bool mlp_bias = false;      // gate, up, down have biases (Llama's mlp_bias)
  bool qk_norm = false;       // RMSNorm over each head of q and k before RoPE (Qwen3)
  int64_t sliding_window = 0; // a query sees only the last `sliding_window` keys (Mistral); 0: all
  int64_t bos_id = 1;
  int64_t eos_id = 2;

  int64_t head_dim() const { return head_size > 0 ? head_size : dim / n_heads; }
  int64_t q_dim() const { return head_dim() * n_heads; }
  int64_t kv_dim() const { return head_dim() * n_kv_heads; }
  int64_t num_parameters() const;

  // InputError naming `source` and the field when a value is missing or inconsistent, or when
  // model_type cannot express the architecture fields (so that to_hf() round-trips).
  void validate(const std::string& source) const;
  // Reads both the transformers 4 keys (rope_theta, rope_scaling) and transformers 5's
  // rope_parameters. Refuses what the forward pass does not implement (other rope types,
  // per-layer sliding windows, partial rotary) with an error naming `source` and the key.
  static LlamaConfig from_hf(const nlohmann::json& j, const std::string& source);
  // config.json in the transformers 4 form that every version and llama.cpp's converter read.
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
inline constexpr char kQNorm[] = "self_attn.q_norm.weight";
inline constexpr char kKNorm[] = "self_attn.k_norm.weight";
inline constexpr char kQBias[] = "self_attn.q_proj.bias";
inline constexpr char kKBias[] = "self_attn.k_proj.bias";
inline constexpr char kVBias[] = "self_attn.v_proj.bias";
inline constexpr char kOBias[] = "self_attn.o_proj.bias";
inline constexpr char kGateBias[] = "mlp.gate_proj.bias";
inline constexpr char kUpBias[] = "mlp.up_proj.bias";
inline constexpr char kDownBias[] = "mlp.down_proj.bias";
// The linear projections of a layer, in the order Llama::projection_names() lists them.
inline constexpr const char* kProjections[] = {kQ, kK, kV, kO, kGate, kUp, kDown};
}  // namespace tensor_name

// "model.layers.<layer>.<leaf>".
std::string layer_tensor_name(int64_t layer, const std::string& leaf);
// Every tensor of a model with this config, by canonical name and shape, in a fixed order
// (embeddings, each layer, final norm, classifier when untied). A layer's optional tensors (biases,
// q/k norms) are listed only when the config has them.
std::vector<std::pair<std::string, std::vector<int64_t>>> tensor_shapes(const LlamaConfig& c);

}  // namespace edkm
