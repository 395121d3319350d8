#include "common/finite.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include "common/error.h"

namespace edkm {

void check_finite(const at::Tensor& t, const std::string& what) {
  if (!t.defined() || !at::isFloatingType(t.scalar_type()) || t.numel() == 0) return;
  at::Tensor bad = at::isfinite(t).logical_not_();
  if (!bad.any().item<bool>()) return;
  const int64_t count = bad.sum().item<int64_t>();
  const int64_t first = bad.reshape({-1}).nonzero()[0][0].item<int64_t>();
  std::string index;
  int64_t rest = first;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    index = fmt::format("{}{}", rest % t.size(d), index.empty() ? "" : ", " + index);
    rest /= t.size(d);
  }
  const double v = t.reshape({-1})[first].item<double>();
  throw_input("{}: {} of {} values are NaN or Inf (the first, {}, at index [{}])", what, count, t.numel(), v, index);
}

}  // namespace edkm
