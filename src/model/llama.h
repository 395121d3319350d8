// model: a LLaMA-family decoder in libtorch, with training forward (differentiable, optional
// per-layer gradient checkpointing) and an inference path with a KV cache.
//
// Weights are kept by their Hugging Face names (model.layers.3.self_attn.q_proj.weight, ...;
// model/config.h tensor_name) in Hugging Face layout (rotary embeddings rotate the two halves of each head, "rotate_half";
// llama2.c / Meta checkpoints are permuted into it when loaded).
#pragma once

#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/config.h"

namespace edkm {

// Substitutes some weights in one forward pass (DKM's soft-clustered projections).
using WeightOverrides = std::unordered_map<std::string, at::Tensor>;

// A projection computed by something other than a dense matmul (packed palette kernels).
class LinearKernel {
 public:
  virtual ~LinearKernel() = default;
  // x [..., in] -> [..., out]
  virtual at::Tensor forward(const at::Tensor& x) const = 0;
  // The weight it computes with, as a dense [out, in] tensor in `dtype`: what a model moved to
  // a device the kernel does not serve computes with instead.
  virtual at::Tensor dense(at::ScalarType dtype) const = 0;
};

// Weights made from the model's own where a decoder layer needs them: DKM's soft-clustered
// weights, one layer at a time (and again when a checkpointed layer is recomputed), so that a
// training step holds one layer's of them rather than every layer's.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool provides(const std::string& name) const = 0;
  // The tensor to compute with in place of the model's weight `w` (named `name`), differentiable
  // w.r.t. w.
  virtual at::Tensor weight(const std::string& name, const at::Tensor& w) const = 0;
};

struct ForwardOptions {
  const WeightOverrides* overrides = nullptr;
  // Recompute each decoder layer in backward instead of keeping its activations.
  bool checkpoint_layers = false;
  // Applied to the weights it provides (and that are not overridden), inside each layer.
  const WeightSource* source = nullptr;
};

// Keys and values of every layer for incremental decoding.
struct KVCache {
  at::Tensor k, v;   // [n_layers, batch, n_kv_heads, capacity, head_dim]
  int64_t pos = 0;   // tokens already in the cache
  int64_t capacity() const { return k.size(3); }
};

// One weight of the decoder, bound once when the model is built: its name (the key of
// WeightOverrides), its entry in Llama::weights() (map entries never move, so the pointer
// follows every assignment to it), and the kernel that computes its products instead, if any.
// An optional tensor the config does not have (a bias, a q/k norm) is bound with tensor null.
struct BoundWeight {
  std::string name;
  at::Tensor* tensor = nullptr;
  std::shared_ptr<const LinearKernel> kernel;
  explicit operator bool() const { return tensor != nullptr; }
};

// A linear projection: its weight and, where the config has one, its bias.
struct BoundLinear {
  BoundWeight weight, bias;
};

// The tensors of one decoder layer (llama.cpp's llama_layer), by role.
struct LayerWeights {
  BoundWeight attn_norm, q_norm, k_norm, mlp_norm;
  BoundLinear q, k, v, o, gate, up, down;
};

class Llama {
 public:
  // Checks that `weights` holds exactly the tensors of `cfg` (names and shapes); `source` names
  // the file in errors. Tensors are used as given (dtype and device).
  Llama(LlamaConfig cfg, std::map<std::string, at::Tensor> weights, const std::string& source);
  // Copies and moves bind the typed views to the new object's own tensors.
  Llama(const Llama& other);
  Llama(Llama&& other) noexcept;
  Llama& operator=(const Llama& other);
  Llama& operator=(Llama&& other) noexcept;

  // Random initialisation (N(0, 0.02), norms 1) for tests and benchmarks.
  static Llama random(const LlamaConfig& cfg, at::ScalarType dtype, uint64_t seed);

  const LlamaConfig& config() const { return cfg_; }
  // Every tensor by name. Entries may be assigned (training, loading a checkpoint), not added
  // or erased: the typed views point at them.
  const std::map<std::string, at::Tensor>& weights() const { return weights_; }
  std::map<std::string, at::Tensor>& weights() { return weights_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const at::Tensor& weight(const std::string& name) const;
  // The linear projections (q, k, v, o, gate, up, down of every layer), then the classifier
  // (lm_head, or the tied embedding) and the embedding table.
  std::vector<std::string> projection_names() const;
  at::ScalarType dtype() const;
  at::Device device() const;
  // Casts every weight (norms included) to dtype / moves them to device. Kernels serve CPU
  // tensors: moving to another device decodes each kernel's weight there once (dense()).
  void to(at::ScalarType dtype);
  void to(at::Device device);

  // Computes this projection with `kernel` instead of its dense weight (null: the dense weight
  // again).
  void set_kernel(const std::string& name, std::shared_ptr<const LinearKernel> kernel);

  // tokens [B, T] int64 -> logits [B, T, vocab] in the model's dtype; differentiable.
  at::Tensor forward(const at::Tensor& tokens, const ForwardOptions& opts = {}) const;
  // Incremental decoding: appends tokens [B, T] at cache.pos and returns their logits.
  at::Tensor forward(const at::Tensor& tokens, KVCache& cache) const;
  KVCache new_cache(int64_t batch, int64_t capacity) const;
  // The decoder one layer at a time, for layer-wise post-training quantization (GPTQ), which
  // keeps the hidden states between layers: the embeddings of tokens [B, T], and layer l applied
  // to hidden states [B, T, dim] at positions 0..T-1. forward(tokens) is the final norm and the
  // classifier after layers 0..n-1 applied in turn to embed(tokens).
  at::Tensor embed(const at::Tensor& tokens) const;
  at::Tensor layer(int64_t l, const at::Tensor& hidden) const;

 private:
  at::Tensor run(const at::Tensor& tokens, const ForwardOptions& opts, KVCache* cache) const;
  // (Re)builds the typed views from weights_ and kernels_.
  void bind();

  LlamaConfig cfg_;
  std::map<std::string, at::Tensor> weights_;
  std::unordered_map<std::string, std::shared_ptr<const LinearKernel>> kernels_;
  BoundWeight embed_, final_norm_, classifier_;  // classifier_: lm_head, or the tied embedding
  std::vector<LayerWeights> layers_;
};

// The target of a position that carries no loss (PyTorch's cross-entropy ignore_index).
constexpr int kIgnoreIndex = -100;

// Cross-entropy (nats) of logits [B, T, V] against targets [B, T], averaged (Mean) or summed
// (Sum) over the targets that are not kIgnoreIndex. Computed in fp32 (fp64 for fp64 logits).
at::Tensor next_token_loss(const at::Tensor& logits, const at::Tensor& targets,
                           at::Reduction::Reduction reduction = at::Reduction::Mean);

// Distillation loss of student logits against teacher logits (both [B, T, V]) at temperature
// tau: tau^2 KL(softmax(teacher / tau) || softmax(student / tau)) at each position whose target
// is not kIgnoreIndex, averaged (Mean) or summed (Sum) over those positions. fp32 (fp64 for
// fp64 logits); no gradient flows to the teacher.
at::Tensor distillation_loss(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& targets,
                             double tau, at::Reduction::Reduction reduction = at::Reduction::Mean);

}  // namespace edkm
