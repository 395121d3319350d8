// QAT's fake quantization on a GPU (fake_quantize.h), built only in CUDA builds: the forward and
// the backward as one kernel each, one block per row, each weight's arithmetic that of the host
// loop and the ATen code (fake_quantize_element.h). The ATen code makes about 6 passes over the
// weight in the forward and 15 in the backward, each reading and writing a weight-sized
// temporary in HBM; these read the weight (and the upstream gradient) once and write one
// weight-sized result.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cluster/fake_quantize.h"
#include "cluster/fake_quantize_element.h"

namespace edkm::detail {
namespace {

// scripts/cuda-emulation runs the kernels from here to "End of the kernels" on the host, a
// thread per CUDA thread, against the host loop.

constexpr int kThreads = 256;

// Each row's grid: scale (held at the floor for the values) and zero point, [rows] fp32.
struct RowGrid {
  const float* scale;
  const float* zero;
  float floor, top;
  __device__ float s(int64_t r) const { return scale[r] < floor ? floor : scale[r]; }
};

template <typename W>
__global__ void __launch_bounds__(kThreads) forward_kernel(const W* w, RowGrid grid, int64_t cols, W* out) {
  const int64_t r = blockIdx.x;
  const float s = grid.s(r), z = grid.zero[r];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const int64_t i = r * cols + c;
    out[i] = static_cast<W>(fake_quantized(static_cast<float>(w[i]), s, z, grid.top));
  }
}

// dL/dw per weight; the row's dL/ds and dL/dz summed in fp64, per thread and then over the block.
template <typename W>
__global__ void __launch_bounds__(kThreads) backward_kernel(const W* w, const float* g, RowGrid grid, int64_t cols,
                                                            W* dw, float* ds, float* dz) {
  __shared__ double s_part[kThreads], z_part[kThreads];
  const int64_t r = blockIdx.x;
  const float s = grid.s(r), z = grid.zero[r];
  double s_sum = 0, z_sum = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const int64_t i = r * cols + c;
    const FakeQuantizeTerms t = fake_quantize_terms(static_cast<float>(w[i]), s, z, grid.top, g[i]);
    dw[i] = static_cast<W>(t.dw);
    s_sum += t.ds;
    z_sum += t.dz;
  }
  s_part[threadIdx.x] = s_sum;
  z_part[threadIdx.x] = z_sum;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {  // blockDim.x: a power of 2
    if (threadIdx.x < half) {
      s_part[threadIdx.x] += s_part[threadIdx.x + half];
      z_part[threadIdx.x] += z_part[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    ds[r] = grid.scale[r] >= grid.floor ? static_cast<float>(s_part[0]) : 0.f;
    dz[r] = static_cast<float>(z_part[0]);
  }
}

// End of the kernels.

RowGrid grid_of(const at::Tensor& scale, const at::Tensor& zero, double maxq) {
  return {scale.data_ptr<float>(), zero.data_ptr<float>(), static_cast<float>(kScaleFloor), static_cast<float>(maxq)};
}

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

}  // namespace

at::Tensor fake_quantize_forward_cuda(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero,
                                      double maxq) {
  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor sc = scale.to(at::kFloat).contiguous(), zc = zero.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t rows = w.size(0), cols = w.size(1);
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "fake_quantize_forward_cuda", [&] {
    forward_kernel<scalar_t><<<rows, kThreads, 0, stream()>>>(w.data_ptr<scalar_t>(), grid_of(sc, zc, maxq), cols,
                                                                out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

FakeQuantizeRowGrads fake_quantize_backward_cuda(const at::Tensor& weight, const at::Tensor& scale,
                                                 const at::Tensor& zero, double maxq, const at::Tensor& grad,
                                                 at::IntArrayRef out) {
  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous(), G = grad.to(at::kFloat).contiguous();
  const at::Tensor sc = scale.to(at::kFloat).contiguous(), zc = zero.to(at::kFloat).contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  FakeQuantizeRowGrads r{at::empty(out, w.options()), at::empty({rows}, sc.options()), at::empty({rows}, sc.options())};
  if (rows == 0) return r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "fake_quantize_backward_cuda", [&] {
    backward_kernel<scalar_t><<<rows, kThreads, 0, stream()>>>(
        w.data_ptr<scalar_t>(), G.data_ptr<float>(), grid_of(sc, zc, maxq), cols, r.weight.data_ptr<scalar_t>(),
        r.scale.data_ptr<float>(), r.zero.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r;
}

}  // namespace edkm::detail
