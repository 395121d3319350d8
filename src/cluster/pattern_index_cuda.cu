// The CUDA backend of the pattern index (pattern_index.h), built only in CUDA builds: each pass
// is one kernel over the N weights of a CUDA tensor.
//
// Every kernel recomputes a weight's key g * 65536 + pattern(round_R(w / s_r)) exactly as the
// host loops and prepare() do (the division in the compute dtype A, then a cast through fp32 to
// the rounding dtype R), so the tables built here equal the host backend's bit for bit.
//
// The histogram and the gradient sum are scatter-adds into a few thousand entries per group (a
// bell-shaped bf16 weight puts ~96% of its weights on ~1,500 patterns): one global atomic per
// weight serialises on the hot entries (1.1 to 4.9 ms per LLaMA-7B matrix on an H200, 100 to 500
// times its bytes' time at HBM speed). Two ways to sum them, chosen once per index (CudaScatter):
//   shared tiles  one block per tile, a run of up to tens of thousands of weights inside one
//                 group (tiles.h), adds into a table in shared memory, then flushes its nonzero
//                 entries into the global one: one global atomic per entry and tile instead of
//                 one per weight. The histogram packs two 16-bit counters per 32-bit word, all
//                 65,536 patterns in 128 KB (a tile holds at most 65,535 weights, so a counter
//                 cannot overflow); the gradient sum keeps fp64 partial sums of the group's most
//                 frequent values, as many as the shared memory holds (all of them, usually), and
//                 adds the rest straight into the global table.
//   warp atomics  for small groups, where a tile's fixed cost (zeroing and flushing its table)
//                 would exceed its weights, and devices with less than 128 KB of shared memory per
//                 block: the lanes of a warp that hold the same key are found with
//                 __match_any_sync and their lowest lane adds their sum with one global atomic.
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
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cluster/pattern_index.h"
#include "cluster/tiles.h"
#include "common/error.h"

namespace edkm::detail {
namespace {

// scripts/cuda-emulation runs the kernels from here to "End of the kernels" on the host, a
// thread per CUDA thread, against the host loops.

constexpr int kThreads = 256;
// The shared-memory kernels: one block of kTileThreads per SM, since their tables fill most of it.
constexpr int kTileThreads = 1024;
// A tile of the histogram holds at most this many weights: a pattern's 16-bit counter cannot overflow.
constexpr int64_t kMaxHistogramTile = 65535;
// The shared tables need 128 KB per block (the histogram's); groups below this many weights take
// the warp atomics, since a tile's fixed cost (zeroing and flushing 32,768 words) would exceed them.
constexpr int64_t kSharedTableBytes = kPatterns * 2;
constexpr int64_t kMinTiledGroup = 65536;

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

// The same histogram by tiles (tiles.h): the block counts its tile's patterns in shared memory,
// two 16-bit counters per word (pattern p in bits 16 * (p & 1) of word p / 2), then adds the
// nonzero counts to the group's entries.
template <typename W, typename R>
__global__ void __launch_bounds__(kTileThreads)
    histogram_tiles_kernel(const W* w, RowMap m, Tiles tiles, unsigned long long* hist) {
  extern __shared__ unsigned int packed_counts[];  // kPatterns / 2 words
  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    for (int j = threadIdx.x; j < kPatterns / 2; j += blockDim.x) packed_counts[j] = 0;
    __syncthreads();
    for (int64_t i = tiles.begin(t) + threadIdx.x; i < tiles.end(t); i += blockDim.x) {
      acc_t<W> s;
      const unsigned p = static_cast<unsigned>(key_of<W, R>(w[i], i, m, s) & (kPatterns - 1));
      atomicAdd(packed_counts + (p >> 1), 1u << (16 * (p & 1)));
    }
    __syncthreads();
    unsigned long long* group_hist = hist + tiles.group(t) * kPatterns;
    for (int j = threadIdx.x; j < kPatterns / 2; j += blockDim.x) {
      const unsigned c = packed_counts[j];
      if (c & 0xFFFFu) atomicAdd(group_hist + 2 * j, static_cast<unsigned long long>(c & 0xFFFFu));
      if (c >> 16) atomicAdd(group_hist + 2 * j + 1, static_cast<unsigned long long>(c >> 16));
    }
    __syncthreads();  // the table is zeroed for the next tile only after every thread flushed
  }
}

// Which distinct values get a shared fp64 accumulator in the tiled gradient sum: `per_group` of
// them per group. Without tables (`of` null) every value has one, its row in the group's part of
// the compact [G * umax] table; otherwise `of` [G * 65536] gives a present pattern's accumulator
// or -1 (the pattern's sum goes straight to the global table), and `row` [G * per_group] the
// compact row each accumulator is flushed into.
struct HotValues {
  int64_t per_group;
  int64_t umax;
  const int32_t* of;
  const int32_t* row;

