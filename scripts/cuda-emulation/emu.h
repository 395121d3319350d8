// A host emulation of the CUDA features edkm's kernels use, for checking their logic where no GPU
// is at hand (run.sh). Every CUDA thread of a block is an OS thread; blocks run one after another;
// __syncthreads and __syncwarp are barriers of the block's and the warp's threads; atomics are
// compare-and-swap loops; __match_any_sync and __shfl_down_sync exchange the lanes' values through
// a warp barrier. What it cannot show: timing, memory limits, and anything that depends on warps
// running in lockstep, which the kernels do not assume. C++17.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {

class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  unsigned n_, arrived_ = 0, gen_ = 0;
};

struct Dim3 {
  unsigned x = 0;
};

struct Block {
  std::unique_ptr<Barrier> all;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<unsigned long long> lane_values;  // __match_any_sync's exchange, 32 per warp
};

inline Block* block;
inline std::vector<double> dynamic_shared(1 << 17);  // 1 MiB, more than any GPU gives a block

// Runs kernel() once per CUDA thread of a grid<<<grid, threads>>>, block by block.
template <typename F>
void launch(unsigned grid, unsigned threads, F kernel);

}  // namespace emu

inline thread_local emu::Dim3 threadIdx;
inline emu::Dim3 blockIdx, gridDim, blockDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

inline void __syncthreads() { emu::block->all->wait(); }
inline void __syncwarp() { emu::block->warps[threadIdx.x / 32]->wait(); }

template <typename T>
T atomicAdd(T* p, T v) {
  T old, sum;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    sum = old + v;
  } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  return old;
}

// The lanes of the calling thread's warp whose value equals its own (all 32 lanes take part).
inline unsigned __match_any_sync(unsigned, unsigned long long value) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned long long* values = emu::block->lane_values.data() + warp * 32;
  values[lane] = value;
  __syncwarp();
  unsigned mask = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (values[l] == value) mask |= 1u << l;
  __syncwarp();
  return mask;
}

// The value of lane + delta of the calling thread's warp (its own where that is past the warp),
// exchanged through a warp barrier; all 32 lanes take part.
inline double __shfl_down_sync(unsigned, double value, unsigned delta) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned long long* values = emu::block->lane_values.data() + warp * 32;
  __builtin_memcpy(&values[lane], &value, sizeof value);
  __syncwarp();
  double out = value;
  if (lane + delta < 32) __builtin_memcpy(&out, &values[lane + delta], sizeof out);
  __syncwarp();
  return out;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
// Host arithmetic rounds each operation (no contraction at -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

template <typename T>
T* emu_dynamic_shared() {
  return reinterpret_cast<T*>(emu::dynamic_shared.data());
}

template <typename F>
void emu::launch(unsigned grid, unsigned threads, F kernel) {
  gridDim.x = grid;
  blockDim.x = threads;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    Block blk;
    blk.all = std::make_unique<Barrier>(threads);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) blk.warps.push_back(std::make_unique<Barrier>(32));
    blk.lane_values.resize(((threads + 31) / 32) * 32);
    block = &blk;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&kernel, t] {
        threadIdx.x = t;
        kernel();
      });
    for (auto& th : pool) th.join();
  }
}
