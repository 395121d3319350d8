#include "export/format.h"

#include <ATen/ATen.h>

#include <cstring>
#include <set>

#include "common/error.h"
#include "model/io/safetensors.h"

namespace edkm {

at::Tensor pack_bits(const at::Tensor& indices, int bits) {
  if (bits < 1 || bits > 8) throw_invalid("pack_bits: bits must be in 1..8, got {}", bits);
  at::Tensor idx = indices.to(at::kCPU, at::kByte).contiguous().view({-1});
  const int64_t n = idx.numel();
  at::Tensor out = at::zeros({(n * bits + 7) / 8}, at::kByte);
  const uint8_t* in = idx.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const unsigned limit = 1u << bits;
  uint64_t acc = 0;
  int have = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (in[i] >= limit) throw_invalid("pack_bits: index {} does not fit in {} bits", int(in[i]), bits);
    acc |= uint64_t(in[i]) << have;
    have += bits;
    while (have >= 8) {
      *o++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      have -= 8;
    }
  }
  if (have > 0) *o = static_cast<uint8_t>(acc);
  return out;
}

at::Tensor unpack_bits(const at::Tensor& packed, int bits, int64_t count) {
  if (bits < 1 || bits > 8) throw_invalid("unpack_bits: bits must be in 1..8, got {}", bits);
  at::Tensor p = packed.to(at::kCPU, at::kByte).contiguous();
  if (p.numel() != (count * bits + 7) / 8)
    throw_invalid("unpack_bits: {} bytes cannot hold exactly {} indices of {} bits", p.numel(), count, bits);
  at::Tensor out = at::empty({count}, at::kByte);
  const uint8_t* in = p.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint64_t mask = (1u << bits) - 1;
  uint64_t acc = 0;
  int have = 0;
  for (int64_t i = 0; i < count; ++i) {
    while (have < bits) {
      acc |= uint64_t(*in++) << have;
      have += 8;
    }
    o[i] = static_cast<uint8_t>(acc & mask);
    acc >>= bits;
    have -= bits;
  }
  return out;
}

int64_t PackedWeight::cols() const {
  int64_t n = 1;
  for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
  return n;
}

int64_t PackedWeight::bytes() const {
  auto b = [](const at::Tensor& t) { return t.defined() ? t.numel() * t.element_size() : 0; };
  return b(indices) + b(palette) + b(scale);
}

at::Tensor PackedWeight::unpacked() const {
  return unpack_bits(indices, bits, count()).view({rows(), cols() / cluster_dim});
}

at::Tensor PackedWeight::dense(at::ScalarType dtype) const {
  Palettized p;
  p.indices = unpacked();
  p.palette = palette.to(at::kFloat);
  p.scale = scale;
  p.shape = shape;
  p.bits = bits;
  p.cluster_dim = cluster_dim;
  p.group_size = group_size;
  return depalettize(p, dtype);
}

PackedWeight PackedWeight::from(const Palettized& p, nlohmann::json settings) {
  PackedWeight w;
  w.shape = p.shape;
  w.bits = p.bits;
  w.cluster_dim = p.cluster_dim;
  w.group_size = p.group_size;
  w.indices = pack_bits(p.indices, p.bits);
  w.palette = p.palette.to(at::kCPU, at::kHalf).contiguous();
  if (p.scale.defined()) w.scale = p.scale.to(at::kCPU, at::kFloat).contiguous();
  w.settings = std::move(settings);
  return w;
}

Llama CompressedModel::to_llama(at::ScalarType dtype) const {
  std::map<std::string, at::Tensor> w;
  for (const auto& [name, t] : dense) w[name] = t.to(dtype);
  for (const auto& [name, p] : packed) w[name] = p.dense(dtype);
  return Llama(config, std::move(w), "compressed model");
}

std::unique_ptr<Tokenizer> CompressedModel::tokenizer() const {
  if (tokenizer_data.empty()) return nullptr;
  return tokenizer_from_bytes(tokenizer_data, tokenizer_name, static_cast<int>(config.vocab_size));
}

