#include "cluster/layout.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

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

namespace {

// Conditions on a call's small tensors, each a 0-dim bool on the weight's device, read back to
// the host together: on a GPU every read waits for all the work queued before it, and a
// training step checks the arguments of every clustered matrix.
class Conditions {
 public:
  // A condition whose falsehood is an error: std::invalid_argument(message).
  void require(const at::Tensor& ok, std::string message) {
    ok_.push_back(ok);
    messages_.push_back(std::move(message));
  }
  // A condition that is not an error; its value is read with the requirements, at read().
  void watch(const at::Tensor& condition) {
    ok_.push_back(condition);
    messages_.emplace_back();
  }
  // One copy to the host; throws the first unmet requirement's message. Returns the watched
  // conditions' values in the order they were added.
  std::vector<bool> read() const {
    std::vector<bool> watched;
    if (ok_.empty()) return watched;
    const at::Tensor values = at::stack(ok_).cpu();
    const bool* v = values.data_ptr<bool>();
    for (size_t i = 0; i < ok_.size(); ++i) {
      if (messages_[i].empty()) watched.push_back(v[i]);
      else if (!v[i]) throw std::invalid_argument(messages_[i]);
    }
    return watched;
  }

 private:
  std::vector<at::Tensor> ok_;
  std::vector<std::string> messages_;  // empty for a watched condition
};

at::Tensor scale_in(const at::Tensor& scale, const GroupLayout& layout, const DKMConfig& cfg,
                    const at::Tensor& weight, Conditions& conditions) {
  if (!cfg.per_row_scale) {
    if (scale.defined()) throw_invalid("a scale was given but per_row_scale is off");
    return {};
  }
  if (!scale.defined()) throw_invalid("per_row_scale is on but no scale was given (see row_scales)");
  if (scale.numel() != layout.rows)
    throw_invalid("scale has {} entries, expected one per output row ({})", scale.numel(), layout.rows);
  at::Tensor s = scale.reshape({layout.rows}).to(weight.device(), at::kFloat);
  conditions.require(at::isfinite(s).all(), "scale contains NaN or Inf values");
  conditions.require((s > 0).all(), "scale entries must be positive");
  return s;
}

at::Tensor palette_in(const at::Tensor& palette, const GroupLayout& layout, const DKMConfig& cfg,
                      const at::Tensor& weight, Conditions& conditions) {
  if (!palette.defined()) throw_invalid("palette is undefined (see init_palette)");
  const std::vector<int64_t> want{layout.groups, cfg.k(), layout.dim};
  if (palette.sizes() != at::IntArrayRef(want))
    throw_invalid("palette has shape {}, expected [groups={}, k={}, cluster_dim={}]",
                  c10::str(palette.sizes()), layout.groups, cfg.k(), layout.dim);
  if (!at::isFloatingType(palette.scalar_type())) throw_invalid("palette must be floating-point");
  const at::Tensor p = palette.detach().to(weight.device(), compute_dtype(weight));
  conditions.require(at::isfinite(p).all(), "palette contains NaN or Inf values");
  return p;
}

// Whether two centroids of a group coincide, compared in fp32 as coremltools compares them:
// the group's centroids sorted lexicographically (a stable sort per component, the last
// first), then each against the next.
at::Tensor any_collapsed(const at::Tensor& palette) {
  const at::Tensor c = palette.to(at::kFloat);
  const int64_t G = c.size(0), k = c.size(1), d = c.size(2);
  at::Tensor order = at::arange(k, c.options().dtype(at::kLong)).expand({G, k});
  for (int64_t j = d - 1; j >= 0; --j) {
    const at::Tensor key = c.select(2, j).gather(1, order);
    order = order.gather(1, std::get<1>(key.sort(/*stable=*/true, /*dim=*/1)));
  }
  const at::Tensor sorted = c.gather(1, order.unsqueeze(-1).expand({G, k, d}));
  return (sorted.narrow(1, 1, k - 1) == sorted.narrow(1, 0, k - 1)).all(-1).any();
}

}  // namespace

at::Tensor checked_scale(const at::Tensor& scale, const GroupLayout& layout, const DKMConfig& cfg,
                         const at::Tensor& weight) {
  Conditions conditions;
  at::Tensor s = scale_in(scale, layout, cfg, weight, conditions);
  conditions.read();
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
  Conditions conditions;
  at::Tensor p = palette_in(palette, layout, cfg, weight, conditions);
  conditions.read();
  return p;
}

ScaleAndPalette checked_scale_and_palette(const at::Tensor& scale, const at::Tensor& palette,
                                          const GroupLayout& layout, const DKMConfig& cfg,
                                          const at::Tensor& weight) {
  Conditions conditions;
  ScaleAndPalette out;
  out.scale = scale_in(scale, layout, cfg, weight, conditions);
  out.palette = palette_in(palette, layout, cfg, weight, conditions);
  conditions.watch(any_collapsed(out.palette));
  out.collapsed = conditions.read().at(0);
  return out;
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
