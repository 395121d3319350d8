// Products with a palettized weight computed from its packed indices, through the palette,
// without materialising the dense matrix: y = x W^T with W[r, c] = C_g(r)[idx(r, c)] * s_r.
//
//   matvec (one token, decoding): each row's indices are unpacked 16 (AVX-512 VBMI, four rows
//     at a time) or 8 (AVX2) at a time and looked up in the palette held in a vector register
//     (vpermps), then multiplied into x; b <= 4, scalar palettes, rows starting on byte
//     boundaries. Other cases, and CPUs without AVX2 (checked at run time), take a portable
//     scalar loop.
//   matmul (several tokens, prefill and training-free evaluation): tiles of rows are decoded
//     into a small dense buffer and multiplied by BLAS, so the dense matrix never exists whole.
#pragma once

#include <ATen/core/Tensor.h>

#include "format/format.h"
#include "model/llama.h"

namespace edkm {

class PalettizedLinear final : public LinearKernel {
 public:
  explicit PalettizedLinear(PackedWeight w);
  // x [..., cols] -> [..., rows], in x's dtype.
  at::Tensor forward(const at::Tensor& x) const override;
  at::Tensor dense(at::ScalarType dtype) const override { return w_.dense(dtype); }
  const PackedWeight& weight() const { return w_; }

  // The two paths, exposed for tests and benchmarks. x: [cols] fp32 / [n, cols] fp32.
  at::Tensor matvec(const at::Tensor& x) const;
  at::Tensor matmul(const at::Tensor& x) const;
  // Whether matvec uses the vectorised path on this CPU for this weight.
  bool vectorised() const;

 private:
  PackedWeight w_;
  at::Tensor palette_;  // fp32 [G, 2^b, d]
  int64_t row_bits_ = 0;
};

// Serves every clustered projection of `m` (not the embedding table, whose rows are gathered
// instead) through PalettizedLinear, and the rest densely. Returns the model ready for inference.
Llama packed_llama(const CompressedModel& m, at::ScalarType dense_dtype = at::kFloat);

}  // namespace edkm