CompressedModel make_compressed(const Llama& model, const std::vector<std::pair<std::string, Palettized>>& packed,
                                const std::vector<nlohmann::json>& settings, const Tokenizer* tokenizer,
                                at::ScalarType dense_dtype) {
  CompressedModel m;
  m.config = model.config();
  for (size_t i = 0; i < packed.size(); ++i)
    m.packed[packed[i].first] = PackedWeight::from(packed[i].second, i < settings.size() ? settings[i] : nlohmann::json());
  for (const auto& [name, t] : model.weights()) {
    if (m.packed.count(name)) continue;
    at::Tensor d = t.detach().to(at::kCPU);
    m.dense[name] = dense_dtype == at::ScalarType::Undefined ? d : d.to(dense_dtype);
  }
  if (tokenizer) {
    m.tokenizer_name = tokenizer->file_name();
    m.tokenizer_data = tokenizer->data();
  }
  return m;
}

void write_compressed(const std::string& path, const CompressedModel& m) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  nlohmann::json clustered = nlohmann::json::object();
  for (const auto& [name, shape] : tensor_shapes(m.config)) {
    auto p = m.packed.find(name);
    if (p == m.packed.end()) {
      auto d = m.dense.find(name);
      if (d == m.dense.end()) throw_invalid("compressed model lacks tensor '{}'", name);
      tensors.emplace_back(name, d->second);
      continue;
    }
    const PackedWeight& w = p->second;
    tensors.emplace_back(name + ".indices", w.indices);
    tensors.emplace_back(name + ".palette", w.palette);
    if (w.scale.defined()) tensors.emplace_back(name + ".scale", w.scale);
    clustered[name] = {{"shape", w.shape}, {"bits", w.bits}, {"cluster_dim", w.cluster_dim},
                       {"group_size", w.group_size}, {"per_row_scale", w.scale.defined()}, {"settings", w.settings}};
  }
  std::map<std::string, std::string> meta = m.metadata;
  meta["format"] = kFormatName;
  meta["format_version"] = std::to_string(kFormatVersion);
  meta["config"] = m.config.to_hf().dump();
  meta["clustered"] = clustered.dump();
  if (!m.tokenizer_data.empty()) {
    meta["tokenizer"] = m.tokenizer_name;
    at::Tensor tok = at::empty({static_cast<int64_t>(m.tokenizer_data.size())}, at::kByte);
    std::memcpy(tok.data_ptr(), m.tokenizer_data.data(), m.tokenizer_data.size());
    tensors.emplace_back("__tokenizer__", tok);
  }
  safetensors::write(path, tensors, meta);
}

bool is_compressed_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  std::string head(1 << 16, '\0');
  head.resize(std::fread(head.data(), 1, head.size(), f));
  std::fclose(f);
  return head.size() >= 8 && head[8] == '{' && head.find(std::string("\"format\":\"") + kFormatName + "\"") != std::string::npos;
}

