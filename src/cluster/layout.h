// Internal to cluster/: how a weight tensor is split into groups and vectors, and the
// prepared clustering input x = round_cd(w / s).
#pragma once

#include <ATen/core/Tensor.h>

#include "cluster/cluster.h"

namespace edkm::detail {

struct GroupLayout {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t groups = 1;
  int64_t rows_per_group = 0;
  int64_t dim = 1;       // cluster_dim
  int64_t vectors = 0;   // vectors per group: rows_per_group * cols / dim

  // Validates the weight against the config; std::invalid_argument otherwise.
  static GroupLayout of(const at::Tensor& weight, const DKMConfig& cfg);
  int64_t numel() const { return rows * cols; }
};

// fp64 for fp64 weights (gradient checks), fp32 otherwise.
at::ScalarType compute_dtype(const at::Tensor& weight);
// The dtype of the rounding, or Undefined when the weight is clustered in its own precision.
at::ScalarType rounding_dtype(const at::Tensor& weight, ClusterDType cd);
bool is_16bit(at::ScalarType t);

// Checks a scale tensor ([rows], positive, finite) and returns it in fp32 (undefined stays so).
at::Tensor checked_scale(const at::Tensor& scale, const GroupLayout& layout, const DKMConfig& cfg,
                         const at::Tensor& weight);
// Checks a palette [G, k, d] and returns it in the compute dtype on the weight's device.
at::Tensor checked_palette(const at::Tensor& palette, const GroupLayout& layout,
                           const DKMConfig& cfg, const at::Tensor& weight);

// Both checks with one read back to the host (on a GPU each read waits for all the work queued
// before it, and a training step checks the arguments of every clustered matrix), and whether
// two centroids of a group coincide (then see repair_collapsed).
struct ScaleAndPalette {
  at::Tensor scale, palette;
  bool collapsed = false;
};
ScaleAndPalette checked_scale_and_palette(const at::Tensor& scale, const at::Tensor& palette,
                                          const GroupLayout& layout, const DKMConfig& cfg,
                                          const at::Tensor& weight);

// x = round_cd(w / s) as [G, vectors, d] in the compute dtype; differentiable, the rounding
// passing gradients straight through in full precision.
at::Tensor prepare(const at::Tensor& weight, const GroupLayout& layout, const DKMConfig& cfg,
                   const at::Tensor& scale);
// The inverse layout map: y [G, vectors, d] -> y * s in `dtype`, shaped like `like`.
at::Tensor restore(const at::Tensor& y, const GroupLayout& layout, const at::Tensor& scale,
                   const at::Tensor& like);

// The per-unit importance [G, vectors] in the compute dtype (undefined when unweighted); throws
// std::invalid_argument if it was prepared for a weight of another layout or device.
at::Tensor checked_importance(const Importance& importance, const GroupLayout& layout, const at::Tensor& weight);

// A per-vector quantity [G, vectors] repeated over each vector's d components, in the weight's
// [rows, cols] layout.
at::Tensor spread_vectors(const at::Tensor& per_vector, const GroupLayout& layout);

// Throws std::invalid_argument if the tensor holds NaN or Inf (checked in bounded chunks).
void check_finite(const at::Tensor& t, const char* what);

// Throws std::logic_error(message) if `weight` was modified in place since its version counter
// read `version`: a deferred step (DeferredDKM, DeferredHardAssign) refers to the weight it was
// made from.
void check_unchanged(const at::Tensor& weight, int64_t version, const char* message);

// coremltools' collapse repair: while two centroids coincide, move one duplicate to the midpoint
// between it and the next distinct centroid (wrapping around). Returns a repaired copy.
at::Tensor repair_collapsed(const at::Tensor& palette);

}  // namespace edkm::detail
