// Internal to cluster/: the DKM methods behind dkm().
#pragma once

#include "cluster/layout.h"

namespace edkm::detail {

// Arguments are checked by dkm(); palette is in the compute dtype and already repaired;
// importance is Importance::per_unit() [G, vectors] (undefined for unweighted DKM), which
// dkm_indexed keeps by reference.
DKMResult dkm_dense(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                    const at::Tensor& scale, const GroupLayout& layout, const at::Tensor& importance);

enum class IndexKind { kPattern, kSorted, kIdentity };
DKMResult dkm_indexed(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                      const at::Tensor& scale, const GroupLayout& layout, IndexKind kind,
                      const at::Tensor& importance);

}  // namespace edkm::detail