CompressedModel read_compressed(const std::string& path) {
  safetensors::File f(path);
  const auto& meta = f.header().metadata;
  auto get = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    if (it == meta.end()) throw_input("{}: not an edkm compressed model (no '{}' in the metadata)", path, key);
    return it->second;
  };
  if (get("format") != kFormatName) throw_input("{}: format '{}' is not {}", path, get("format"), kFormatName);
  if (get("format_version") != std::to_string(kFormatVersion))
    throw_input("{}: format version {} is not supported (this edkm reads version {})", path, get("format_version"), kFormatVersion);
  CompressedModel m;
  nlohmann::json clustered;
  try {
    m.config = LlamaConfig::from_hf(nlohmann::json::parse(get("config")), path + " (config)");
    clustered = nlohmann::json::parse(get("clustered"));
  } catch (const nlohmann::json::exception& e) {
    throw_input("{}: invalid JSON in the metadata: {}", path, e.what());
  }
  if (!clustered.is_object()) throw_input("{}: 'clustered' metadata is not an object", path);
  for (const auto& [k, v] : meta)
    if (k != "format" && k != "format_version" && k != "config" && k != "clustered" && k != "tokenizer") m.metadata[k] = v;

  std::set<std::string> used;
  auto tensor = [&](const std::string& name, at::ScalarType dtype, const std::vector<int64_t>& shape) {
    if (!f.contains(name)) throw_input("{}: missing tensor '{}'", path, name);
    at::Tensor t = f.tensor(name);
    if (t.scalar_type() != dtype)
      throw_input("{}: tensor '{}' is {}, expected {}", path, name, c10::toString(t.scalar_type()), c10::toString(dtype));
    if (t.sizes() != at::IntArrayRef(shape))
      throw_input("{}: tensor '{}' has shape {}, expected {}", path, name, c10::str(t.sizes()), c10::str(at::IntArrayRef(shape)));
    used.insert(name);
    return t;
  };
  for (const auto& [name, shape] : tensor_shapes(m.config)) {
    if (!clustered.contains(name)) {
      if (!f.contains(name)) throw_input("{}: missing tensor '{}'", path, name);
      at::Tensor t = f.tensor(name);
      if (!at::isFloatingType(t.scalar_type())) throw_input("{}: tensor '{}' is not floating-point", path, name);
      m.dense[name] = tensor(name, t.scalar_type(), shape);
      continue;
    }
    const auto& c = clustered[name];
    PackedWeight w;
    try {
      w.shape = c.at("shape").get<std::vector<int64_t>>();
      w.bits = c.at("bits").get<int>();
      w.cluster_dim = c.at("cluster_dim").get<int>();
      w.group_size = c.at("group_size").get<int64_t>();
      w.settings = c.value("settings", nlohmann::json());
      const bool scaled = c.at("per_row_scale").get<bool>();
      if (w.shape != shape)
        throw_input("{}: '{}' is recorded with shape {}, the config implies {}", path, name, nlohmann::json(w.shape).dump(),
                    nlohmann::json(shape).dump());
      if (w.bits < 1 || w.bits > 8) throw_input("{}: '{}' has {} bits (1..8 supported)", path, name, w.bits);
      if (w.cluster_dim < 1 || w.cols() % w.cluster_dim != 0)
        throw_input("{}: '{}': cluster_dim {} does not divide {} columns", path, name, w.cluster_dim, w.cols());
      if (w.group_size < 0 || (w.group_size > 0 && w.rows() % w.group_size != 0))
        throw_input("{}: '{}': group_size {} does not divide {} rows", path, name, w.group_size, w.rows());
      const int64_t groups = w.group_size > 0 ? w.rows() / w.group_size : 1;
      w.indices = tensor(name + ".indices", at::kByte, {(w.count() * w.bits + 7) / 8});
      w.palette = tensor(name + ".palette", at::kHalf, {groups, int64_t(1) << w.bits, w.cluster_dim});
      if (scaled) w.scale = tensor(name + ".scale", at::kFloat, {w.rows()});
    } catch (const nlohmann::json::exception& e) {
      throw_input("{}: bad 'clustered' entry for '{}': {}", path, name, e.what());
    }
    const int tail = static_cast<int>(w.count() * w.bits % 8);
    if (tail && (w.indices[-1].item<uint8_t>() >> tail) != 0)
      throw_input("{}: '{}': nonzero padding bits after the last index", path, name);
    if (!at::isfinite(w.palette).all().item<bool>()) throw_input("{}: '{}': palette holds NaN or Inf", path, name);
    if (w.scale.defined() && !(w.scale > 0).all().item<bool>()) throw_input("{}: '{}': scales must be positive", path, name);
    m.packed[name] = std::move(w);
  }
  for (auto it = clustered.begin(); it != clustered.end(); ++it)
    if (!m.packed.count(it.key())) throw_input("{}: clustered entry '{}' is not a tensor of this model", path, it.key());
  if (f.contains("__tokenizer__")) {
    at::Tensor t = f.tensor("__tokenizer__");
    used.insert("__tokenizer__");
    m.tokenizer_name = meta.count("tokenizer") ? meta.at("tokenizer") : "tokenizer";
    m.tokenizer_data.assign(static_cast<const char*>(t.data_ptr()), t.numel());
  }
  for (const auto& n : f.names())
    if (!used.count(n)) throw_input("{}: unexpected tensor '{}'", path, n);
  return m;
}

}  // namespace edkm
