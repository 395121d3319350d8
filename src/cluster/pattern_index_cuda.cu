// The CUDA backend of the pattern index (pattern_index.h), built only in CUDA builds: each pass
// is one kernel over the N weights of a CUDA tensor, one thread per weight in grid-stride loops.
//
// Every kernel recomputes a weight's key g * 65536 + pattern(round_R(w / s_r)) exactly as the
// host loops and prepare() do (the division in the compute dtype A, then a cast through fp32 to
// the rounding dtype R), so the tables built here equal the host backend's bit for bit.
//
// The histogram and the gradient sum are scatter-adds into a few thousand entries per group
// (a bell-shaped bf16 weight puts ~96% of its weights on ~1,500 patterns): one global atomic per
// weight would serialise on the hot entries. The lanes of a warp that hold the same key are
// found with __match_any_sync and their lowest lane adds their sum with one atomic
// (warp-aggregated atomics), so the hottest entries receive up to 32x fewer atomics. A shared
// memory histogram of all 65,536 patterns (256 KB in 32-bit counters) does not fit one block.
//
// The gradient sum is accumulated in fp64, as the other backends do. Atomics make the order of
// the additions, and hence the last bits of the sums, vary from run to run (as ATen's CUDA
// index_add_ does); emit and the input gradient are exact and deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "cluster/pattern_index.h"
#include "common/error.h"

namespace edkm::detail {
namespace {

constexpr int kThreads = 256;

// The compute dtype of a weight type: fp64 for fp64 weights, fp32 otherwise (compute_dtype()).
template <typename W>
using acc_t = std::conditional_t<std::is_same_v<W, double>, double, float>;

// Where weight i of the [rows, cols] matrix lies.
struct RowMap {
  int64_t cols;
  int64_t rows_per_group;
  const float* scale;  // [rows], or nullptr without per-row scale
};

// key = g * 65536 + the 16-bit pattern of round_R(w / s); `s` receives the row's scale (1 if none).
template <typename W, typename R>
__device__ __forceinline__ int64_t key_of(W w, int64_t i, const RowMap& m, acc_t<W>& s) {
  using A = acc_t<W>;
  const int64_t r = i / m.cols;
  A x = static_cast<A>(w);
  s = A(1);
  if (m.scale) {
    s = static_cast<A>(m.scale[r]);
    x = x / s;
  }
  const uint16_t pattern = R(static_cast<float>(x)).x;
  return (r / m.rows_per_group) * kPatterns + pattern;
}

// a * b + c rounded after each operation, as the host loop computes it: nvcc would otherwise
// contract it into one fused multiply-add and change the last bit.
__device__ __forceinline__ float mul_add_rn(float a, float b, float c) { return __fadd_rn(__fmul_rn(a, b), c); }
__device__ __forceinline__ double mul_add_rn(double a, double b, double c) { return __dadd_rn(__dmul_rn(a, b), c); }

// Adds v into table[slot] once per distinct slot among the lanes of the warp. Every lane of the
// warp calls it (inactive lanes with slot -1); `stage` is the warp's 32 entries of shared memory.
template <typename T>
__device__ __forceinline__ void warp_aggregated_add(T* table, int64_t slot, T v, T* stage) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, static_cast<unsigned long long>(slot));
  stage[lane] = v;
  __syncwarp();
  if (slot >= 0 && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
    T sum = 0;
    for (unsigned rest = peers; rest; rest &= rest - 1) sum += stage[__ffs(rest) - 1];
    atomicAdd(table + slot, sum);
  }
  __syncwarp();
}

// A grid-stride loop in which all 32 lanes of a warp take the same number of turns, as
// warp_aggregated_add needs: f(i, valid), `valid` false for the lanes past n in the last turn.
template <typename F>
__device__ __forceinline__ void for_each_weight_by_warps(int64_t n, F&& f) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const unsigned lane = threadIdx.x & 31u;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x + (threadIdx.x - lane); base < n; base += stride)
    f(base + lane, base + lane < n);
}

template <typename W, typename R>
__global__ void histogram_kernel(const W* w, int64_t n, RowMap m, unsigned long long* hist) {
  __shared__ unsigned long long stage[kThreads];
  unsigned long long* my_stage = stage + (threadIdx.x & ~31u);
  for_each_weight_by_warps(n, [&](int64_t i, bool valid) {
    acc_t<W> s;
    const int64_t key = valid ? key_of<W, R>(w[i], i, m, s) : -1;
    warp_aggregated_add(hist, key, 1ull, my_stage);
  });
}

// compact[slot_of[key]] += s_r * grad_i, in fp64.
template <typename W, typename R>
__global__ void gradient_sum_kernel(const W* w, const W* grad, int64_t n, RowMap m, const int32_t* slot_of,
                                    double* compact) {
  __shared__ double stage[kThreads];
  double* my_stage = stage + (threadIdx.x & ~31u);
  for_each_weight_by_warps(n, [&](int64_t i, bool valid) {
    int64_t slot = -1;
    double v = 0;
    if (valid) {
      acc_t<W> s;
      slot = slot_of[key_of<W, R>(w[i], i, m, s)];
      // The product in the compute dtype, as the host and ATen backends form it.
      acc_t<W> g = static_cast<acc_t<W>>(grad[i]);
      if (m.scale) g = g * s;
      v = static_cast<double>(g);
    }
    warp_aggregated_add(compact, slot, v, my_stage);
  });
}

// w~_i = s_r * lut[key]  (lut: the [G * 65536] table in the compute dtype).
template <typename W, typename R>
__global__ void emit_kernel(const W* w, int64_t n, RowMap m, const acc_t<W>* lut, W* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t<W> s;
    const acc_t<W> y = lut[key_of<W, R>(w[i], i, m, s)];
    out[i] = static_cast<W>(m.scale ? y * s : y);
  }
}

