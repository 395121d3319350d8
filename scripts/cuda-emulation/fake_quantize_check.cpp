// fake_quantize_cuda.cu's kernels, emulated on the host (emu.h), against the host loop (the
// backward) and the ATen code (the forward): rows inside, below and above their grids, a scale
// below the floor, rounding ties, fp32, bf16 and fp64 weights at 2, 3 and 8 bits. Exit status 1
// on a mismatch.
#include "emu.h"

#include <ATen/ATen.h>

#include <cstdio>

#include "cluster/fake_quantize.h"
#include "cluster/fake_quantize_element.h"

namespace edkm::detail::emulated {
#include "fake_quantize_kernels.inc"
}  // namespace edkm::detail::emulated

using namespace edkm::detail;

// Threads per emulated block: fewer than the kernels launch with on a GPU (their loops stride by
// blockDim, and the reduction takes any power of 2), since each is an OS thread.
constexpr unsigned kBlock = 64;

int main() {
  at::manual_seed(17);
  const int64_t rows = 37, cols = 301;
  int failed = 0;
  for (at::ScalarType wdt : {at::kFloat, at::kBFloat16, at::kDouble})
    for (int bits : {2, 3, 8}) {
      const double maxq = double((1 << bits) - 1);
      at::Tensor w = at::randn({rows, cols}) * 0.05;
      at::Tensor scale = at::rand({rows}) * 0.1 / maxq + 1e-4, zero = at::rand({rows}) * maxq;
      scale[3] = 0;
      // Row 5: w / s + z = 0.5, 1.5, ... exactly, ties that round to even.
      scale[5] = 0.5;
      zero[5] = 0;
      w[5].copy_(at::arange(cols, at::kFloat).remainder(4) * 0.5 + 0.25);
      w = w.to(wdt);
      const at::Tensor grad = at::randn({rows, cols});
      const emulated::RowGrid grid{scale.data_ptr<float>(), zero.data_ptr<float>(), static_cast<float>(kScaleFloor),
                                   static_cast<float>(maxq)};
      const FakeQuantizePasses& aten = fake_quantize_passes(w, Kernels::kGeneric);
      const FakeQuantizePasses& host = fake_quantize_passes(w);
      const at::Tensor want = aten.forward(w, scale, zero, maxq);
      const FakeQuantizeRowGrads want_grad = host.backward(w, scale, zero, maxq, grad, w.sizes());
      at::Tensor out = at::empty_like(w), dw = at::empty_like(w), ds = at::empty({rows}), dz = at::empty({rows});
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, wdt, "check", [&] {
        emu::launch(rows, kBlock, [&] {
          emulated::forward_kernel<scalar_t>(w.data_ptr<scalar_t>(), grid, cols, out.data_ptr<scalar_t>());
        });
        emu::launch(rows, kBlock, [&] {
          emulated::backward_kernel<scalar_t>(w.data_ptr<scalar_t>(), grad.data_ptr<float>(), grid, cols,
                                              dw.data_ptr<scalar_t>(), ds.data_ptr<float>(), dz.data_ptr<float>());
        });
      });
      // The row sums in fp64 in another order, rounded to fp32: within 2 ulps.
      const double e_s = ((ds - want_grad.scale).abs() / want_grad.scale.abs().clamp_min(1e-30)).max().item<double>();
      const double e_z = ((dz - want_grad.zero).abs() / want_grad.zero.abs().clamp_min(1e-30)).max().item<double>();
      const bool ok = out.equal(want) && dw.equal(want_grad.weight) && e_s < 2.5e-7 && e_z < 2.5e-7 &&
                      ds[3].item<float>() == 0.f;
      failed += !ok;
      std::printf("%s %-8s bits %d: forward %s, dL/dw %s, dL/ds %.1e, dL/dz %.1e\n", ok ? "ok  " : "FAIL",
                  c10::toString(wdt), bits, out.equal(want) ? "equal" : "DIFFERS",
                  dw.equal(want_grad.weight) ? "equal" : "DIFFERS", e_s, e_z);
    }
  return failed ? 1 : 0;
}
