// The tables that both backends of the pattern index share (pattern_index.h), and the choice of
// backend.
#include "cluster/pattern_index.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/error.h"

namespace edkm::detail {
namespace {

// A pattern whose exponent bits are all set is Inf or NaN.
constexpr uint16_t exponent_mask(at::ScalarType rounding) { return rounding == at::kHalf ? 0x7C00 : 0x7F80; }

}  // namespace

PatternIndex::PatternIndex(const at::Tensor& weight, const GroupLayout& layout, const at::Tensor& scale,
                           at::ScalarType rounding)
    : weight_(weight.contiguous()), layout_(layout), scale_(scale), rounding_(rounding) {}

void PatternIndex::build_tables(const at::Tensor& hist_on_device) {
  // One loop on the host over O(G * 65536) entries, not a chain of ATen ops: per matrix, their
  // dispatch alone costs more.
  const at::Tensor hist = hist_on_device.cpu();
  const int64_t* count = hist.data_ptr<int64_t>();
  const int64_t G = layout_.groups;
  const uint16_t mask = exponent_mask(rounding_);
  const int64_t group_weights = layout_.rows_per_group * layout_.cols;
  group_begin_.assign(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    int64_t n = 0;
    for (int64_t p = 0; p < kPatterns; ++p) {
      const int64_t c = count[g * kPatterns + p];
      if (c == 0) continue;
      if ((p & mask) == mask) throw_nonfinite(weight_, rounding_);
      dominant_ = dominant_ || c * 256 > group_weights;
      ++n;
    }
    umax_ = std::max(umax_, n);
    group_begin_[g + 1] = group_begin_[g] + n;
  }
  const int64_t total = group_begin_[G];
  patterns_.resize(total);
  at::Tensor present = at::empty({total}, hist.options());
  at::Tensor slot = at::empty({total}, hist.options());
  at::Tensor values = at::zeros({G * umax_}, hist.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros_like(values);
  int64_t *pp = present.data_ptr<int64_t>(), *sp = slot.data_ptr<int64_t>();
  double *vp = values.data_ptr<double>(), *cp = counts.data_ptr<double>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t p = 0, i = group_begin_[g]; p < kPatterns; ++p) {
      const int64_t n = count[g * kPatterns + p];
      if (n == 0) continue;
      const int64_t row = g * umax_ + (i - group_begin_[g]);
      patterns_[i] = static_cast<uint16_t>(p);
      pp[i] = g * kPatterns + p;
      sp[i] = row;
      vp[row] = rounding_ == at::kHalf ? static_cast<float>(c10::Half(p, c10::Half::from_bits()))
                                       : static_cast<float>(c10::BFloat16(p, c10::BFloat16::from_bits()));
      cp[row] = static_cast<double>(n);
      ++i;
    }
  const auto device = weight_.device();
  const auto cdt = compute_dtype(weight_);
  present_ = present.to(device);
  slot_ = slot.to(device);
  values_ = values.to(device, cdt).view({G, umax_, 1});
  counts_ = counts.to(device, cdt).view({G, umax_});
}

at::Tensor PatternIndex::spread(const at::Tensor& table) const {
  at::Tensor flat = table.contiguous().view({-1});
  return at::zeros({layout_.groups * kPatterns}, flat.options()).index_put_({present_}, flat.index_select(0, slot_));
}

std::unique_ptr<ValueIndex> make_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                               const DKMConfig& cfg, const at::Tensor& scale,
                                               Kernels kernels) {
  at::ScalarType r = rounding_dtype(weight, cfg.cluster_dtype);
  if (!is_16bit(r) || layout.dim != 1)
    throw_invalid("the pattern index needs a 16-bit cluster dtype and cluster_dim 1");
  // The backend is chosen here, once for the index's lifetime.
  if (kernels == Kernels::kAuto && weight.device().is_cpu())
    return make_host_pattern_index(weight.detach(), layout, scale, r);
#ifdef EDKM_CUDA
  if (kernels == Kernels::kAuto && weight.device().is_cuda())
    return make_cuda_pattern_index(weight.detach(), layout, scale, r);
#endif
  return make_aten_pattern_index(weight.detach(), layout, scale, r);
}

}  // namespace edkm::detail
