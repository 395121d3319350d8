#include "train/clustering.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <regex>

#include "common/error.h"

namespace edkm {
namespace {

bool is_projection(const std::string& name) {
  static const std::regex re(R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight)");
  return std::regex_match(name, re);
}

bool is_embedding(const std::string& name) { return name == tensor_name::kEmbed || name == tensor_name::kLmHead; }

}  // namespace

void ClusteringPlan::apply_json(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw_input("{}: the compression config must be a JSON object", source);
  nlohmann::json dkm = nlohmann::json::object();
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k == "include_embeddings") {
      if (!it->is_boolean()) throw_input("{}: include_embeddings must be true or false", source);
      include_embeddings = it->get<bool>();
    } else if (k == "min_weights") {
      if (!it->is_number_integer() || it->get<int64_t>() < 0) throw_input("{}: min_weights must be a non-negative integer", source);
      min_weights = it->get<int64_t>();
    } else if (k == "rules") {
      if (!it->is_array()) throw_input("{}: rules must be an array", source);
      for (size_t i = 0; i < it->size(); ++i) {
        const auto& r = (*it)[i];
        if (!r.is_object() || !r.contains("pattern") || !r["pattern"].is_string())
          throw_input("{}: rule {} needs a \"pattern\" string", source, i + 1);
        ClusterRule rule;
        rule.pattern = r["pattern"].get<std::string>();
        try {
          std::regex test(rule.pattern);
        } catch (const std::regex_error& e) {
          throw_input("{}: rule {}: invalid regex '{}': {}", source, i + 1, rule.pattern, e.what());
        }
        rule.overrides = nlohmann::json::object();
        for (auto f = r.begin(); f != r.end(); ++f) {
          if (f.key() == "pattern") continue;
          if (f.key() == "skip") rule.skip = f->get<bool>();
          else rule.overrides[f.key()] = *f;
        }
        DKMConfig check = defaults;
        apply_dkm_json(check, rule.overrides, fmt::format("{} (rule {})", source, i + 1));
        rules.push_back(std::move(rule));
      }
    } else {
      dkm[k] = *it;
    }
  }
  apply_dkm_json(defaults, dkm, source);
}

std::vector<std::pair<std::string, DKMConfig>> ClusteringPlan::resolve(const Llama& model) const {
  std::vector<std::pair<std::string, DKMConfig>> out;
  for (const auto& name : model.projection_names()) {
    const at::Tensor& w = model.weight(name);
    bool selected = is_projection(name) || (include_embeddings && is_embedding(name));
    DKMConfig cfg = defaults;
    for (const auto& rule : rules) {
      if (!std::regex_match(name, std::regex(rule.pattern))) continue;
      selected = !rule.skip;
      if (selected) apply_dkm_json(cfg, rule.overrides, "rule " + rule.pattern);
      break;
    }
    if (!selected || w.numel() <= min_weights) continue;
    out.emplace_back(name, cfg);
  }
  if (out.empty())
    throw_input("the compression config selects no weights of this model (rules: {}, min_weights {})",
                rules.size(), min_weights);
  return out;
}

std::string to_string(TrainMethod m) {
  switch (m) {
    case TrainMethod::kDKM: return "dkm";
    case TrainMethod::kHardKMeans: return "hard-kmeans";
    case TrainMethod::kQAT: return "qat";
  }
  return "?";
}

TrainMethod parse_train_method(const std::string& s) {
  for (TrainMethod m : {TrainMethod::kDKM, TrainMethod::kHardKMeans, TrainMethod::kQAT})
    if (s == to_string(m)) return m;
  throw_invalid("unknown training method '{}' (expected dkm, hard-kmeans or qat)", s);
}

Clustering::Clustering(const Llama& model, const std::vector<std::pair<std::string, DKMConfig>>& plan,
                       TrainMethod method, const std::map<std::string, at::Tensor>* importance,
                       bool weighted_updates)
    : method_(method) {
  if (weighted_updates && (!importance || method == TrainMethod::kQAT))
    throw_invalid("weighted centroid updates need an importance and a palette method (dkm or hard-kmeans)");
  at::NoGradGuard no_grad;
  for (const auto& [name, cfg] : plan) {
    const at::Tensor& w = model.weight(name);
    ClusteredWeight cw{name, cfg, {}, {}, {}, {}};
    try {
      if (method == TrainMethod::kQAT) {
        if (cfg.cluster_dim != 1) throw_invalid("QAT quantizes scalars (cluster_dim 1), got cluster_dim {}", cfg.cluster_dim);
        cw.cfg.group_size = 1;
        cw.cfg.per_row_scale = false;
        cw.cfg.cluster_dtype = ClusterDType::kFloat32;
        cw.grid = init_learned_grid(w.reshape({w.size(0), -1}), cfg.bits);
        cw.palette = grid_palette(cw.grid, cfg.bits);
        weights_.push_back(std::move(cw));
        continue;
      }
      if (cfg.per_row_scale) cw.scale = row_scales(w);
      Importance f;
      if (importance) {
        auto it = importance->find(name);
        if (it == importance->end()) throw_invalid("no importance for {}", name);
        f = Importance(it->second, w, cfg);
      }
      cw.palette = init_palette(w, cfg, cw.scale, {}, f);
      if (weighted_updates) cw.importance = std::move(f);
    } catch (const std::invalid_argument& e) {
      throw_input("{}: {}", name, e.what());
    }
    weights_.push_back(std::move(cw));
  }
}

