#include "format/size.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <regex>

#include "common/error.h"

namespace edkm {

int64_t TensorSize::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t SizeReport::bytes() const {
  int64_t b = 0;
  for (const auto& t : tensors) b += t.bytes;
  return b;
}
int64_t SizeReport::bf16_bytes() const {
  int64_t b = 0;
  for (const auto& t : tensors) b += t.bf16_bytes();
  return b;
}
int64_t SizeReport::clustered_weights() const {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.bits ? t.numel() : 0;
  return n;
}
double SizeReport::bits_per_weight() const {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return 8.0 * bytes() / n;
}
double SizeReport::clustered_bits_per_weight() const {
  int64_t b = 0, n = 0;
  for (const auto& t : tensors)
    if (t.bits) b += t.bytes, n += t.numel();
  return n ? 8.0 * b / n : 0;
}

int64_t palettized_bytes(int64_t rows, int64_t cols, int bits, int d, int64_t g, bool scaled) {
  const int64_t n = rows * cols / d;
  const int64_t groups = g > 0 ? rows / g : 1;
  return (n * bits + 7) / 8 + groups * (int64_t(1) << bits) * d * 2 + (scaled ? 4 * rows : 0);
}

namespace {

std::string human(int64_t b) {
  if (b >= int64_t(1) << 30) return fmt::format("{:.2f} GiB", b / double(int64_t(1) << 30));
  if (b >= 1 << 20) return fmt::format("{:.2f} MiB", b / double(1 << 20));
  if (b >= 1 << 10) return fmt::format("{:.1f} KiB", b / 1024.0);
  return fmt::format("{} B", b);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "x" : "") + std::to_string(s[i]);
  return out;
}

}  // namespace

std::string SizeReport::table(bool per_tensor) const {
  std::string s;
  if (per_tensor) {
    s += fmt::format("{:<48} {:>12} {:>10} {:>12} {:>12} {:>8}\n", "tensor", "shape", "storage", "bytes", "bf16 bytes", "bits/w");
    for (const auto& t : tensors) {
      std::string storage = t.bits ? fmt::format("{}b x{}{}", t.bits, t.palettes, t.scaled ? "+s" : "") : t.dtype;
      s += fmt::format("{:<48} {:>12} {:>10} {:>12} {:>12} {:>8.3f}\n", t.name, shape_str(t.shape), storage, t.bytes,
                       t.bf16_bytes(), t.bits_per_weight());
    }
  }
  s += fmt::format("total: {} ({} bytes) vs {} in bf16: {:.2f}x smaller, {:.3f} bits per weight overall, "
                   "{:.3f} in the clustered tensors ({} of {} weights clustered)\n",
                   human(bytes()), bytes(), human(bf16_bytes()), ratio(), bits_per_weight(), clustered_bits_per_weight(),
                   clustered_weights(), bf16_bytes() / 2);
  return s;
}

nlohmann::json SizeReport::to_json() const {
  nlohmann::json ts = nlohmann::json::array();
  for (const auto& t : tensors)
    ts.push_back({{"name", t.name}, {"shape", t.shape}, {"bits", t.bits}, {"cluster_dim", t.cluster_dim},
                  {"palettes", t.palettes}, {"per_row_scale", t.scaled}, {"storage", t.bits ? "palettized" : t.dtype},
                  {"bytes", t.bytes}, {"bf16_bytes", t.bf16_bytes()}, {"bits_per_weight", t.bits_per_weight()}});
  return {{"tensors", ts},
          {"bytes", bytes()},
          {"bf16_bytes", bf16_bytes()},
          {"ratio_vs_bf16", ratio()},
          {"bits_per_weight", bits_per_weight()},
          {"clustered_bits_per_weight", clustered_bits_per_weight()},
          {"clustered_weights", clustered_weights()}};
}

SizeReport size_of(const CompressedModel& m) {
  SizeReport r;
  for (const auto& [name, shape] : tensor_shapes(m.config)) {
    TensorSize t{name, shape};
    auto p = m.packed.find(name);
    if (p != m.packed.end()) {
      const PackedWeight& w = p->second;
      t.bits = w.bits;
      t.cluster_dim = w.cluster_dim;
      t.palettes = w.palette.size(0);
      t.scaled = w.scale.defined();
      t.dtype = "palettized";
      t.bytes = w.bytes();
    } else {
      const at::Tensor& d = m.dense.at(name);
      t.dtype = c10::toString(d.scalar_type());
      t.bytes = d.numel() * d.element_size();
    }
    r.tensors.push_back(std::move(t));
  }
  return r;
}

SizeReport size_from_config(const LlamaConfig& c, const SizePlan& plan) {
  if (plan.bits < 1 || plan.bits > 8) throw_invalid("bits must be in 1..8, got {}", plan.bits);
  static const std::regex proj(R"(model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight)");
  SizeReport r;
  for (const auto& [name, shape] : tensor_shapes(c)) {
    TensorSize t{name, shape};
    const bool emb = name == tensor_name::kEmbed || name == tensor_name::kLmHead;
    if (std::regex_match(name, proj) || (plan.include_embeddings && emb)) {
      if ((plan.group_size > 0 && shape[0] % plan.group_size) || shape[1] % plan.cluster_dim)
        throw_invalid("{} {}x{} does not split into groups of {} rows / vectors of {}", name, shape[0], shape[1],
                      plan.group_size, plan.cluster_dim);
      t.bits = plan.bits;
      t.cluster_dim = plan.cluster_dim;
      t.palettes = plan.group_size > 0 ? shape[0] / plan.group_size : 1;
      t.scaled = plan.per_row_scale;
      t.dtype = "palettized";
      t.bytes = palettized_bytes(shape[0], shape[1], plan.bits, plan.cluster_dim, plan.group_size, plan.per_row_scale);
    } else {
      t.dtype = "BFloat16";
      t.bytes = 2 * t.numel();
    }
    r.tensors.push_back(std::move(t));
  }
  return r;
}

}  // namespace edkm