  __device__ int64_t accumulator(int64_t key, int64_t g, int32_t slot) const { return of ? of[key] : slot - g * umax; }
  __device__ int64_t flush_row(int64_t g, int64_t j) const { return row ? row[g * per_group + j] : g * umax + j; }
};

// The gradient sum by tiles: the block sums its tile's s_r * grad_i per value in shared memory,
// then adds the nonzero sums to the compact table.
template <typename W, typename R>
__global__ void __launch_bounds__(kTileThreads)
    gradient_sum_tiles_kernel(const W* w, const W* grad, RowMap m, Tiles tiles, const int32_t* slot_of,
                              HotValues hot, double* compact) {
  extern __shared__ double partial_sums[];  // hot.per_group entries
  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    for (int64_t j = threadIdx.x; j < hot.per_group; j += blockDim.x) partial_sums[j] = 0;
    __syncthreads();
    const int64_t g = tiles.group(t);
    for (int64_t i = tiles.begin(t) + threadIdx.x; i < tiles.end(t); i += blockDim.x) {
      acc_t<W> s;
      const int64_t key = key_of<W, R>(w[i], i, m, s);
      // The product in the compute dtype, as the other kernels and backends form it.
      acc_t<W> v = static_cast<acc_t<W>>(grad[i]);
      if (m.scale) v = v * s;
      const int32_t slot = slot_of[key];
      const int64_t a = hot.accumulator(key, g, slot);
      if (a >= 0) atomicAdd(partial_sums + a, static_cast<double>(v));
      else atomicAdd(compact + slot, static_cast<double>(v));
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < hot.per_group; j += blockDim.x)
      if (partial_sums[j] != 0) atomicAdd(compact + hot.flush_row(g, j), partial_sums[j]);
    __syncthreads();
  }
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

// End of the kernels.

class CudaPatternIndex final : public PatternIndex {
 public:
  CudaPatternIndex(const at::Tensor& weight, const GroupLayout& layout, const at::Tensor& scale,
                   at::ScalarType rounding, CudaScatter scatter)
      : PatternIndex(weight, layout, scale, rounding) {
    c10::cuda::CUDAGuard guard(weight_.device());
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    sms_ = props->multiProcessorCount;
    shared_bytes_ = static_cast<int64_t>(props->sharedMemPerBlockOptin);
    const bool fits = shared_bytes_ >= kSharedTableBytes;
    if (scatter.mode == CudaScatter::kSharedTiles && !fits)
      throw std::logic_error("shared tiles need " + std::to_string(kSharedTableBytes) +
                             " bytes of shared memory per block; the device has " + std::to_string(shared_bytes_));
    tiled_ = scatter.mode == CudaScatter::kSharedTiles ||
             (scatter.mode == CudaScatter::kAuto && fits && group_weights() >= kMinTiledGroup);
    const at::Tensor hist = histogram();
    build_tables(hist);
    // Each present pattern's row of the compact [G * U] tables, for the gradient sum.
    slot_of_ = at::full({layout_.groups * kPatterns}, -1, weight_.options().dtype(at::kInt))
                   .index_put_({present_}, slot_.to(at::kInt));
    if (tiled_) choose_hot_values(hist, scatter.max_hot);
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
      if (tiled_) {
        // A tile's fixed cost is zeroing and flushing hot_per_group_ accumulators.
        const Tiles tiles = Tiles::of(layout_.groups, group_weights(), 4 * hot_per_group_, n(), 2 * sms_);
        const HotValues hot{hot_per_group_, umax_, hot_of_.defined() ? hot_of_.data_ptr<int32_t>() : nullptr,
                            hot_row_.defined() ? hot_row_.data_ptr<int32_t>() : nullptr};
        const int64_t bytes = hot_per_group_ * static_cast<int64_t>(sizeof(double));
        auto kernel = gradient_sum_tiles_kernel<W, R>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
        kernel<<<tile_blocks(tiles), kTileThreads, bytes, stream()>>>(weight_.data_ptr<W>(), g.data_ptr<W>(), rows(),
                                                                     tiles, slot_of_.data_ptr<int32_t>(), hot,
                                                                     compact.data_ptr<double>());
      } else {
        gradient_sum_kernel<W, R><<<blocks(), kThreads, 0, stream()>>>(
            weight_.data_ptr<W>(), g.data_ptr<W>(), n(), rows(), slot_of_.data_ptr<int32_t>(),
            compact.data_ptr<double>());
      }
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
    auto* counts = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    dispatch([&](auto w_tag, auto r_tag) {
      using W = decltype(w_tag);
      using R = decltype(r_tag);
      if (tiled_) {
        // A tile's fixed cost is zeroing and flushing the 32,768 words of its counters.
        const Tiles tiles = Tiles::of(layout_.groups, group_weights(), kPatterns / 2, kMaxHistogramTile, 2 * sms_);
        auto kernel = histogram_tiles_kernel<W, R>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kSharedTableBytes)));
        kernel<<<tile_blocks(tiles), kTileThreads, kSharedTableBytes, stream()>>>(weight_.data_ptr<W>(), rows(), tiles,
                                                                                 counts);
      } else {
        histogram_kernel<W, R><<<blocks(), kThreads, 0, stream()>>>(weight_.data_ptr<W>(), n(), rows(), counts);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return hist;
  }