bool Clustering::weighted_updates() const {
  return std::any_of(weights_.begin(), weights_.end(), [](const ClusteredWeight& w) { return w.importance.defined(); });
}

bool Clustering::contains(const std::string& name) const {
  for (const auto& w : weights_)
    if (w.name == name) return true;
  return false;
}

std::vector<at::Tensor> Clustering::trainable() const {
  std::vector<at::Tensor> out;
  for (const auto& cw : weights_)
    if (cw.grid.scale.defined()) out.insert(out.end(), {cw.grid.scale, cw.grid.zero});
  return out;
}

namespace {

// QAT's weight: w fake-quantized on its learned grid.
at::Tensor fake_quantized(const ClusteredWeight& cw, const at::Tensor& w) {
  return fake_quantize(w.reshape({w.size(0), -1}), cw.grid, cw.cfg.bits).view(w.sizes());
}

// The embedding table is read by a lookup, which autocast leaves in the weights' precision.
bool cast_to(at::ScalarType dtype, const std::string& name) {
  return dtype != at::ScalarType::Undefined && name != tensor_name::kEmbed;
}

// y, made without a graph, as the output of a node that passes its gradient to w unchanged
// (in w's dtype): where the step's soft weights enter its graph.
struct ToWeight : torch::autograd::Function<ToWeight> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& w, const at::Tensor& y) {
    ctx->saved_data["dtype"] = static_cast<int64_t>(w.scalar_type());
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grads[0].to(dtype), at::Tensor()};
  }
};

}  // namespace

StepWeights Clustering::step(const Llama& model, bool advance, at::ScalarType dtype) {
  StepWeights s;
  s.method_ = method_;
  s.dtype_ = dtype;
  for (auto& cw : weights_) {
    const at::Tensor& w = model.weight(cw.name);
    StepWeights::Entry e{&cw, std::nullopt, std::nullopt};
    if (method_ == TrainMethod::kDKM) {
      e.dkm.emplace(w, cw.palette, cw.cfg, cw.scale, cw.importance);
      if (advance) cw.palette = e.dkm->palette();
    } else if (method_ == TrainMethod::kHardKMeans) {
      e.hard.emplace(w, cw.palette, cw.cfg, cw.scale, cw.importance, advance);
      cw.palette = e.hard->palette();
    }
    s.entries_[cw.name] = std::move(e);
  }
  return s;
}

at::Tensor StepWeights::made(const Entry& e, const at::Tensor& w) const {
  at::NoGradGuard no_grad;
  at::Tensor y = e.dkm ? e.dkm->weight() : e.hard ? e.hard->weight() : fake_quantized(*e.cw, w.detach());
  return cast_to(dtype_, e.cw->name) ? y.to(dtype_) : y;
}

at::Tensor StepWeights::weight(const std::string& name, const at::Tensor& w) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw_invalid("StepWeights: '{}' is not a clustered weight", name);
  return ToWeight::apply(w, made(it->second, w));
}

void StepWeights::backward(Llama& model) const {
  // Hard k-means passes the gradient straight through: .grad already holds dL/dw.
  if (method_ == TrainMethod::kHardKMeans) return;
  for (const auto& [name, e] : entries_) {
    at::Tensor& w = model.weights().at(name);
    const at::Tensor g = w.grad();
    if (!g.defined()) continue;  // the step did not use it
    w.mutable_grad() = at::Tensor();
    if (e.dkm) {
      w.mutable_grad() = e.dkm->backward(g);
    } else {
      // QAT: fake_quantize()'s backward on the summed gradient, without running its forward again.
      const FakeQuantizeGrad q = fake_quantize_backward(w, e.cw->grid, e.cw->cfg.bits, g);
      w.mutable_grad() = q.weight;
      for (auto [leaf, grad] : {std::pair{e.cw->grid.scale, q.scale}, std::pair{e.cw->grid.zero, q.zero}})
        leaf.mutable_grad() = leaf.grad().defined() ? leaf.grad() + grad : grad;
    }
  }
}

std::vector<std::pair<std::string, Palettized>> Clustering::palettize(const Llama& model) const {
  std::vector<std::pair<std::string, Palettized>> out;
  // The export stores palettes in fp16: assign against the rounded palette, so that the
  // hard-assigned weights are exactly what the file reproduces.
  for (const auto& cw : weights_) {
    const at::Tensor palette = cw.grid.scale.defined() ? grid_palette(cw.grid, cw.cfg.bits) : cw.palette;
    at::Tensor c16 = palette.to(at::kHalf).to(palette.scalar_type());
    out.emplace_back(cw.name, edkm::palettize(model.weight(cw.name), c16, cw.cfg, cw.scale));
  }
  return out;
}

WeightOverrides Clustering::hard(const Llama& model) const {
  WeightOverrides out;
  for (const auto& [name, p] : palettize(model)) out[name] = depalettize(p, model.weight(name).scalar_type());
  return out;
}

}  // namespace edkm
