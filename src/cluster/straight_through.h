// cluster: the train-time alternatives to DKM's soft assignment, each with a straight-through
// gradient (Bengio et al. 2013): the forward pass uses the quantized weight, the backward
// passes dL/dw_q on to w unchanged (within the grid's range).
//
//   hard k-means  TF-MOT's weight clustering: every weight at its nearest centroid; the
//                 centroids re-estimated from the weights by one Lloyd step per optimizer step
//   QAT           LLM-QAT (Liu et al. 2023): a uniform b-bit grid per output row,
//                 w_q = s (clamp(round(w / s + z), 0, 2^b - 1) - z), with the scale s and the
//                 zero point z learned as in LSQ+ (Bhalgat et al. 2020): their gradients
//                 follow from the same straight-through rounding, scaled by
//                 1 / sqrt(cols (2^b - 1)) (LSQ's step-size gradient scale, Esser et al. 2020).
//                 The grid of row r is the palette {s_r (j - z_r) : j = 0 .. 2^b - 1}, so a
//                 QAT model is written as palettes of one row each.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "cluster/cluster.h"

namespace edkm {

// One Lloyd step: each centroid becomes the mean of the (scaled, rounded) weights or vectors
// nearest to it, weighted by `importance` when given, as dkm()'s; a centroid that no weight is nearest, or only weights
// of importance 0, keeps its value. Returns the new palette [G, k, d] (fp32).
at::Tensor lloyd_update(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                        const at::Tensor& scale = {}, const Importance& importance = {});

// The weight at its nearest centroid (palettize, depalettize), with a straight-through
// gradient to `weight`.
at::Tensor hard_assign(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                       const at::Tensor& scale = {});

// Hard k-means' part of a training step, split as DeferredDKM splits dkm(): the constructor runs
// the Lloyd step (with `update`) and then finds the nearest centroid of each distinct value under
// the updated palette, over one pattern index for both; weight() makes the hard-assigned weight
// from that table, without a graph, each time a layer needs it (its forward, and its
// recomputation when checkpointed): one pass over the weights, where hard_assign() makes three
// (the index twice, then the emit). The gradient is straight through, so nothing is needed after
// the backward. The layouts without a pattern index assign every weight in weight() (palettize).
// weight() equals hard_assign(weight, palette(), cfg, scale) without its graph; the weight must
// not change in between (std::logic_error otherwise).
class DeferredHardAssign {
 public:
  DeferredHardAssign(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                     const at::Tensor& scale = {}, const Importance& importance = {}, bool update = true);
  ~DeferredHardAssign();
  DeferredHardAssign(DeferredHardAssign&&) noexcept;
  DeferredHardAssign& operator=(DeferredHardAssign&&) noexcept;

  // After the Lloyd step (lloyd_update()'s result), or the palette given without update.
  const at::Tensor& palette() const { return palette_; }
  at::Tensor weight() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
  at::Tensor palette_;
};

// QAT's learned grid: scale and zero point per output row ([rows] fp32 each, trainable leaves).
struct LearnedGrid {
  at::Tensor scale, zero;
};
// Min-max initialisation (RTN's asymmetric grid per row, cluster/uniform_grid.h conventions).
LearnedGrid init_learned_grid(const at::Tensor& weight, int bits);
// w_q as above; differentiable w.r.t. weight, grid.scale and grid.zero.
at::Tensor fake_quantize(const at::Tensor& weight, const LearnedGrid& grid, int bits);
// fake_quantize()'s backward without its forward, for a weight [rows, ...] read as [rows, cols]:
// from dL/dw_q (weight-shaped), dL/dw (the weight's shape and dtype), dL/ds and dL/dz ([rows]
// fp32), as autograd through fake_quantize() gives them.
struct FakeQuantizeGrad {
  at::Tensor weight, scale, zero;
};
FakeQuantizeGrad fake_quantize_backward(const at::Tensor& weight, const LearnedGrid& grid, int bits,
                                        const at::Tensor& grad);
// The grid as palettes [rows, 2^b, 1] (one group per row), for palettize and the file.
at::Tensor grid_palette(const LearnedGrid& grid, int bits);

}  // namespace edkm
