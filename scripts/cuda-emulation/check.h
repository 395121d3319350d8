// What the emulated checks share besides emu.h.
#pragma once

#include <ATen/ATen.h>

// Norm-wise relative error |a - b| / |b|.
inline double rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).norm() / b.norm().clamp_min(1e-300)).item<double>();
}
