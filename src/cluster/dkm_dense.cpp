// The reference DKM: the paper's N x k formulation in plain ATen ops, differentiated by
// autograd, one group at a time exactly as coremltools' diff_palettize_seq runs. It is what the
// tests trust; its memory grows as N x k x iterations.
#include "cluster/dkm_internal.h"

#include <ATen/ATen.h>

namespace edkm::detail {

DKMResult dkm_dense(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                    const at::Tensor& scale, const GroupLayout& layout, const at::Tensor& importance) {
  check_finite(weight, "weight");
  at::Tensor x = prepare(weight, layout, cfg, scale);  // [G, n, d], differentiable
  {
    at::ScalarType r = rounding_dtype(weight, cfg.cluster_dtype);
    if (r != at::ScalarType::Undefined) check_finite(x.detach(), "weight after rounding to the cluster dtype");
  }
  DKMResult result;
  result.method = DKMMethod::kDense;
  std::vector<at::Tensor> outs, palettes;
  for (int64_t g = 0; g < layout.groups; ++g) {
    at::Tensor X = x[g];         // [n, d]
    at::Tensor C = palette[g];   // [k, d], no gradient
    // Importance-weighted DKM: each vector's attention counts f_i times in the centroids and
    // its distance f_i times in the inertia.
    at::Tensor f = importance.defined() ? importance[g].to(X.scalar_type()).unsqueeze(1) : at::Tensor();
    at::Tensor A;
    double last_inertia = 0;
    int iters = 0;
    for (int t = 0; t < cfg.max_iters; ++t) {
      at::Tensor D = (X.unsqueeze(1) - C.unsqueeze(0)).pow(2).sum(-1);  // [n, k]
      if (cfg.prune_threshold > 0) D.select(-1, 0).sub_(cfg.prune_threshold);
      A = at::softmax(D.neg().div(cfg.tau), -1).clamp_min(cfg.zero_threshold);
      at::Tensor Af = f.defined() ? A * f : A;
      C = at::matmul(Af.t(), X) / Af.sum(0).unsqueeze(1);
      ++iters;
      at::Tensor dmin = std::get<0>(D.detach().min(-1));
      if (f.defined()) dmin = dmin * f.squeeze(1);
      const double inertia = dmin.to(at::kDouble).sum().item<double>();
      if (t > 0 && std::abs(last_inertia - inertia) <= cfg.eps) break;
      last_inertia = inertia;
    }
    outs.push_back(at::matmul(A, C));
    palettes.push_back(C.detach());
    result.iterations.push_back(iters);
  }
  result.weight = restore(at::stack(outs), layout, scale, weight);
  result.palette = at::stack(palettes);
  return result;
}

}  // namespace edkm::detail
