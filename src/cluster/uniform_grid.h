// Internal to cluster/: the uniform b-bit grid of RTN and GPTQ, with GPTQ's quantizer conventions
// (Frantar et al. 2022, quant.py): the range [min, max] of each row is widened to contain 0, an
// all-zero row gets [-1, 1]; asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min /
// scale); symmetric: max = max(|min|, max), min = -max, zero = 2^(b-1); then
// q = clamp(round(w / scale) + zero, 0, 2^b - 1) and the weight becomes scale * (q - zero).
#pragma once

#include <ATen/core/Tensor.h>

namespace edkm::detail {

struct UniformGrid {
  at::Tensor scale, zero;  // [rows, 1] fp32
  double maxq = 0;         // 2^b - 1

  // The rows of w [rows, n] fitted: one scale and zero point per row.
  static UniformGrid fit(const at::Tensor& w, int bits, bool symmetric);
  // x [rows, m] rounded onto each row's grid (quantize-dequantize).
  at::Tensor apply(const at::Tensor& x) const;
};

}  // namespace edkm::detail
