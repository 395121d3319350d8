// cluster: differentiable k-means (DKM) weight clustering and its post-training baselines.
//
// A weight tensor of shape [rows, ...] is read as a matrix [rows, cols] (rows = output
// channels). Its rows are split into groups of `group_size` rows (one group when 0), each with
// its own palette of k = 2^bits centroids; with cluster_dim d > 1 the centroids are vectors of
// d consecutive weights along the input dimension. Palettes are tensors [G, k, d].
//
// One DKM call (Cho et al., "DKM: Differentiable k-Means Clustering Layer for Neural Network
// Compression", ICLR 2022; semantics of Apple's coremltools DKM palettizer, see
// ../shared/design/unique-space-dkm.md) runs, per group, from the previous palette C^0:
//
//     D_ij = |x_i - c_j|^2  (- prune_threshold for j = 0)
//     A_ij = max(softmax_j(-D_ij / tau), zero_threshold)
//     c_j' = sum_i A_ij x_i / sum_i A_ij
//
// until the inertia sum_i min_j D_ij changes by at most eps or max_iters updates were made, and
// emits x~_i = sum_j A_ij c_j with the last attention map and the last palette. x is the weight
// divided by the per-row scale (if any) and rounded to the cluster dtype; the rounding has a
// straight-through gradient and the palette is a function of the weight (never a parameter).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace edkm {

// The dtype weights are rounded to before clustering. 16-bit dtypes give at most 65,536
// distinct values per group, which the unique-value method exploits.
enum class ClusterDType { kFloat32, kBFloat16, kFloat16, kNative /* the weight's own dtype */ };

enum class PaletteInit {
  kKMeansPP,  // weighted k-means++ seeding, then Lloyd iterations
  kQuantile,  // centroids at the weighted quantiles (j + 1/2) / k, then Lloyd iterations
  kGiven,     // the palette passed to init_palette, used as it is
  kOptimal,   // scalars only: the exact weighted k-means optimum, by dynamic programming
};

enum class DKMMethod {
  kDense,   // autograd through plain ATen ops on N x k tensors: the paper's formulation; the reference
  kUnique,  // hand-written forward/backward over the distinct values of the weight
  kAuto,    // unique for 16-bit scalar clustering; otherwise the same hand-written op over all
            // N values, in chunks, so memory stays bounded
  kEDKM,    // the dense N x k formulation with eDKM's storage of saved tensors (edkm.h):
            // marshal / uniquify / shard below choose the techniques
};

struct DKMConfig {
  // Bits per weight index: k = 2^bits centroids. coremltools' default for linear layers.
  int bits = 4;
  // 1 = scalar palettes; d > 1 = vectors of d consecutive weights along the input dimension
  // (coremltools groups output channels instead; ours keeps a vector contiguous in memory).
  int cluster_dim = 1;
  // Softmax temperature, in squared weight units (scale-free only with per_row_scale).
  // coremltools' palett_tau.
  double tau = 1e-4;
  // At most this many centroid updates per call (coremltools' kmeans_max_iter).
  int max_iters = 3;
  // Early stop when |inertia_t - inertia_{t-1}| <= eps (coremltools' palett_epsilon).
  double eps = 1e-4;
  // 0: one palette per tensor; g > 0: one palette per g consecutive output rows.
  int64_t group_size = 0;
  // Divide each row by s_r = (max_r - min_r) / 2 (frozen at init; coremltools' "min_max").
  bool per_row_scale = false;
  // Rounding before clustering. coremltools clusters in fp32; we default to bf16 so that the
  // unique-value method applies, as eDKM does for LLMs.
  ClusterDType cluster_dtype = ClusterDType::kBFloat16;
  PaletteInit init = PaletteInit::kKMeansPP;
  uint64_t seed = 0;
  DKMMethod method = DKMMethod::kAuto;
  // Attention floor (coremltools' zero_threshold) and the bias subtracted from centroid 0's
  // distance (prune_threshold).
  double zero_threshold = 1e-7;
  double prune_threshold = 1e-7;
  // Lloyd iterations of the initial k-means.
  int kmeans_max_iters = 100;
  // eDKM's techniques, for method kEDKM (edkm.h): saved tensors to a host store with a
  // duplicate check; attention maps stored as distinct rows plus an index; the index sharded
  // over the learners of the default process group (dist/dist.h).
  bool marshal = false;
  bool uniquify = false;
  bool shard = false;

