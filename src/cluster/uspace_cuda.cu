// The DKM iterations in unique-value space on a GPU (uspace.h), built only in CUDA builds: the
// forward and the backward of uspace_host.cpp, one block per group, every iteration inside the
// kernel. The math and notation are uspace.cpp's; the order of the operations per value is the
// host loops', the order of the sums over values is not (per warp, then atomics), so results
// agree to rounding.
//
// Why kernels: the generic ATen code launched dozens of small kernels and synchronised with the
// host once per iteration (the early stop), 1.0 to 2.1 ms per pass and matrix on an H200; the
// host loops on copies of the tables still synchronise twice per pass. Here a group's early stop
// is decided in its block, and the state is laid out for max_iters updates (a group that stopped
// repeats its last palette and sums, as the host layout does past T_g), so nothing waits for the
// host.
//
// Per value the kernels need the softmax over all k centroids, per centroid sums over all
// values. Each pass therefore runs two sweeps over the block's values: the first keeps, per
// value, the softmax's normaliser (and the backward's dot product) in a [G, U, 3] scratch
// table; the second loops over the centroids outside, so that each thread adds one partial sum
// per centroid into shared memory, not one per value (k = 8 shared addresses would serialise
// U k atomics).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "cluster/uspace.h"

namespace edkm::detail {
namespace {

// scripts/cuda-emulation runs the kernels from here to "End of the kernels" on the host, a
// thread per CUDA thread, against the host loops.

constexpr int kThreads = 256;
constexpr int kScratch = 3;  // per value: min_j D_j, 1 / sum_j exp(Z_j), and the backward's dot

struct Params {
  double z, bias, neg_inv_tau, two_over_tau, eps;
  int max_iters;
};

// D_j = (v - C_j)^2 - b [j = 0].
__device__ __forceinline__ double distance(double v, double c, int j, const Params& p) {
  const double d = v - c;
  return d * d - (j == 0 ? p.bias : 0.0);
}

// The softmax of -D / tau over palette C as the host loops form it: Z_j = D_j (-1/tau) - m (-1/tau)
// with m = min_l D_l, P_j = exp(Z_j) / sum_l exp(Z_l).
struct Softmax {
  double m, inv;
  __device__ double prob(double v, double c, int j, const Params& p) const {
    return exp(distance(v, c, j, p) * p.neg_inv_tau - m * p.neg_inv_tau) * inv;
  }
};

__device__ Softmax softmax_of(double v, const double* C, int k, const Params& p) {
  double m = INFINITY;
  for (int j = 0; j < k; ++j) m = fmin(m, distance(v, C[j], j, p));
  Softmax s{m, 1.0};
  double sum = 0;
  for (int j = 0; j < k; ++j) sum += s.prob(v, C[j], j, p);
  s.inv = 1.0 / sum;
  return s;
}

// dL/dD_j through the clamp and the softmax (uspace_host.cpp's softmax_clamp_backward), given
// dL/dA_j = `up` and the value's dot = sum_l [P_l >= z] P_l dL/dA_l.
__device__ __forceinline__ double softmax_clamp_grad(double P, double up, double dot, const Params& p) {
  return P * ((P < p.z ? 0.0 : up) - dot) * p.neg_inv_tau;
}

// The sum over the 32 lanes of a warp, in lane 0 (every lane must call it). The blocks' sums over
// values then take one shared-memory atomic per warp: one per thread put all of a block's threads
// on the same k addresses, serialised.
__device__ __forceinline__ double warp_sum(double x) {
  for (unsigned offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// atomicAdd(to, the block's sum of x): called by every thread of the block.
__device__ __forceinline__ void block_add(double* to, double x) {
  x = warp_sum(x);
  if (threadIdx.x % 32 == 0) atomicAdd(to, x);
}

struct Values {
  const double* v;  // [G, U]
  const double* n;  // [G, U], or null: all 1
  int64_t U;
  __device__ double count(int64_t i) const { return n ? n[i] : 1.0; }
};

// One block per group. palettes [(I + 1), G, k], sums [I, G, k] (I = max_iters), iters [G],
// out [G, U]; shared memory: C, S, M (k each) and the inertia.
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Values vs, int k, const double* c0, Params p, double* palettes, double* sums, int64_t* iters,
                   double* out, double* scratch) {
  extern __shared__ double shared[];
  double *C = shared, *S = shared + k, *M = shared + 2 * k, *inertia = shared + 3 * k;
  __shared__ int T, stop;
  const int64_t g = blockIdx.x, G = gridDim.x, U = vs.U, base = g * U;
  const int I = p.max_iters;
  auto palette = [&](int t) { return palettes + (int64_t(t) * G + g) * k; };
  auto sums_at = [&](int t) { return sums + (int64_t(t) * G + g) * k; };
  for (int j = threadIdx.x; j < k; j += blockDim.x) C[j] = palette(0)[j] = c0[g * k + j];
  if (threadIdx.x == 0) T = stop = 0;
  double last = 0;  // thread 0's
  __syncthreads();
  for (int t = 0; t < I; ++t) {
    for (int j = threadIdx.x; j < k; j += blockDim.x) S[j] = M[j] = 0;
    if (threadIdx.x == 0) *inertia = 0;
    __syncthreads();
    double part = 0;
    for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
      const Softmax sm = softmax_of(vs.v[base + u], C, k, p);
      scratch[(base + u) * kScratch] = sm.m;
      scratch[(base + u) * kScratch + 1] = sm.inv;
      part += sm.m * vs.count(base + u);
    }
    block_add(inertia, part);
    for (int j = 0; j < k; ++j) {
      double s = 0, m = 0;
      for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
        const double vu = vs.v[base + u];
        const Softmax sm{scratch[(base + u) * kScratch], scratch[(base + u) * kScratch + 1]};
        const double a = fmax(sm.prob(vu, C[j], j, p), p.z) * vs.count(base + u);
        s += a;
        m += a * vu;
      }
      block_add(S + j, s);
      block_add(M + j, m);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int j = 0; j < k; ++j) {
        C[j] = palette(t + 1)[j] = M[j] / S[j];
        sums_at(t)[j] = S[j];
      }
      T = t + 1;
      if (t > 0 && fabs(*inertia - last) <= p.eps) stop = 1;
      last = *inertia;
    }
    __syncthreads();
    if (stop) break;
  }
  // The layout past T_g: the last palette and the last sums repeat.
  for (int t = T + 1; t <= I; ++t)
    for (int j = threadIdx.x; j < k; j += blockDim.x) palette(t)[j] = C[j];
  for (int t = T; t < I; ++t)
    for (int j = threadIdx.x; j < k; j += blockDim.x) sums_at(t)[j] = sums_at(T - 1)[j];
  if (threadIdx.x == 0) iters[g] = T;
  // out_u = sum_j A^{T-1}_uj C^T_j.
  const double* c_prev = palette(T - 1);
  for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
    const double vu = vs.v[base + u];
    const Softmax sm = softmax_of(vu, c_prev, k, p);
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += fmax(sm.prob(vu, c_prev[j], j, p), p.z) * C[j];
    out[base + u] = sum;
  }
}

