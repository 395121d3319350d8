#include "format/format.h"

#include <ATen/ATen.h>

#include <cstring>
#include <fstream>

#include "common/error.h"
#include "common/finite.h"
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
  return tokenizer_from_bytes(tokenizer_data, tokenizer_name, static_cast<int>(config.vocab_size), tokenizer_eos);
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
    m.tokenizer_eos = tokenizer->eos_token();
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
    if (!m.tokenizer_eos.empty()) meta["tokenizer_eos"] = m.tokenizer_eos;
    at::Tensor tok = at::empty({static_cast<int64_t>(m.tokenizer_data.size())}, at::kByte);
    std::memcpy(tok.data_ptr(), m.tokenizer_data.data(), m.tokenizer_data.size());
    tensors.emplace_back("__tokenizer__", tok);
  }
  safetensors::write(path, tensors, meta);
}

bool is_compressed_file(const std::string& path) {
  // The whole safetensors header: its metadata keys are sorted, and "clustered", which precedes
  // "format", holds an entry per weight (over 64 KB for a 30-layer model).
  std::ifstream f(path, std::ios::binary);
  unsigned char len[8] = {};
  if (!f.read(reinterpret_cast<char*>(len), 8)) return false;
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  if (n < 2 || n > (uint64_t(100) << 20)) return false;
  std::string header(n, '\0');
  if (!f.read(header.data(), static_cast<std::streamsize>(n)) || header[0] != '{') return false;
  return header.find(std::string("\"format\":\"") + kFormatName + "\"") != std::string::npos;
}

CompressedModel read_compressed(const std::string& path) {
  safetensors::File f(path);
  CompressedLayout layout = parse_layout(f.header(), path);
  CompressedModel m;
  m.config = layout.config;
  m.metadata = layout.metadata;
  for (const auto& name : layout.dense) {
    m.dense[name] = f.tensor(name);
    check_finite(m.dense[name], fmt::format("{}: tensor '{}'", path, name));
  }
  for (const auto& [name, l] : layout.packed) {
    PackedWeight w;
    w.shape = l.shape;
    w.bits = l.bits;
    w.cluster_dim = l.cluster_dim;
    w.group_size = l.group_size;
    w.settings = l.settings;
    w.indices = f.tensor(name + ".indices");
    w.palette = f.tensor(name + ".palette");
    if (l.scaled) w.scale = f.tensor(name + ".scale");
    const int tail = static_cast<int>(w.count() * w.bits % 8);
    if (tail && (w.indices[-1].item<uint8_t>() >> tail) != 0)
      throw_input("{}: '{}': nonzero padding bits after the last index", path, name);
    check_finite(w.palette, fmt::format("{}: palette of '{}'", path, name));
    if (w.scale.defined()) check_finite(w.scale, fmt::format("{}: scales of '{}'", path, name));
    if (w.scale.defined() && !(w.scale > 0).all().item<bool>()) throw_input("{}: '{}': scales must be positive", path, name);
    m.packed[name] = std::move(w);
  }
  if (layout.has_tokenizer) {
    at::Tensor t = f.tensor("__tokenizer__");
    m.tokenizer_name = layout.tokenizer_name;
    m.tokenizer_eos = layout.tokenizer_eos;
    m.tokenizer_data.assign(static_cast<const char*>(t.data_ptr()), t.numel());
  }
  return m;
}

}  // namespace edkm
