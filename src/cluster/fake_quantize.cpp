#include "cluster/fake_quantize.h"
#include "cluster/fake_quantize_element.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace edkm::detail {
namespace {

at::Tensor aten_forward(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero, double maxq) {
  const at::Tensor s = scale.clamp_min(kScaleFloor).unsqueeze(1), z = zero.unsqueeze(1);
  const at::Tensor q = at::round(weight.to(at::kFloat) / s + z).clamp_(0, maxq);
  return (s * (q - z)).to(weight.scalar_type());
}

FakeQuantizeRowGrads aten_backward(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero,
                                   double maxq, const at::Tensor& grad, at::IntArrayRef out) {
  const at::Tensor G = grad.to(at::kFloat);
  const at::Tensor s = scale.clamp_min(kScaleFloor).unsqueeze(1), z = zero.unsqueeze(1);
  const at::Tensor v = weight.to(at::kFloat) / s + z;
  const at::Tensor r = at::round(v);
  const at::Tensor inside = (r >= 0).logical_and_(r <= maxq);
  const at::Tensor none = at::zeros({}, G.options());
  const at::Tensor dw = at::where(inside.view(out), G.view(out), none).to(weight.scalar_type());
  const at::Tensor ds = at::where(inside, G * (r - v), G * (r.clamp(0, maxq) - z)).sum(1);
  const at::Tensor dz = at::where(inside, none, -G * s).sum(1);
  return {dw, at::where(scale >= kScaleFloor, ds, none), dz};
}

// Rows per task: about 64K weights.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, cols)); }

FakeQuantizeRowGrads host_backward(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero,
                                   double maxq, const at::Tensor& grad, at::IntArrayRef out) {
  const at::Tensor w = weight.contiguous(), G = grad.to(at::kFloat).contiguous();
  const at::Tensor sc = scale.to(at::kFloat).contiguous(), zc = zero.to(at::kFloat).contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor dw = at::empty(out, w.options());  // written as [rows, cols]
  at::Tensor ds = at::empty({rows}, sc.options()), dz = at::empty({rows}, sc.options());
  const float floor = static_cast<float>(kScaleFloor), top = static_cast<float>(maxq);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "fake_quantize_backward", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    const float *gp = G.data_ptr<float>(), *sp = sc.data_ptr<float>(), *zp = zc.data_ptr<float>();
    float *dsp = ds.data_ptr<float>(), *dzp = dz.data_ptr<float>();
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float s = std::max(sp[r], floor), z = zp[r];
        const scalar_t* wr = wp + r * cols;
        const float* g = gp + r * cols;
        scalar_t* d = dwp + r * cols;
        // Each term in fp32 as the ATen code makes it; the sums in fp64.
        double s_sum = 0, z_sum = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const FakeQuantizeTerms t = fake_quantize_terms(static_cast<float>(wr[c]), s, z, top, g[c]);
          d[c] = static_cast<scalar_t>(t.dw);
          s_sum += t.ds;
          z_sum += t.dz;
        }
        dsp[r] = sp[r] >= floor ? static_cast<float>(s_sum) : 0.f;
        dzp[r] = static_cast<float>(z_sum);
      }
    });
  });
  return {dw, ds, dz};
}

constexpr FakeQuantizePasses kAten{aten_forward, aten_backward};
// ATen's forward is already a few vectorized passes without reductions, and ATen's CPU kernels
// are built for AVX2 and AVX-512 where ours are not: a scalar fused loop was slower.
constexpr FakeQuantizePasses kHost{aten_forward, host_backward};

}  // namespace

const FakeQuantizePasses& fake_quantize_passes(const at::Tensor& weight, Kernels kernels) {
  if (kernels == Kernels::kAuto && weight.device().is_cpu()) return kHost;
#ifdef EDKM_CUDA
  static constexpr FakeQuantizePasses kCuda{fake_quantize_forward_cuda, fake_quantize_backward_cuda};
  if (kernels == Kernels::kAuto && weight.device().is_cuda()) return kCuda;
#endif
  return kAten;
}

}  // namespace edkm::detail
