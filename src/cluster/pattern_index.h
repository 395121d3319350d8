// Internal to cluster/: the pattern index of value_index.h (16-bit cluster dtypes, scalar
// clustering), whose distinct values are the 16-bit patterns of the scaled and rounded weights.
//
// Every pass first spreads the per-value table over all 65,536 patterns of each group
// (O(G * 65536), independent of N), so that the per-weight work is one lookup; nothing N-sized
// is stored, each pass recomputes the patterns from the caller's weight. Two backends, chosen
// once when the index is built (make_pattern_index):
//   host  hand-written parallel loops over CPU tensors (pattern_index_host.cpp), with AVX-512
//         versions of the bf16 loops where the CPU has them (pattern_avx512.h);
//   CUDA  one kernel per pass over CUDA tensors, in CUDA builds (pattern_index_cuda.cu; its
//         scatter-adds sum in shared memory by tiles, or with warp-aggregated atomics);
//   ATen  chunked gathers and scatters of ATen ops, for tensors on any device
//         (pattern_index_aten.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cluster/value_index.h"

namespace edkm::detail {

constexpr int64_t kPatterns = 65536;

// The tables both backends share, built from the histogram of patterns [G * 65536].
class PatternIndex : public ValueIndex {
 protected:
  PatternIndex(const at::Tensor& weight, const GroupLayout& layout, const at::Tensor& scale,
               at::ScalarType rounding);

  // From the histogram (on any device): the patterns that occur, their rows in the [G * U]
  // tables, their decoded values and their counts. Throws std::invalid_argument
  // (throw_nonfinite) for patterns that are NaN or Inf.
  void build_tables(const at::Tensor& hist);
  // A [G, U, ...] per-value table laid out per pattern: [G * 65536] (absent patterns: 0).
  at::Tensor spread(const at::Tensor& table) const;

  at::Tensor weight_;  // contiguous
  GroupLayout layout_;
  at::Tensor scale_;   // [rows] fp32, or undefined
  at::ScalarType rounding_;
  int64_t umax_ = 0;
  at::Tensor present_;                 // positions in [G * 65536] of the patterns that occur
  at::Tensor slot_;                    // their rows in the flattened [G * U] tables
  std::vector<uint16_t> patterns_;     // the same patterns, on the host, group by group
  std::vector<int64_t> group_begin_;   // where each group starts in patterns_ (G + 1 entries)
  bool dominant_ = false;              // a value holds more than 1/256 of its group's weights
};

std::unique_ptr<ValueIndex> make_host_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                                    const at::Tensor& scale, at::ScalarType rounding);
#ifdef EDKM_CUDA
// How the CUDA backend sums its scatter-adds, the histogram and the gradient sum
// (pattern_index_cuda.cu): per-block tiles in shared memory, or warp-aggregated global atomics.
// kAuto takes the tiles where every group holds at least 65,536 weights and the device gives a
// block 128 KB of shared memory. Tests force each; max_hot (0: as many as the shared memory
// holds) caps the gradient sum's shared accumulators per group, so that tests reach the values
// that get none.
struct CudaScatter {
  enum Mode { kAuto, kWarpAtomics, kSharedTiles } mode = kAuto;
  int64_t max_hot = 0;
};
std::unique_ptr<ValueIndex> make_cuda_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                                    const at::Tensor& scale, at::ScalarType rounding,
                                                    CudaScatter scatter = {});
#endif
std::unique_ptr<ValueIndex> make_aten_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                                    const at::Tensor& scale, at::ScalarType rounding);

// Shared by the ATen passes of the indices.
// Rows per chunk: about a million weights at a time bounds the temporaries.
int64_t chunk_rows(int64_t cols);
// dL/dw = J^T G + h / s for a chunk of vectors. jac [V, d, d], grad [V, d], h [V, d] in the
// compute dtype; s [rows_c] or undefined, the chunk being rows_c whole rows.
at::Tensor combine_grad(const at::Tensor& jac, const at::Tensor& grad, const at::Tensor& h,
                        const at::Tensor& s, int64_t rows_c);
// The message for non-finite values after scaling and rounding: NaN/Inf in the weight itself,
// or finite values beyond the range of the cluster dtype.
[[noreturn]] void throw_nonfinite(const at::Tensor& weight, at::ScalarType rounding);

}  // namespace edkm::detail
