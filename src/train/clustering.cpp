#include "train/clustering.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

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

bool is_embedding(const std::string& name) { return name == "model.embed_tokens.weight" || name == "lm_head.weight"; }

}  // namespace

void apply_dkm_json(DKMConfig& c, const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw_input("{}: DKM settings must be a JSON object", source);
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const auto& v = it.value();
    // nlohmann's get<int>() truncates 3.7 to 3: integer settings must be written as integers.
    auto integer = [&]() -> int64_t {
      if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT32_MAX) ||
          std::llabs(v.get<int64_t>()) > INT32_MAX)
        throw_input("{}: setting '{}' must be an integer of at most 2^31 - 1, got {}", source, k, v.dump());
      return v.get<int64_t>();
    };
    try {
      if (k == "bits") c.bits = static_cast<int>(integer());
      else if (k == "cluster_dim") c.cluster_dim = static_cast<int>(integer());
      else if (k == "tau") c.tau = v.get<double>();
      else if (k == "max_iters") c.max_iters = static_cast<int>(integer());
      else if (k == "eps") c.eps = v.get<double>();
      else if (k == "group_size") c.group_size = integer();
      else if (k == "per_row_scale") c.per_row_scale = v.get<bool>();
      else if (k == "cluster_dtype") c.cluster_dtype = parse_cluster_dtype(v.get<std::string>());
      else if (k == "init") c.init = parse_palette_init(v.get<std::string>());
      else if (k == "seed") {
        if (!v.is_number_unsigned()) throw_input("{}: setting 'seed' must be a non-negative integer, got {}", source, v.dump());
        c.seed = v.get<uint64_t>();
      }
      else if (k == "method") c.method = parse_dkm_method(v.get<std::string>());
      else if (k == "zero_threshold") c.zero_threshold = v.get<double>();
      else if (k == "prune_threshold") c.prune_threshold = v.get<double>();
      else if (k == "kmeans_max_iters") c.kmeans_max_iters = static_cast<int>(integer());
      else if (k == "marshal") c.marshal = v.get<bool>();
      else if (k == "uniquify") c.uniquify = v.get<bool>();
      else if (k == "shard") c.shard = v.get<bool>();
      else throw_input("{}: unknown DKM setting '{}'", source, k);
    } catch (const nlohmann::json::exception& e) {
      throw_input("{}: setting '{}' has the wrong type: {}", source, k, e.what());
    } catch (const std::invalid_argument& e) {
      throw_input("{}: {}", source, e.what());
    }
  }
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    throw_input("{}: {}", source, e.what());
  }
}

nlohmann::json dkm_to_json(const DKMConfig& c) {
  return {{"bits", c.bits},
          {"cluster_dim", c.cluster_dim},
          {"tau", c.tau},
          {"max_iters", c.max_iters},
          {"eps", c.eps},
          {"group_size", c.group_size},
          {"per_row_scale", c.per_row_scale},
          {"cluster_dtype", to_string(c.cluster_dtype)},
          {"init", to_string(c.init)},
          {"seed", c.seed},
          {"method", to_string(c.method)},
          {"zero_threshold", c.zero_threshold},
          {"prune_threshold", c.prune_threshold},
          {"kmeans_max_iters", c.kmeans_max_iters},
          {"marshal", c.marshal},
          {"uniquify", c.uniquify},
          {"shard", c.shard}};
}

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

Clustering::Clustering(const Llama& model, const std::vector<std::pair<std::string, DKMConfig>>& plan) {
  at::NoGradGuard no_grad;
  for (const auto& [name, cfg] : plan) {
    const at::Tensor& w = model.weight(name);
    ClusteredWeight cw{name, cfg, {}, {}};
    try {
      if (cfg.per_row_scale) cw.scale = row_scales(w);
      cw.palette = init_palette(w, cfg, cw.scale);
    } catch (const std::invalid_argument& e) {
      throw_input("{}: {}", name, e.what());
    }
    weights_.push_back(std::move(cw));
  }
}

bool Clustering::contains(const std::string& name) const {
  for (const auto& w : weights_)
    if (w.name == name) return true;
  return false;
}

WeightOverrides Clustering::soft(const Llama& model, bool advance) {
  WeightOverrides out;
  for (auto& cw : weights_) {
    DKMResult r = dkm(model.weight(cw.name), cw.palette, cw.cfg, cw.scale);
    out[cw.name] = r.weight;
    if (advance) cw.palette = r.palette;
  }
  return out;
}

std::vector<std::pair<std::string, Palettized>> Clustering::palettize(const Llama& model) const {
  std::vector<std::pair<std::string, Palettized>> out;
  // The export stores palettes in fp16: assign against the rounded palette, so that the
  // hard-assigned weights are exactly what the file reproduces.
  for (const auto& cw : weights_) {
    at::Tensor c16 = cw.palette.to(at::kHalf).to(cw.palette.scalar_type());
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