// dL/dw_i = J_u grad_i + h_u / s_r  (the [G * 65536] tables of J and h in the compute dtype).
template <typename W, typename R>
__global__ void input_grad_kernel(const W* w, const W* grad, int64_t n, RowMap m, const acc_t<W>* jac,
                                  const acc_t<W>* h, W* out) {
  using A = acc_t<W>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A s;
    const int64_t key = key_of<W, R>(w[i], i, m, s);
    A palette_path = h[key];
    if (m.scale) palette_path = palette_path / s;
    out[i] = static_cast<W>(mul_add_rn(jac[key], static_cast<A>(grad[i]), palette_path));
  }
}

class CudaPatternIndex final : public PatternIndex {
 public:
  CudaPatternIndex(const at::Tensor& weight, const GroupLayout& layout, const at::Tensor& scale,
                   at::ScalarType rounding)
      : PatternIndex(weight, layout, scale, rounding) {
    c10::cuda::CUDAGuard guard(weight_.device());
    build_tables(histogram());
    // Each present pattern's row of the compact [G * U] tables, for the gradient sum.
    slot_of_ = at::full({layout_.groups * kPatterns}, -1, weight_.options().dtype(at::kInt))
                   .index_put_({present_}, slot_.to(at::kInt));
  }

  at::Tensor emit(const at::Tensor& table) const override {
    c10::cuda::CUDAGuard guard(weight_.device());
    const at::Tensor lut = spread(table.to(compute_dtype(weight_)));
    at::Tensor out = at::empty_like(weight_);
    dispatch([&](auto w_tag, auto r_tag) {
      using W = decltype(w_tag);
      using R = decltype(r_tag);
      emit_kernel<W, R><<<blocks(), kThreads, 0, stream()>>>(weight_.data_ptr<W>(), n(), rows(),
                                                               lut.data_ptr<acc_t<W>>(), out.data_ptr<W>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  at::Tensor aggregate(const at::Tensor& grad) const override {
    c10::cuda::CUDAGuard guard(weight_.device());
    const at::Tensor g = grad.contiguous().to(weight_.scalar_type()).view(weight_.sizes());
    at::Tensor compact = at::zeros({layout_.groups * umax_}, weight_.options().dtype(at::kDouble));
    dispatch([&](auto w_tag, auto r_tag) {
      using W = decltype(w_tag);
      using R = decltype(r_tag);
      gradient_sum_kernel<W, R><<<blocks(), kThreads, 0, stream()>>>(
          weight_.data_ptr<W>(), g.data_ptr<W>(), n(), rows(), slot_of_.data_ptr<int32_t>(),
          compact.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return compact.view({layout_.groups, umax_, 1});
  }

  at::Tensor input_grad(const at::Tensor& grad, const at::Tensor& jac, const at::Tensor& h) const override {
    c10::cuda::CUDAGuard guard(weight_.device());
    const auto cdt = compute_dtype(weight_);
    const at::Tensor lj = spread(jac.to(cdt)), lh = spread(h.to(cdt));
    const at::Tensor g = grad.contiguous().to(weight_.scalar_type()).view(weight_.sizes());
    at::Tensor out = at::empty_like(weight_);
    dispatch([&](auto w_tag, auto r_tag) {
      using W = decltype(w_tag);
      using R = decltype(r_tag);
      input_grad_kernel<W, R><<<blocks(), kThreads, 0, stream()>>>(
          weight_.data_ptr<W>(), g.data_ptr<W>(), n(), rows(), lj.data_ptr<acc_t<W>>(),
          lh.data_ptr<acc_t<W>>(), out.data_ptr<W>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

 private:
  int64_t n() const { return weight_.numel(); }
  RowMap rows() const {
    return RowMap{layout_.cols, layout_.rows_per_group, scale_.defined() ? scale_.data_ptr<float>() : nullptr};
  }
  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }
  // Enough blocks to fill the GPU several times over; the grid-stride loops cover the rest.
  int blocks() const {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    return static_cast<int>(std::max<int64_t>(1, std::min((n() + kThreads - 1) / kThreads, sms * 16)));
  }

  // Calls f(W{}, R{}) with the weight's element type and the rounding type.
  template <typename F>
  void dispatch(F&& f) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_.scalar_type(), "cuda_pattern_index", [&] {
      if (rounding_ == at::kHalf) f(scalar_t{}, c10::Half{});
      else f(scalar_t{}, c10::BFloat16{});
    });
  }

  at::Tensor histogram() const {
    at::Tensor hist = at::zeros({layout_.groups * kPatterns}, weight_.options().dtype(at::kLong));
    static_assert(sizeof(int64_t) == sizeof(unsigned long long), "int64 counts as unsigned long long");
    dispatch([&](auto w_tag, auto r_tag) {
      using W = decltype(w_tag);
      using R = decltype(r_tag);
      histogram_kernel<W, R><<<blocks(), kThreads, 0, stream()>>>(
          weight_.data_ptr<W>(), n(), rows(), reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return hist;
  }

  at::Tensor slot_of_;  // [G * 65536] int32: the compact row of each present pattern, else -1
};

}  // namespace

std::unique_ptr<ValueIndex> make_cuda_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                                    const at::Tensor& scale, at::ScalarType rounding) {
  EDKM_ASSERT(weight.device().is_cuda());
  return std::make_unique<CudaPatternIndex>(weight, layout, scale, rounding);
}

}  // namespace edkm::detail
