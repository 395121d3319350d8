// Round-to-nearest uniform quantization (the post-training baseline) on GPTQ's grid
// (uniform_grid.h).
#include <ATen/ATen.h>

#include "cluster/cluster.h"
#include "cluster/layout.h"
#include "cluster/uniform_grid.h"
#include "common/error.h"

namespace edkm {

namespace detail {

UniformGrid UniformGrid::fit(const at::Tensor& w, int bits, bool symmetric) {
  UniformGrid g;
  g.maxq = double((1 << bits) - 1);
  at::Tensor lo = at::clamp_max(std::get<0>(w.min(1, true)), 0);
  at::Tensor hi = at::clamp_min(std::get<0>(w.max(1, true)), 0);
  if (symmetric) {
    hi = at::maximum(lo.abs(), hi);
    lo = at::where(lo < 0, -hi, lo);
  }
  at::Tensor both_zero = (lo == 0) & (hi == 0);
  lo = at::where(both_zero, at::full_like(lo, -1), lo);
  hi = at::where(both_zero, at::full_like(hi, 1), hi);
  g.scale = (hi - lo) / g.maxq;
  g.zero = symmetric ? at::full_like(g.scale, (g.maxq + 1) / 2) : at::round(-lo / g.scale);
  return g;
}

at::Tensor UniformGrid::apply(const at::Tensor& x) const {
  at::Tensor q = at::clamp(at::round(x / scale) + zero, 0, maxq);
  return scale * (q - zero);
}

}  // namespace detail

namespace {

// Quantize-dequantize each row of w [groups, n] as one group.
at::Tensor quantize_groups(const at::Tensor& w, const RTNConfig& cfg) {
  return detail::UniformGrid::fit(w, cfg.bits, cfg.symmetric).apply(w);
}

}  // namespace

at::Tensor rtn_quantize(const at::Tensor& weight, const RTNConfig& cfg) {
  if (cfg.bits < 1 || cfg.bits > 8) throw_invalid("RTN bits must be in 1..8, got {}", cfg.bits);
  if (cfg.group_size < 0) throw_invalid("RTN group_size must be >= 0, got {}", cfg.group_size);
  if (!weight.defined() || weight.numel() == 0) throw_invalid("RTN: empty weight");
  detail::check_finite(weight, "weight");
  at::NoGradGuard no_grad;
  const int64_t rows = weight.dim() == 1 ? 1 : weight.size(0);
  const int64_t cols = weight.numel() / rows;
  at::Tensor w = weight.detach().to(at::kFloat).reshape({rows, cols});
  if (cfg.group_size == 0) return quantize_groups(w.reshape({1, -1}), cfg).to(weight.scalar_type()).view(weight.sizes());
  // Groups of group_size consecutive weights along each row; the last one may be shorter.
  std::vector<at::Tensor> parts;
  for (int64_t c0 = 0; c0 < cols; c0 += cfg.group_size) {
    const int64_t len = std::min(cfg.group_size, cols - c0);
    parts.push_back(quantize_groups(w.narrow(1, c0, len), cfg));
  }
  return at::cat(parts, 1).to(weight.scalar_type()).view(weight.sizes());
}

}  // namespace edkm
