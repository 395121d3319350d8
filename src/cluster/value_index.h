// Internal to cluster/: the map from each weight (or vector) to its distinct value.
//
// DKM's attention row depends only on the value of a weight, so the algorithm runs over the U
// distinct values of each group (values [G, U, d], multiplicities counts [G, U]; groups with
// fewer values are padded with zero-count entries). Three passes touch all N weights:
//   emit       w~_i = s_r * table[u(i)]                      (forward)
//   aggregate  g_u  = sum_{i: u(i) = u} s_r * G_i            (backward, scatter-add)
//   input_grad dL/dw_i = J_u^T G_i + h_u / s_r               (backward, gather)
// (G_i = dL/dw~_i; J_u and h_u are computed in unique-value space, see uspace.h.)
//
// Implementations:
//   pattern   16-bit cluster dtypes, d = 1: the index of a weight is its own 16-bit pattern
//             after scaling and rounding, recomputed from the caller's weight on every pass, so
//             nothing N-sized is stored (pattern_index.h: host loops for CPU tensors, ATen ops
//             elsewhere, chosen once when the index is built).
//   sorted    any dtype and d: distinct values by sorting; stores an N-long inverse index.
//   identity  every weight is its own "value" (U = N, counts 1): the chunked dense fallback.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "cluster/kernels.h"
#include "cluster/layout.h"

namespace edkm::detail {

class ValueIndex {
 public:
  virtual ~ValueIndex() = default;

  const at::Tensor& values() const { return values_; }  // [G, U, d], compute dtype
  const at::Tensor& counts() const { return counts_; }  // [G, U], compute dtype; undefined = all 1

  virtual at::Tensor emit(const at::Tensor& table) const = 0;          // [G, U, d] -> weight-shaped
  // Sums in fp64 (returned as such for the distinct-value indices).
  virtual at::Tensor aggregate(const at::Tensor& grad) const = 0;      // weight-shaped -> [G, U, d]
  // jac: J_u^T as [G, U, d, d]; h: [G, U, d]. Returns dL/dw in the weight's dtype and shape.
  virtual at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& jac,
                                const at::Tensor& h) const = 0;

 protected:
  at::Tensor values_;
  at::Tensor counts_;
};

// The summed importance of each distinct value [G, U] (fp64 for the distinct-value indices; 0
// for padding), from per-vector importances fv [G, vectors] (Importance::per_unit()). It replaces
// the multiplicities in importance-weighted k-means.
at::Tensor value_weights(const ValueIndex& index, const at::Tensor& fv, const GroupLayout& layout,
                         const at::Tensor& scale, const at::Tensor& weight);

// All builders take the weight (any floating dtype), its layout, the config, and the checked
// fp32 scale (or undefined). The index keeps a reference to the weight, not a copy.
std::unique_ptr<ValueIndex> make_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                               const DKMConfig& cfg, const at::Tensor& scale,
                                               Kernels kernels = Kernels::kAuto);
std::unique_ptr<ValueIndex> make_sorted_index(const at::Tensor& weight, const GroupLayout& layout,
                                              const DKMConfig& cfg, const at::Tensor& scale);
std::unique_ptr<ValueIndex> make_identity_index(const at::Tensor& weight, const GroupLayout& layout,
                                                const DKMConfig& cfg, const at::Tensor& scale);

}  // namespace edkm::detail