// One block per group; gsum [G, U] (dL/d out_u), jac and h [G, U]. Shared memory: the palettes
// C^t and C^{t+1}, dL/dC^{t+1}, the emit's dL/dC^{T-1}, gM, gS and two accumulators (k each).
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Values vs, int k, const double* palettes, const double* sums, const int64_t* iters, Params p,
                    const double* gsum, double* jac, double* h, double* scratch) {
  extern __shared__ double shared[];
  double *Ct = shared, *Cn = shared + k, *g_next = shared + 2 * k, *g_prev = shared + 3 * k;
  double *gM = shared + 4 * k, *gS = shared + 5 * k, *acc = shared + 6 * k, *acc2 = shared + 7 * k;
  const int64_t g = blockIdx.x, G = gridDim.x, U = vs.U, base = g * U;
  const int T = static_cast<int>(iters[g]);
  auto palette = [&](int t) { return palettes + (int64_t(t) * G + g) * k; };
  auto sums_at = [&](int t) { return sums + (int64_t(t) * G + g) * k; };

  // (1) The emit with A^{T-1}: dL/dC^T (acc), dL/dC^{T-1} through its attention (acc2), and
  // J_u = sum_j w_uj (C^{T-1}_j - pbar_u) C^T_j, w_uj = (2 / tau) [P_uj >= z] P_uj.
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    Ct[j] = palette(T - 1)[j];
    Cn[j] = palette(T)[j];
    acc[j] = acc2[j] = 0;
  }
  __syncthreads();
  for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
    const double vu = vs.v[base + u], gu = gsum[base + u];
    const Softmax sm = softmax_of(vu, Ct, k, p);
    double dot = 0, pbar = 0, first = 0, wsum = 0;
    for (int j = 0; j < k; ++j) {
      const double P = sm.prob(vu, Ct[j], j, p);
      if (P >= p.z) dot += P * (Cn[j] * gu);
      pbar += P * Ct[j];
      const double w = P < p.z ? 0.0 : P * p.two_over_tau;
      first += Ct[j] * w * Cn[j];
      wsum += w * Cn[j];
    }
    jac[base + u] = first - pbar * wsum;
    h[base + u] = 0;
    scratch[(base + u) * kScratch] = sm.m;
    scratch[(base + u) * kScratch + 1] = sm.inv;
    scratch[(base + u) * kScratch + 2] = dot;
  }
  for (int j = 0; j < k; ++j) {
    double fin = 0, prev = 0;
    for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
      const double vu = vs.v[base + u], gu = gsum[base + u];
      const double* sc = scratch + (base + u) * kScratch;
      const double P = Softmax{sc[0], sc[1]}.prob(vu, Ct[j], j, p);
      fin += fmax(P, p.z) * gu;
      prev += -2 * softmax_clamp_grad(P, Cn[j] * gu, sc[2], p) * (vu - Ct[j]);
    }
    block_add(acc + j, fin);
    block_add(acc2 + j, prev);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    g_next[j] = acc[j];
    g_prev[j] = acc2[j];
  }

  // (2) Back through the updates C^{t+1} = M^t / S^t, t = T - 1 .. 0.
  for (int t = T - 1; t >= 0; --t) {
    __syncthreads();  // the previous step's reads of Ct, gM, gS and acc are done
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      Ct[j] = palette(t)[j];
      gM[j] = g_next[j] / sums_at(t)[j];
      gS[j] = -(g_next[j] * palette(t + 1)[j]) / sums_at(t)[j];
      acc[j] = 0;
    }
    __syncthreads();
    for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
      const double vu = vs.v[base + u];
      const Softmax sm = softmax_of(vu, Ct, k, p);
      double dot = 0, hu = 0;
      for (int j = 0; j < k; ++j) {
        const double P = sm.prob(vu, Ct[j], j, p);
        if (P >= p.z) dot += P * (gM[j] * vu + gS[j]);
        hu += fmax(P, p.z) * gM[j];
      }
      for (int j = 0; j < k; ++j) {
        const double P = sm.prob(vu, Ct[j], j, p);
        hu += 2 * softmax_clamp_grad(P, gM[j] * vu + gS[j], dot, p) * (vu - Ct[j]);
      }
      h[base + u] += hu;
      scratch[(base + u) * kScratch] = sm.m;
      scratch[(base + u) * kScratch + 1] = sm.inv;
      scratch[(base + u) * kScratch + 2] = dot;
    }
    for (int j = 0; j < k; ++j) {
      double cur = 0;
      for (int64_t u = threadIdx.x; u < U; u += blockDim.x) {
        const double vu = vs.v[base + u];
        const double* sc = scratch + (base + u) * kScratch;
        const double P = Softmax{sc[0], sc[1]}.prob(vu, Ct[j], j, p);
        cur += -2 * (softmax_clamp_grad(P, gM[j] * vu + gS[j], sc[2], p) * vs.count(base + u)) * (vu - Ct[j]);
      }
      block_add(acc + j, cur);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < k; j += blockDim.x) g_next[j] = acc[j] + (t == T - 1 ? g_prev[j] : 0.0);
  }
}