  int64_t k() const { return int64_t(1) << bits; }
  // Throws std::invalid_argument naming the bad field.
  void validate() const;
};

std::string to_string(ClusterDType t);
std::string to_string(PaletteInit t);
std::string to_string(DKMMethod m);
ClusterDType parse_cluster_dtype(const std::string& s);  // fp32 | bf16 | fp16 | native
PaletteInit parse_palette_init(const std::string& s);    // kmeans++ | quantile | given | optimal
DKMMethod parse_dkm_method(const std::string& s);        // dense | unique | auto

// The importance of each weight of one tensor (e.g. its diagonal Fisher information), prepared
// for one clustering config: checked once (the weight's shape, floating-point, finite, >= 0)
// and reduced to one value per clustered unit, the sum over a vector's d components rescaled
// per group to mean 1. Weighted centroids depend only on ratios within a group; the rescaling
// keeps the weighted inertia, and so eps, in the units of the unweighted algorithm. A group
// whose importances are all 0 weighs its units equally. A training loop prepares it once and
// passes it at every step, since the checks and the reduction are passes over the weight.
class Importance {
 public:
  Importance() = default;  // unweighted
  // Throws std::invalid_argument naming the problem.
  Importance(const at::Tensor& importance, const at::Tensor& weight, const DKMConfig& cfg);
  bool defined() const { return per_unit_.defined(); }
  // [G, vectors per group], fp64 for fp64 weights and fp32 otherwise, on the weight's device.
  const at::Tensor& per_unit() const { return per_unit_; }

 private:
  at::Tensor per_unit_;
};

// Per-row scale s_r = (max_r - min_r) / 2 over each output row ([rows], fp32); rows that are
// constant get 1 so that dividing by s is always defined.
at::Tensor row_scales(const at::Tensor& weight);

// The first palette [G, k, d] (fp32): weighted k-means over the distinct values of each group
// of the prepared weight, seeded as cfg.init says. For kGiven, `given` ([k, d], [G, k, d] or
// [k] for scalars) is validated and broadcast to every group. When a group has fewer distinct
// values than k, the palette holds each value once and repeats the largest.
// `importance` (optional) weighs each weight in the k-means objective
// sum_i f_i |x_i - c(i)|^2 instead of 1: sensitivity-weighted k-means (SqueezeLLM, Kim et al.
// 2023, eq. 4, with f the diagonal Fisher information); a distinct value weighs the sum of its
// weights' importances.
at::Tensor init_palette(const at::Tensor& weight, const DKMConfig& cfg,
                        const at::Tensor& scale = {}, const at::Tensor& given = {},
                        const Importance& importance = {});

struct DKMResult {
  at::Tensor weight;            // soft-clustered weight: shape, dtype, device of the input
  at::Tensor palette;           // [G, k, d] after the updates, detached (carry it to the next step)
  std::vector<int> iterations;  // updates made per group
  DKMMethod method;             // the method that ran (kAuto resolved)
};

// One DKM layer application, differentiable w.r.t. `weight`. `palette` is the previous step's
// palette (it receives no gradient); `scale` is row_scales() of the pretrained weight when
// cfg.per_row_scale is on. Throws std::invalid_argument for an empty weight, NaN/Inf values,
// values that overflow the cluster dtype, or shapes that do not fit the config.
//
// `importance` (optional; no gradient) weighs each weight in the centroid updates and the
// inertia, as init_palette's does in the first palette:
//     c_j' = sum_i f_i A_ij x_i / sum_i f_i A_ij ,   inertia = sum_i f_i min_j D_ij
// with f per clustered unit as Importance prepares it. Sensitivity-weighted k-means palettes (SqueezeLLM) otherwise drift
// back towards the unweighted optimum at every step. In unique-value space the multiplicities
// n_u become the summed importances F_u, and a weight's gradient through the palettes is f_i
// times the per-unit term. Not with method kEDKM.
DKMResult dkm(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
              const at::Tensor& scale = {}, const Importance& importance = {});

