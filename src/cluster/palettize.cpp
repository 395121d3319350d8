// Hard assignment for export, and its inverse.
#include <ATen/ATen.h>

#include "cluster/cluster.h"
#include "cluster/layout.h"
#include "common/error.h"

namespace edkm {

Palettized palettize(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                     const at::Tensor& scale) {
  using namespace detail;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  at::NoGradGuard no_grad;
  at::Tensor s = checked_scale(scale, layout, cfg, weight);
  at::Tensor C = checked_palette(palette, layout, cfg, weight);
  check_finite(weight, "weight");
  at::Tensor x = prepare(weight.detach(), layout, cfg, s);  // [G, n, d]
  check_finite(x, "weight after rounding to the cluster dtype");

  // argmin_j |x - c_j|^2 (- prune_threshold for j = 0), as coremltools' palettize does, in
  // chunks so the [n, k, d] distances stay small.
  at::Tensor idx = at::empty({layout.groups, layout.vectors}, weight.options().dtype(at::kByte));
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 20) / (cfg.k() * layout.dim));
  for (int64_t g = 0; g < layout.groups; ++g) {
    for (int64_t v0 = 0; v0 < layout.vectors; v0 += step) {
      const int64_t len = std::min(step, layout.vectors - v0);
      at::Tensor D = (x[g].narrow(0, v0, len).unsqueeze(1) - C[g].unsqueeze(0)).pow(2).sum(-1);
      if (cfg.prune_threshold > 0) D.select(-1, 0).sub_(cfg.prune_threshold);
      idx[g].narrow(0, v0, len).copy_(D.argmin(-1));
    }
  }
  Palettized p;
  p.indices = idx.view({layout.rows, layout.cols / layout.dim});
  p.palette = C.to(at::kFloat);
  p.scale = s;
  p.shape = weight.sizes().vec();
  p.bits = cfg.bits;
  p.cluster_dim = cfg.cluster_dim;
  p.group_size = cfg.group_size;
  return p;
}

at::Tensor depalettize(const Palettized& p, at::ScalarType dtype) {
  if (!p.indices.defined() || !p.palette.defined() || p.palette.dim() != 3)
    throw_invalid("depalettize: indices and a [G, k, d] palette are required");
  const int64_t G = p.palette.size(0), k = p.palette.size(1), d = p.palette.size(2);
  const int64_t rows = p.indices.size(0);
  if (rows % G != 0) throw_invalid("depalettize: {} rows do not split into {} groups", rows, G);
  at::Tensor idx = p.indices.to(at::kLong).view({G, -1});
  if (idx.numel() > 0 && (idx.max().item<int64_t>() >= k))
    throw_invalid("depalettize: an index is >= the palette size {}", k);
  at::Tensor flat = (idx + at::arange(G, idx.options()).unsqueeze(1) * k).view({-1});
  at::Tensor w = p.palette.to(p.indices.device()).reshape({G * k, d}).index_select(0, flat);
  w = w.view({rows, -1});
  if (p.scale.defined()) w = w * p.scale.to(w.device()).unsqueeze(1);
  return w.to(dtype).view(p.shape);
}

}  // namespace edkm