// End of the kernels.

Params params_of(const SoftKMeans& p) {
  return {p.zero_threshold, p.prune_threshold, -1.0 / p.tau, 2.0 / p.tau, p.eps, p.max_iters};
}

Values values_of(const at::Tensor& v, const at::Tensor& n) {
  return {v.data_ptr<double>(), n.defined() ? n.data_ptr<double>() : nullptr, v.size(1)};
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

}  // namespace

UniqueSpaceState uspace_forward_cuda(const at::Tensor& v_in, const at::Tensor& n_in, const at::Tensor& c0_in,
                                     const SoftKMeans& p, at::Tensor* out) {
  c10::cuda::CUDAGuard guard(v_in.device());
  const at::Tensor v = v_in.contiguous(), c0 = c0_in.to(at::kDouble).contiguous();
  const at::Tensor n = n_in.defined() ? n_in.to(at::kDouble).contiguous() : n_in;
  const int64_t G = v.size(0), U = v.size(1), k = c0.size(1), I = p.max_iters;
  const auto opts = v.options();
  UniqueSpaceState s{at::empty({I + 1, G, k, 1}, opts), at::empty({I, G, k}, opts), at::empty({G}, opts.dtype(at::kLong))};
  *out = at::empty_like(v);
  at::Tensor scratch = at::empty({G, U, kScratch}, opts);
  const size_t bytes = (3 * k + 1) * sizeof(double);
  forward_kernel<<<G, kThreads, bytes, stream()>>>(values_of(v, n), static_cast<int>(k), c0.data_ptr<double>(),
                                                    params_of(p), s.palettes.data_ptr<double>(), s.sums.data_ptr<double>(),
                                                    s.iters.data_ptr<int64_t>(), out->data_ptr<double>(),
                                                    scratch.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

UniqueSpaceGrad uspace_backward_cuda(const at::Tensor& v_in, const at::Tensor& n_in, const UniqueSpaceState& state,
                                     const at::Tensor& g_in, const SoftKMeans& p) {
  c10::cuda::CUDAGuard guard(v_in.device());
  const at::Tensor v = v_in.contiguous(), gsum = g_in.to(at::kDouble).contiguous();
  const at::Tensor n = n_in.defined() ? n_in.to(at::kDouble).contiguous() : n_in;
  const at::Tensor palettes = state.palettes.contiguous(), sums = state.sums.contiguous();
  const at::Tensor iters = state.iters.contiguous();
  const int64_t G = v.size(0), U = v.size(1), k = palettes.size(2);
  const auto opts = v.options();
  UniqueSpaceGrad r{at::empty({G, U, 1, 1}, opts), at::empty({G, U, 1}, opts)};
  at::Tensor scratch = at::empty({G, U, kScratch}, opts);
  const size_t bytes = 8 * k * sizeof(double);
  backward_kernel<<<G, kThreads, bytes, stream()>>>(values_of(v, n), static_cast<int>(k), palettes.data_ptr<double>(),
                                                     sums.data_ptr<double>(), iters.data_ptr<int64_t>(), params_of(p),
                                                     gsum.data_ptr<double>(), r.jac.data_ptr<double>(),
                                                     r.h.data_ptr<double>(), scratch.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return r;
}

}  // namespace edkm::detail
