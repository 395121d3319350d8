// Which weights of a model are clustered, with which DKM settings, and their DKM state
// (palettes carried from step to step, frozen per-row scales).
//
// The plan comes from command-line defaults and an optional JSON file:
//   {
//     "bits": 3, "group_size": 0, ...             DKM settings (cluster/settings.h) for every
//                                                 clustered weight
//     "include_embeddings": false,                also cluster embed_tokens and lm_head
//     "min_weights": 0,                           leave smaller matrices alone (coremltools: 2048)
//     "rules": [                                  the first rule whose regex matches the whole
//       {"pattern": "model\\.layers\\.0\\..*", "skip": true},      name decides; a matching rule
//       {"pattern": ".*mlp\\..*", "bits": 4, "group_size": 16}     also selects a weight that is
//     ]                                                            not clustered by default
//   }
// By default the attention and MLP projections (q, k, v, o, gate, up, down) are clustered.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cluster/cluster.h"
#include "cluster/settings.h"
#include "cluster/straight_through.h"
#include "model/llama.h"

namespace edkm {

struct ClusterRule {
  std::string pattern;
  bool skip = false;
  nlohmann::json overrides;  // DKMConfig fields
};

struct ClusteringPlan {
  DKMConfig defaults;
  bool include_embeddings = false;
  int64_t min_weights = 0;
  std::vector<ClusterRule> rules;

  // Applies a JSON config on top of this plan (unknown keys are errors naming `source`).
  void apply_json(const nlohmann::json& j, const std::string& source);
  // The weights to cluster and their settings; InputError if none is selected.
  std::vector<std::pair<std::string, DKMConfig>> resolve(const Llama& model) const;
};

// How the clustered weights are trained: DKM's soft assignment, or one of the straight-through
// baselines (cluster/straight_through.h). Each writes palettes, so the file and the runtime are
// the same for all three.
enum class TrainMethod {
  kDKM,         // soft assignment by attention over the palette (the method of this project)
  kHardKMeans,  // nearest centroid, centroids re-estimated by a Lloyd step per optimizer step
  kQAT,         // a uniform grid per output row with learned scale and zero point
};
std::string to_string(TrainMethod m);  // dkm | hard-kmeans | qat
TrainMethod parse_train_method(const std::string& s);

struct ClusteredWeight {
  std::string name;
  DKMConfig cfg;       // for QAT: one palette per row (group_size 1), no per-row scale, fp32
  at::Tensor palette;  // [G, k, d], carried from step to step (QAT: derived from grid)
  at::Tensor scale;    // [rows] or undefined
  LearnedGrid grid;    // QAT only: the trainable scale and zero point per row
  Importance importance;  // weighing the centroid updates; or undefined
};

// The clustered weights of one training step, made where the layers need them (a WeightSource
// for Llama::forward). Clustering::step() runs DKM's iterations (or the Lloyd step and the
// nearest centroids) once; each layer then makes its soft-clustered (hard-assigned,
// fake-quantized) weights from them, in its forward and again in its
// recomputation under gradient checkpointing. The gradient w.r.t. a soft weight passes
// straight into the model weight's own .grad, where micro-batches and data-parallel learners
// sum it as they sum any gradient; backward() then carries each sum through DKM (through the
// straight-through baselines) to the weight, once per step. DKM's backward is linear in the
// gradient w.r.t. its output, so this equals backpropagating every use on its own.
// With the pattern index (16-bit cluster dtype, scalar clustering) nothing of a clustered
// weight's size outlives the layer that uses it: the step holds one layer's soft weights, not
// every layer's (DeferredDKM, DeferredHardAssign).
class StepWeights : public WeightSource {
 public:
  bool provides(const std::string& name) const override { return entries_.count(name) > 0; }
  // The soft-clustered weight (hard-assigned, fake-quantized) of `name`, made from the state
  // of step(), in the step's dtype; its gradient reaches `w` unchanged.
  at::Tensor weight(const std::string& name, const at::Tensor& w) const override;
  // Replaces each clustered weight's .grad (dL/dw~, summed) by dL/dw and gives trainable()
  // theirs. Call once, after the gradients are summed and before the weights change.
  void backward(Llama& model) const;

 private:
  friend class Clustering;
  struct Entry {
    const ClusteredWeight* cw = nullptr;
    std::optional<DeferredDKM> dkm;          // DKM only
    std::optional<DeferredHardAssign> hard;  // hard k-means only
  };
  // Without a graph.
  at::Tensor made(const Entry& e, const at::Tensor& w) const;

  TrainMethod method_ = TrainMethod::kDKM;
  at::ScalarType dtype_ = at::ScalarType::Undefined;
  std::unordered_map<std::string, Entry> entries_;
};

class Clustering {
 public:
  Clustering() = default;
  // Per-row scales and initial palettes from the (pretrained) weights; with `importance`
  // (weight-shaped, by name; e.g. fisher_diagonal()), the palettes minimise the importance-
  // weighted squared error (init_palette), and with weighted_updates DKM's and hard k-means'
  // centroid updates go on weighing by it at every step (dkm(), lloyd_update()).
  Clustering(const Llama& model, const std::vector<std::pair<std::string, DKMConfig>>& plan,
             TrainMethod method = TrainMethod::kDKM, const std::map<std::string, at::Tensor>* importance = nullptr,
             bool weighted_updates = false);

  TrainMethod method() const { return method_; }
  bool weighted_updates() const;
  // Tensors the optimizer trains besides the model's weights (QAT's scales and zero points).
  std::vector<at::Tensor> trainable() const;

  const std::vector<ClusteredWeight>& weights() const { return weights_; }
  std::vector<ClusteredWeight>& weights() { return weights_; }
  bool contains(const std::string& name) const;

  // Soft-clustered weights w~ = DKM(w) (the hard-assigned or fake-quantized weights of the
  // baselines, with straight-through gradients) for the forward passes of one training step or
  // one evaluation, made layer by layer (StepWeights). With advance, each palette becomes DKM's
  // updated palette, or the Lloyd step's (once per optimizer step); evaluation passes false.
  // `dtype` (Undefined: the weights' own) is the soft projections' dtype (not the embedding
  // table's, which a lookup reads in the weights' precision): under bf16 autocast the forward
  // reads them only as bf16. The StepWeights refers to this Clustering and to the model's
  // weights, which must not change before its backward(); made with grad mode off (for
  // evaluation), DKM's dense methods keep no graph and it has no backward().
  StepWeights step(const Llama& model, bool advance, at::ScalarType dtype = at::ScalarType::Undefined);
  // Hard assignment of every clustered weight, against its palette rounded to fp16 (the
  // precision palettes are stored in).
  std::vector<std::pair<std::string, Palettized>> palettize(const Llama& model) const;
  // The hard-assigned weights as overrides (for evaluating the exported model).
  WeightOverrides hard(const Llama& model) const;

 private:
  std::vector<ClusteredWeight> weights_;
  TrainMethod method_ = TrainMethod::kDKM;
};

}  // namespace edkm
