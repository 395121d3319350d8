#include "cluster/layout.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>

#include "common/error.h"

namespace edkm::detail {

GroupLayout GroupLayout::of(const at::Tensor& weight, const DKMConfig& cfg) {
  cfg.validate();
  if (!weight.defined()) throw_invalid("weight is undefined");
  if (!at::isFloatingType(weight.scalar_type()))
    throw_invalid("weight must be a floating-point tensor, got {}", c10::toString(weight.scalar_type()));
  if (weight.dim() == 0 || weight.numel() == 0)
    throw_invalid("cannot cluster an empty weight (shape {})", c10::str(weight.sizes()));
  GroupLayout l;
  l.rows = weight.dim() == 1 ? 1 : weight.size(0);
  l.cols = weight.numel() / l.rows;
  l.dim = cfg.cluster_dim;
  if (l.cols % l.dim != 0)
    throw_invalid("cluster_dim {} does not divide the {} input columns of a weight of shape {}",
                  l.dim, l.cols, c10::str(weight.sizes()));
  if (cfg.group_size > 0) {
    if (l.rows % cfg.group_size != 0)
      throw_invalid("group_size {} does not divide the {} output rows of a weight of shape {}",
                    cfg.group_size, l.rows, c10::str(weight.sizes()));
    l.groups = l.rows / cfg.group_size;
  }
  l.rows_per_group = l.rows / l.groups;
  l.vectors = l.rows_per_group * l.cols / l.dim;
  return l;
}

at::ScalarType compute_dtype(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType rounding_dtype(const at::Tensor& weight, ClusterDType cd) {
  at::ScalarType target = at::ScalarType::Undefined;
  switch (cd) {
    case ClusterDType::kFloat32: target = at::kFloat; break;
    case ClusterDType::kBFloat16: target = at::kBFloat16; break;
    case ClusterDType::kFloat16: target = at::kHalf; break;
    case ClusterDType::kNative: target = weight.scalar_type(); break;
  }
  // Rounding a weight to its own dtype (or wider) changes nothing.
  if (target == weight.scalar_type() && !is_16bit(target)) return at::ScalarType::Undefined;
  if (target == at::kFloat && weight.scalar_type() != at::kDouble) return at::ScalarType::Undefined;
  return target;
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

void check_finite(const at::Tensor& t, const char* what) {
  const int64_t chunk = int64_t(1) << 22;
  at::Tensor flat = t.reshape({-1});
  for (int64_t i = 0; i < flat.numel(); i += chunk) {
    at::Tensor part = flat.narrow(0, i, std::min(chunk, flat.numel() - i));
    if (!at::isfinite(part).all().item<bool>()) throw_invalid("{} contains NaN or Inf values", what);
  }
}

at::Tensor checked_scale(const at::Tensor& scale, const GroupLayout& layout, const DKMConfig& cfg,
                         const at::Tensor& weight) {
  if (!cfg.per_row_scale) {
    if (scale.defined()) throw_invalid("a scale was given but per_row_scale is off");
    return {};
  }
  if (!scale.defined()) throw_invalid("per_row_scale is on but no scale was given (see row_scales)");
  if (scale.numel() != layout.rows)
    throw_invalid("scale has {} entries, expected one per output row ({})", scale.numel(), layout.rows);
  at::Tensor s = scale.reshape({layout.rows}).to(weight.device(), at::kFloat);
  check_finite(s, "scale");
  if (!(s > 0).all().item<bool>()) throw_invalid("scale entries must be positive");
  return s;
}

at::Tensor checked_importance(const Importance& importance, const GroupLayout& layout, const at::Tensor& weight) {
  if (!importance.defined()) return {};
  const at::Tensor& f = importance.per_unit();
  if (!f.sizes().equals({layout.groups, layout.vectors}))
    throw_invalid("the importance was prepared for {} units in groups of {}, this weight has {} in groups of {}: "
                  "prepare it for this weight and config", f.numel(), f.size(-1), layout.groups * layout.vectors,
                  layout.vectors);
  if (f.device() != weight.device())
    throw_invalid("the importance is on {}, the weight on {}", f.device().str(), weight.device().str());
  return f.to(compute_dtype(weight));
}

at::Tensor spread_vectors(const at::Tensor& per_vector, const GroupLayout& layout) {
  return per_vector.unsqueeze(-1).expand({layout.groups, layout.vectors, layout.dim}).reshape({layout.rows, layout.cols});
}

at::Tensor checked_palette(const at::Tensor& palette, const GroupLayout& layout,
                           const DKMConfig& cfg, const at::Tensor& weight) {
  if (!palette.defined()) throw_invalid("palette is undefined (see init_palette)");
  const std::vector<int64_t> want{layout.groups, cfg.k(), layout.dim};
  if (palette.sizes() != at::IntArrayRef(want))
    throw_invalid("palette has shape {}, expected [groups={}, k={}, cluster_dim={}]",
                  c10::str(palette.sizes()), layout.groups, cfg.k(), layout.dim);
  if (!at::isFloatingType(palette.scalar_type())) throw_invalid("palette must be floating-point");
  check_finite(palette, "palette");
  return palette.detach().to(weight.device(), compute_dtype(weight));
}

at::Tensor prepare(const at::Tensor& weight, const GroupLayout& layout, const DKMConfig& cfg,
                   const at::Tensor& scale) {
  at::Tensor x = weight.reshape({layout.rows, layout.cols}).to(compute_dtype(weight));
  if (scale.defined()) x = x / scale.unsqueeze(1);
  at::ScalarType r = rounding_dtype(weight, cfg.cluster_dtype);
  if (r != at::ScalarType::Undefined) {
    // Straight-through rounding. x.to(r) alone would also pass gradients through, but rounded
    // to r's precision; x + (round(x) - x) is exactly round(x) in the forward (the difference
    // of two floats within a factor of 2 is exact, Sterbenz) and keeps gradients in full precision.
    x = x + (x.detach().to(r).to(x.scalar_type()) - x.detach());
  }
  return x.reshape({layout.groups, layout.vectors, layout.dim});
}

at::Tensor restore(const at::Tensor& y, const GroupLayout& layout, const at::Tensor& scale,
                   const at::Tensor& like) {
  at::Tensor out = y.reshape({layout.rows, layout.cols});
  if (scale.defined()) out = out * scale.unsqueeze(1);
  return out.to(like.scalar_type()).view(like.sizes());
}

at::Tensor repair_collapsed(const at::Tensor& palette) {
  at::Tensor out = palette.clone();
  const int64_t k = palette.size(1);
  for (int64_t g = 0; g < palette.size(0); ++g) {
    at::Tensor c = out[g];
    auto [uniq, inverse, counts] = at::unique_dim(c.to(at::kFloat), 0, true, true, true);
    const int64_t n = uniq.size(0);
    if (n >= k) continue;
    auto inv = inverse.to(at::kCPU);
    auto cnt = counts.to(at::kCPU);
    for (int64_t j = 0; j < n; ++j) {
      if (cnt[j].item<int64_t>() <= 1) continue;
      at::Tensor mid = 0.5 * (uniq[j] + uniq[(j + 1) % n]);
      int64_t first = (inv == j).nonzero()[0][0].item<int64_t>();
      c[first].copy_(mid);
    }
  }
  return out;
}

void check_unchanged(const at::Tensor& weight, int64_t version, const char* message) {
  if (weight._version() != version) throw std::logic_error(message);
}

}  // namespace edkm::detail
