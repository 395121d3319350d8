// Internal to cluster/: the per-weight arithmetic of QAT's fake quantization (fake_quantize.h),
// shared by the host loop and the CUDA kernels, so that both compute each weight's terms with
// the same fp32 operations in the same order as the ATen code. Header-only.
#pragma once

#include "cluster/host_device.h"

namespace edkm::detail {

// round(v), ties to even, as at::round: below 2^22 in magnitude, adding and subtracting 1.5 * 2^23
// leaves v's nearest integer (the sum lies where fp32's spacing is 1, and the default rounding
// mode breaks ties to even); larger magnitudes are beyond every grid (at most 2^8 levels), where
// v itself clamps as its rounding would. A call of nearbyintf per weight cost the host loop more
// than the rest of its work.
EDKM_HOST_DEVICE inline float round_even(float v) {
  const float magic = 12582912.f;  // 1.5 * 2^23
  return v < 4194304.f && v > -4194304.f ? (v + magic) - magic : v;
}

// clamp(q, 0, top) as ATen's clamp: NaN stays NaN.
EDKM_HOST_DEVICE inline float clamp_level(float q, float top) { return q < 0.f ? 0.f : (q > top ? top : q); }

// w_q = s (clamp(round(w / s + z), 0, top) - z), s already held at the floor.
EDKM_HOST_DEVICE inline float fake_quantized(float w, float s, float z, float top) {
  return s * (clamp_level(round_even(w / s + z), top) - z);
}

// One weight's terms of the backward (the derivation is at FakeQuantizeFunction), from its
// upstream gradient g: dL/dw, and its parts of the row's dL/ds and dL/dz.
struct FakeQuantizeTerms {
  float dw, ds, dz;
};
EDKM_HOST_DEVICE inline FakeQuantizeTerms fake_quantize_terms(float w, float s, float z, float top, float g) {
  const float v = w / s + z;
  const float q = round_even(v);
  if (q >= 0.f && q <= top) return {g, g * (q - v), 0.f};
  return {0.f, g * (clamp_level(q, top) - z), -g * s};
}

}  // namespace edkm::detail
