// Validation of a compressed file's structure from its safetensors header (format.h). Kept
// free of ATen tensors so that the fuzz target (fuzz/) builds it quickly with clang.
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <set>

#include "common/error.h"
#include "format/format.h"
#include "model/io/safetensors.h"

namespace edkm {

CompressedLayout parse_layout(const safetensors::Header& header, const std::string& path) {
  const auto& meta = header.metadata;
  auto get = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    if (it == meta.end()) throw_input("{}: not an edkm compressed model (no '{}' in the metadata)", path, key);
    return it->second;
  };
  if (get("format") != kFormatName) throw_input("{}: format '{}' is not {}", path, get("format"), kFormatName);
  if (get("format_version") != std::to_string(kFormatVersion))
    throw_input("{}: format version {} is not supported (this edkm reads version {})", path, get("format_version"),
                kFormatVersion);
  CompressedLayout m;
  nlohmann::json clustered;
  try {
    m.config = LlamaConfig::from_hf(nlohmann::json::parse(get("config")), path + " (config)");
    clustered = nlohmann::json::parse(get("clustered"));
  } catch (const nlohmann::json::exception& e) {
    throw_input("{}: invalid JSON in the metadata: {}", path, e.what());
  }
  if (!clustered.is_object()) throw_input("{}: 'clustered' metadata is not an object", path);
  for (const auto& [k, v] : meta)
    if (k != "format" && k != "format_version" && k != "config" && k != "clustered" && k != "tokenizer" &&
        k != "tokenizer_eos" && k != safetensors::kChecksumKey)
      m.metadata[k] = v;

  std::map<std::string, const safetensors::TensorInfo*> infos;
  for (const auto& t : header.tensors) infos[t.name] = &t;
  std::set<std::string> used;
  auto check = [&](const std::string& name, const char* dtype, const std::vector<int64_t>& shape) {
    auto it = infos.find(name);
    if (it == infos.end()) throw_input("{}: missing tensor '{}'", path, name);
    const safetensors::TensorInfo& t = *it->second;
    if (dtype && t.dtype != dtype) {
      const char* names[][2] = {{"U8", "Byte"}, {"F16", "Half"}, {"F32", "Float"}, {"BF16", "BFloat16"}, {"F64", "Double"}};
      std::string got = t.dtype, want = dtype;
      for (auto& n : names) {
        if (got == n[0]) got = n[1];
        if (want == n[0]) want = n[1];
      }
      throw_input("{}: tensor '{}' is {}, expected {}", path, name, got, want);
    }
    if (t.shape != shape)
      throw_input("{}: tensor '{}' has shape [{}], expected [{}]", path, name, fmt::join(t.shape, ", "),
                  fmt::join(shape, ", "));
    used.insert(name);
  };
  const int64_t limit = int64_t(1) << 40;
  for (const auto& [name, shape] : tensor_shapes(m.config)) {
    for (int64_t d : shape)
      if (d > limit) throw_input("{}: the config's shapes are implausibly large", path);
    if (!clustered.contains(name)) {
      auto it = infos.find(name);
      if (it == infos.end()) throw_input("{}: missing tensor '{}'", path, name);
      const std::string& dt = it->second->dtype;
      if (dt != "F32" && dt != "F16" && dt != "BF16" && dt != "F64")
        throw_input("{}: tensor '{}' is not floating-point ({})", path, name, dt);
      check(name, nullptr, shape);
      m.dense.push_back(name);
      continue;
    }
    const auto& c = clustered[name];
    PackedLayout w;
    try {
      w.shape = c.at("shape").get<std::vector<int64_t>>();
      w.bits = c.at("bits").get<int>();
      w.cluster_dim = c.at("cluster_dim").get<int>();
      w.group_size = c.at("group_size").get<int64_t>();
      w.scaled = c.at("per_row_scale").get<bool>();
      w.settings = c.value("settings", nlohmann::json());
    } catch (const nlohmann::json::exception& e) {
      throw_input("{}: bad 'clustered' entry for '{}': {}", path, name, e.what());
    }
    if (w.shape != shape)
      throw_input("{}: '{}' is recorded with shape {}, the config implies {}", path, name, nlohmann::json(w.shape).dump(),
                  nlohmann::json(shape).dump());
    const int64_t rows = shape[0], cols = shape.size() > 1 ? shape[1] : 1;
    if (w.bits < 1 || w.bits > 8) throw_input("{}: '{}' has {} bits (1..8 supported)", path, name, w.bits);
    if (w.cluster_dim < 1 || cols % w.cluster_dim != 0)
      throw_input("{}: '{}': cluster_dim {} does not divide {} columns", path, name, w.cluster_dim, cols);
    if (w.group_size < 0 || (w.group_size > 0 && rows % w.group_size != 0))
      throw_input("{}: '{}': group_size {} does not divide {} rows", path, name, w.group_size, rows);
    const int64_t groups = w.group_size > 0 ? rows / w.group_size : 1;
    check(name + ".indices", "U8", {(rows * cols / w.cluster_dim * w.bits + 7) / 8});
    check(name + ".palette", "F16", {groups, int64_t(1) << w.bits, w.cluster_dim});
    if (w.scaled) check(name + ".scale", "F32", {rows});
    m.packed[name] = std::move(w);
  }
  for (auto it = clustered.begin(); it != clustered.end(); ++it)
    if (!m.packed.count(it.key())) throw_input("{}: clustered entry '{}' is not a tensor of this model", path, it.key());
  if (infos.count("__tokenizer__")) {
    if (infos["__tokenizer__"]->dtype != "U8" || infos["__tokenizer__"]->shape.size() != 1)
      throw_input("{}: __tokenizer__ must be a U8 vector", path);
    used.insert("__tokenizer__");
    m.has_tokenizer = true;
    m.tokenizer_name = meta.count("tokenizer") ? meta.at("tokenizer") : "tokenizer";
    m.tokenizer_eos = meta.count("tokenizer_eos") ? meta.at("tokenizer_eos") : "";
  }
  for (const auto& t : header.tensors)
    if (!used.count(t.name)) throw_input("{}: unexpected tensor '{}'", path, t.name);
  return m;
}

}  // namespace edkm
