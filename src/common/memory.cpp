#include "common/memory.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/version.h>
#ifdef EDKM_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <atomic>
#include <fstream>
#include <mutex>
#include <string>

#include "common/error.h"

namespace edkm {
namespace {

int64_t status_field_kb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(key) + ":";
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) == 0) return std::stoll(line.substr(prefix.size()));
  }
  return 0;
}

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

void add_bytes(int64_t n) {
  int64_t now = g_current.fetch_add(n) + n;
  int64_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

// Wraps the default CPU allocator: each allocation carries a context holding the inner
// DataPtr and its size, so the deleter can subtract exactly what was added.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* base) : base_(base) {}

#if TORCH_VERSION_MAJOR >= 2 && TORCH_VERSION_MINOR >= 3
  c10::DataPtr allocate(size_t n) override { return wrap(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t n) const override { return wrap(n); }
#endif
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

 private:
  struct Context {
    c10::DataPtr inner;
    int64_t bytes;
  };
  static void release(void* ctx) {
    auto* c = static_cast<Context*>(ctx);
    g_current.fetch_sub(c->bytes);
    delete c;
  }
  c10::DataPtr wrap(size_t n) const {
    auto* ctx = new Context{base_->allocate(n), static_cast<int64_t>(n)};
    add_bytes(ctx->bytes);
    void* data = ctx->inner.get();
    c10::Device device = ctx->inner.device();
    return c10::DataPtr(data, ctx, &release, device);
  }
  c10::Allocator* base_;
};

}  // namespace

int64_t current_rss_bytes() { return status_field_kb("VmRSS") * 1024; }
int64_t peak_rss_bytes() { return status_field_kb("VmHWM") * 1024; }

void reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
}

void TensorMemory::install() {
  static std::once_flag once;
  std::call_once(once, [] {
    static CountingAllocator counting(c10::GetCPUAllocator());
    // Priority above the default (0) so that later registrations by libtorch do not win.
    c10::SetCPUAllocator(&counting, /*priority=*/10);
  });
}

namespace {

#ifdef EDKM_CUDA
// The device's index, with CUDA and its allocator started (their statistics refuse a device
// that nothing has used yet): an empty tensor there starts them.
c10::DeviceIndex cuda_index(const c10::Device& d) {
  at::empty({0}, at::TensorOptions().device(d));
  return d.has_index() ? d.index() : c10::cuda::current_device();
}
// The allocated-bytes statistic of a CUDA device: [0] is the aggregate over its memory pools.
auto cuda_allocated(const c10::Device& d) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(cuda_index(d)).allocated_bytes[0];
}
#endif

[[noreturn]] void uncounted(const c10::Device& d) {
  throw_invalid("tensor memory on {} is not counted{}", d.str(),
                d.is_cuda() ? " (this is not a CUDA build of edkm)" : "");
}

// The bytes held by tensors on `d` now, or their peak.
int64_t tensor_bytes(const c10::Device& d, bool peak) {
  if (d.is_cpu()) return peak ? g_peak.load() : g_current.load();
#ifdef EDKM_CUDA
  if (d.is_cuda()) {
    const auto stat = cuda_allocated(d);
    return peak ? stat.peak : stat.current;
  }
#endif
  uncounted(d);
}

}  // namespace

int64_t TensorMemory::current(const c10::Device& d) { return tensor_bytes(d, /*peak=*/false); }
int64_t TensorMemory::peak(const c10::Device& d) { return tensor_bytes(d, /*peak=*/true); }

void TensorMemory::reset_peak(const c10::Device& d) {
  if (d.is_cpu()) return g_peak.store(g_current.load());
#ifdef EDKM_CUDA
  if (d.is_cuda()) return c10::cuda::CUDACachingAllocator::resetPeakStats(cuda_index(d));
#endif
  uncounted(d);
}

}  // namespace edkm
