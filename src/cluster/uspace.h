// Internal to cluster/: the DKM iterations over the distinct values of each group, with a
// hand-written backward (derivation in uspace.cpp and ../shared/design/unique-space-dkm.md).
//
// Inputs: values v [G, U, d], multiplicities n [G, U] (undefined = 1), the starting palette
// C^0 [G, k, d]. Everything is O(U k) per iteration and processed in chunks of U, so the same
// code serves the unique-value method (U <= 65,536) and the dense fallback (U = N).
#pragma once

#include <ATen/core/Tensor.h>

#include "cluster/cluster.h"
#include "cluster/kernels.h"

namespace edkm::detail {

struct SoftKMeans {
  double tau;
  double zero_threshold;
  double prune_threshold;
  double eps;
  int max_iters;
  static SoftKMeans from(const DKMConfig& cfg) {
    return {cfg.tau, cfg.zero_threshold, cfg.prune_threshold, cfg.eps, cfg.max_iters};
  }
};

// What the forward keeps for the backward: O(T G k d), nothing per value.
struct UniqueSpaceState {
  at::Tensor palettes;  // [T + 1, G, k, d]: C^0 .. C^T (a finished group's palette repeats)
  at::Tensor sums;      // [T, G, k]: S^t_j = sum_u n_u A^t_uj (unused past a group's T_g)
  at::Tensor iters;     // [G] int64: T_g, the updates group g made
};

// Runs the iterations; returns the state and writes the emitted value per distinct value,
// out_u = sum_j A^{T_g - 1}_uj C^{T_g}_j, into *out ([G, U, d]).
UniqueSpaceState uspace_forward(const at::Tensor& v, const at::Tensor& n, const at::Tensor& c0,
                                const SoftKMeans& p, at::Tensor* out, Kernels kernels = Kernels::kAuto);

struct UniqueSpaceGrad {
  at::Tensor jac;  // [G, U, d, d]: J_u^T, J_u = d out_u / d v_u with the palettes held fixed
  at::Tensor h;    // [G, U, d]: the gradient one weight of value u receives through the palettes
};

// g: dL/d out_u summed over the weights of each value ([G, U, d]).
UniqueSpaceGrad uspace_backward(const at::Tensor& v, const at::Tensor& n,
                                const UniqueSpaceState& state, const at::Tensor& g,
                                const SoftKMeans& p, Kernels kernels = Kernels::kAuto);

// The same two functions as host loops (uspace_host.cpp), one parallel pass over the values
// per iteration, for the common case: scalar clustering in fp64 with at most 65,536 values per
// group (the 16-bit and sorted indices), where the ATen code's ~300 small ops per matrix cost
// more in dispatch than the arithmetic (BENCHMARKS.md, "Pattern index: design measurements").
// That holds on a GPU too, where the ATen code took 1.0 to 2.1 ms per pass and matrix, a
// launch and a host synchronisation per op or iteration over tables of a few thousand rows
// ("edkm on NVIDIA GPUs"). For that case the dispatchers (kAuto) take, in CUDA builds, kernels
// for CUDA tensors (uspace_cuda.cu: one block per group, the early stop decided on the device,
// so nothing waits for the host); for tensors on other devices they copy the tables to the
// host, run the loops there, and copy the results back. The dense fallback (U = N) keeps the
// ATen code. The CUDA kernels lay the state out for max_iters updates ([max_iters + 1, G, k, d]
// palettes), the others for the most updates any group made; a group's own T_g is in iters
// either way, and past it its palette and sums repeat.
bool uspace_host_applies(const at::Tensor& v);
UniqueSpaceState uspace_forward_host(const at::Tensor& v, const at::Tensor& n, const at::Tensor& c0,
                                     const SoftKMeans& p, at::Tensor* out);
UniqueSpaceGrad uspace_backward_host(const at::Tensor& v, const at::Tensor& n,
                                     const UniqueSpaceState& state, const at::Tensor& g,
                                     const SoftKMeans& p);
#ifdef EDKM_CUDA
UniqueSpaceState uspace_forward_cuda(const at::Tensor& v, const at::Tensor& n, const at::Tensor& c0,
                                     const SoftKMeans& p, at::Tensor* out);
UniqueSpaceGrad uspace_backward_cuda(const at::Tensor& v, const at::Tensor& n,
                                     const UniqueSpaceState& state, const at::Tensor& g,
                                     const SoftKMeans& p);
#endif

}  // namespace edkm::detail