  // The gradient sum's shared accumulators: one per distinct value where the shared memory
  // holds them all (the usual case: a few thousand values, 8 bytes each), else the group's
  // most frequent values, ranked by the histogram.
  void choose_hot_values(const at::Tensor& hist, int64_t max_hot) {
    int64_t fit = shared_bytes_ / static_cast<int64_t>(sizeof(double));
    if (max_hot > 0) fit = std::min(fit, max_hot);
    if (umax_ <= fit) {
      hot_per_group_ = umax_;
      return;
    }
    hot_per_group_ = fit;
    const int64_t G = layout_.groups;
    const at::Tensor top = std::get<1>(at::topk(hist.view({G, kPatterns}), fit, /*dim=*/1));  // [G, fit] patterns
    const at::Tensor keys = top.add(at::arange(G, top.options()).mul_(kPatterns).unsqueeze(1)).view({-1});
    // A group with fewer than `fit` values also ranks absent patterns; their accumulators are
    // never added to, and a zero sum is not flushed.
    hot_of_ = at::full({G * kPatterns}, -1, slot_of_.options())
                  .index_put_({keys}, at::arange(fit, slot_of_.options()).repeat({G}));
    hot_row_ = slot_of_.index_select(0, keys);
  }

  int64_t group_weights() const { return layout_.rows_per_group * layout_.cols; }
  // One block per tile, at most as many as fit on the GPU at once (one per SM: their shared
  // tables fill it); the blocks loop over the tiles.
  int tile_blocks(const Tiles& tiles) const { return static_cast<int>(std::max<int64_t>(1, std::min(tiles.count, sms_))); }

  int64_t sms_ = 0;
  int64_t shared_bytes_ = 0;  // the shared memory a block may opt in to
  bool tiled_ = false;        // the scatter-adds sum by tiles in shared memory
  int64_t hot_per_group_ = 0;  // the tiled gradient sum's shared accumulators per group
  at::Tensor hot_of_;          // [G * 65536] int32: a pattern's accumulator, or -1; undefined: all have one
  at::Tensor hot_row_;         // [G * hot_per_group_] int32: each accumulator's compact row
  at::Tensor slot_of_;  // [G * 65536] int32: the compact row of each present pattern, else -1
};

}  // namespace

std::unique_ptr<ValueIndex> make_cuda_pattern_index(const at::Tensor& weight, const GroupLayout& layout,
                                                    const at::Tensor& scale, at::ScalarType rounding,
                                                    CudaScatter scatter) {
  EDKM_ASSERT(weight.device().is_cuda());
  return std::make_unique<CudaPatternIndex>(weight, layout, scale, rounding, scatter);
}

}  // namespace edkm::detail