// dkm() for a training step that does not hold the soft-clustered weight between its uses.
// The constructor runs the iterations (the palette update) once; weight() then makes w~, without
// a graph, each time a layer needs it (its forward, and its recomputation when the layer is
// checkpointed); backward() carries dL/dw~, summed over every use of w~ in the step
// (micro-batches, learners), through DKM to dL/dw. One backward of the sum equals the sum of
// the backwards because DKM's backward is linear in dL/dw~ and its Jacobian depends only on the
// weight and the starting palette, the same at every use.
// What is held in between: for the unique-value methods (kAuto, kUnique), the value index and
// the O(U k T) iteration state, so with the pattern index (16-bit cluster dtype, scalar
// clustering) nothing N-sized; for kDense and kEDKM, w~ and, when grad mode is on, its graph,
// as dkm() would (made with grad mode off, they refuse backward()).
// The weight must not change before backward() (std::logic_error otherwise); the arguments are
// checked as dkm() checks them.
class DeferredDKM {
 public:
  DeferredDKM(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
              const at::Tensor& scale = {}, const Importance& importance = {});
  ~DeferredDKM();
  DeferredDKM(DeferredDKM&&) noexcept;
  DeferredDKM& operator=(DeferredDKM&&) noexcept;

  // [G, k, d] after the updates, detached: DKMResult::palette.
  const at::Tensor& palette() const { return palette_; }
  // w~ = DKMResult::weight, without a graph: shape, dtype and device of the weight.
  at::Tensor weight() const;
  // dL/dw (the weight's dtype and shape) from dL/dw~ (the weight's shape, any float dtype).
  at::Tensor backward(const at::Tensor& grad) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
  at::Tensor palette_;
};

// Hard assignment: the nearest centroid of each (scaled, rounded) weight or vector.
struct Palettized {
  at::Tensor indices;           // uint8 [rows, cols / d]
  at::Tensor palette;           // [G, k, d] fp32
  at::Tensor scale;             // [rows] fp32, or undefined without per-row scale
  std::vector<int64_t> shape;   // the original weight's shape
  int bits = 0;
  int cluster_dim = 1;
  int64_t group_size = 0;
};

Palettized palettize(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                     const at::Tensor& scale = {});
// W = C_g[index] * s, in the requested dtype, on the device of the indices.
at::Tensor depalettize(const Palettized& p, at::ScalarType dtype = at::kFloat);

// Weighted Lloyd k-means of points `values` [U, d] with multiplicities `counts` [U] (the
// distinct values of a weight and how often each occurs). Returns [k, d] centroids, sorted
// ascending for d = 1. Deterministic for a given seed. With kOptimal (d = 1 only) the centroids
// minimise the weighted squared error exactly (no seeding, no iterations).
at::Tensor weighted_kmeans(const at::Tensor& values, const at::Tensor& counts, int64_t k,
                           PaletteInit init, uint64_t seed, int max_iters);

// Round-to-nearest uniform quantization, the usual post-training baseline, with GPTQ's
// quantizer conventions: the range always contains 0; asymmetric uses
// scale = (max - min) / (2^b - 1) and zero = round(-min / scale); symmetric uses
// max = max(|min|, max), min = -max and zero = 2^(b-1).
struct RTNConfig {
  int bits = 4;
  // 0: one scale per tensor; g > 0: one scale (and zero point) per g consecutive weights of a
  // row, along the input dimension (the GPTQ / llama.cpp convention); when g does not divide
  // the row, its last group is shorter.
  int64_t group_size = 0;
  bool symmetric = false;
};
// Returns the quantize-dequantize weight (same shape and dtype).
at::Tensor rtn_quantize(const at::Tensor& weight, const RTNConfig& cfg);

// GPTQ (gptq.cpp): the same grid, each column rounded in turn and its error spread over the
// columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.
struct GPTQConfig {
  int bits = 4;
  // Columns per scale and zero point along a row (GPTQ's groupsize; 128 in the paper's grouped
  // results); 0: one grid per row.
  int64_t group_size = 128;
  bool symmetric = false;
  // H + damp * mean(diag H) * I is factorised (GPTQ's percdamp).
  double damp = 0.01;
  // Columns per lazy-batch block.
  int64_t block_size = 128;
  void validate() const;
};
// weight [rows, cols]; hessian [cols, cols] = sum over calibration inputs x of x x^T (any
// positive multiple). Returns the quantize-dequantize weight (same shape and dtype).
at::Tensor gptq_quantize(const at::Tensor& weight, const at::Tensor& hessian, const GPTQConfig& cfg);

}  // namespace edkm
