// Internal to cluster/: the two passes of QAT's LSQ+ fake quantization (straight_through.h), over
// a weight [rows, cols] with a grid per row: scale s and zero point z, [rows] fp32 each.
//
//   forward   w_q = s (clamp(round(w / s + z), 0, maxq) - z), in the weight's dtype
//   backward  from dL/dw_q: dL/dw (the weight's dtype), and the per-row sums of dL/ds and dL/dz
//             before LSQ's gradient scale (the derivation is at FakeQuantizeFunction)
//
// The arithmetic is fp32, in the order of the expressions above, so that both implementations
// give the same w_q and dL/dw bit for bit; the row sums differ in their order of summation.
// The implementations, chosen once per call of fake_quantize_passes():
//   host  for CPU tensors: the backward as one parallel loop over the rows, which reads the
//         weight and dL/dw_q once and writes dL/dw (the ATen code makes about 15 passes, each
//         with a weight-sized temporary); the forward is the ATen code's, whose few passes run
//         in libtorch's vectorized kernels;
//   CUDA  both passes as kernels, one block per row (fake_quantize_cuda.cu), in CUDA builds;
//   ATen  the expressions as ATen ops, for tensors on any device.
// The host loop and the kernels share each weight's arithmetic (fake_quantize_element.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "cluster/kernels.h"

namespace edkm::detail {

// A scale trained to 0 or below would divide by zero: it is held at this floor in the forward,
// and a scale below it receives no gradient (the clamp's).
constexpr double kScaleFloor = 1e-8;

struct FakeQuantizeRowGrads {
  at::Tensor weight;       // dL/dw, the weight's dtype, in the shape asked for (a tensor of its own, not a view)
  at::Tensor scale, zero;  // sum over each row of dL/ds, dL/dz [rows] fp32 (0 for a scale below the floor)
};

struct FakeQuantizePasses {
  at::Tensor (*forward)(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero, double maxq);
  FakeQuantizeRowGrads (*backward)(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero,
                                   double maxq, const at::Tensor& grad, at::IntArrayRef out);
};

// kAuto: the host loop for CPU tensors, the CUDA kernels for CUDA tensors in CUDA builds, the
// ATen code elsewhere; kGeneric: the ATen code.
const FakeQuantizePasses& fake_quantize_passes(const at::Tensor& weight, Kernels kernels = Kernels::kAuto);

#ifdef EDKM_CUDA
// fake_quantize_cuda.cu: one kernel per pass, one block per row.
at::Tensor fake_quantize_forward_cuda(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero,
                                      double maxq);
FakeQuantizeRowGrads fake_quantize_backward_cuda(const at::Tensor& weight, const at::Tensor& scale,
                                                 const at::Tensor& zero, double maxq, const at::Tensor& grad,
                                                 at::IntArrayRef out);
#endif

}  // namespace edkm::detail
