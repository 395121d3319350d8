// uspace_cuda.cu's kernels, emulated on the host (emu.h), against the host loops
// (uspace_forward_host, uspace_backward_host): per-group early stops, pruning, k = 8 and 16,
// groups of different spreads, padding values of count 0. Exit status 1 on a mismatch.
#include "emu.h"
#include "check.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <utility>

#include "cluster/cluster.h"
#include "cluster/uspace.h"

namespace edkm::detail::emulated {
#include "uspace_kernels.inc"
}  // namespace edkm::detail::emulated

using namespace edkm;
using namespace edkm::detail;

// Threads per emulated block: fewer than the kernels launch with on a GPU (their loops stride by
// blockDim, so any multiple of 32 runs the same code), since each is an OS thread.
constexpr unsigned kBlock = 64;

static std::string iters_text(const at::Tensor& iters) {
  std::string s;
  for (int64_t g = 0; g < iters.numel(); ++g) s += (g ? " " : "") + std::to_string(iters[g].item<int64_t>());
  return s;
}

int main() {
  // Four groups of up to 500 values, two of them padded (values 0 of count 0) to the longest,
  // with heavy-tailed multiplicities.
  at::manual_seed(16);
  const int64_t G = 4, U = 500;
  const auto f64 = at::TensorOptions(at::kDouble);
  const at::Tensor v = at::randn({G, U, 1}, f64).mul_(0.02).mul_(at::arange(1, G + 1, f64).view({G, 1, 1}));
  const at::Tensor n = at::rand({G, U}, f64).pow_(6).mul_(200).ceil_();
  for (auto [g, len] : {std::pair<int64_t, int64_t>{1, 120}, {3, 7}}) {
    v[g].narrow(0, U - len, len).zero_();
    n[g].narrow(0, U - len, len).zero_();
  }
  int failed = 0;
  for (int bits : {3, 4})
    for (double prune : {0.0, 1e-4})
      for (int iters : {3, 10})
        for (double eps : {1e-4, 3e-3, 1e-2}) {
          DKMConfig cfg;
          cfg.bits = bits;
          cfg.prune_threshold = prune;
          cfg.max_iters = iters;
          cfg.eps = eps;
          const SoftKMeans p = SoftKMeans::from(cfg);
          const int64_t k = cfg.k(), I = p.max_iters;
          const at::Tensor c0 = std::get<0>(at::sort(at::randn({G, k, 1}, f64) * 0.02, 1)).contiguous();
          at::Tensor out_host;
          const UniqueSpaceState host = uspace_forward_host(v, n, c0, p, &out_host);
          UniqueSpaceState s{at::empty({I + 1, G, k, 1}, f64), at::empty({I, G, k}, f64),
                             at::empty({G}, f64.dtype(at::kLong))};
          at::Tensor out = at::empty_like(v), scratch = at::empty({G, U, emulated::kScratch}, f64);
          const emulated::Params ep{p.zero_threshold, p.prune_threshold, -1.0 / p.tau, 2.0 / p.tau, p.eps, p.max_iters};
          const emulated::Values vs{v.data_ptr<double>(), n.data_ptr<double>(), U};
          emu::launch(G, kBlock, [&] {
            emulated::forward_kernel(vs, static_cast<int>(k), c0.data_ptr<double>(), ep, s.palettes.data_ptr<double>(),
                                     s.sums.data_ptr<double>(), s.iters.data_ptr<int64_t>(), out.data_ptr<double>(),
                                     scratch.data_ptr<double>());
          });
          const at::Tensor g = at::randn({G, U, 1}, f64);
          const UniqueSpaceGrad want = uspace_backward_host(v, n, host, g, p);
          UniqueSpaceGrad r{at::empty({G, U, 1, 1}, f64), at::empty({G, U, 1}, f64)};
          emu::launch(G, kBlock, [&] {
            emulated::backward_kernel(vs, static_cast<int>(k), s.palettes.data_ptr<double>(), s.sums.data_ptr<double>(),
                                      s.iters.data_ptr<int64_t>(), ep, g.data_ptr<double>(), r.jac.data_ptr<double>(),
                                      r.h.data_ptr<double>(), scratch.data_ptr<double>());
          });
          const int64_t T = host.sums.size(0);
          const double e[] = {rel(s.palettes.narrow(0, 0, T + 1), host.palettes), rel(s.sums.narrow(0, 0, T), host.sums),
                              rel(out, out_host), rel(r.jac, want.jac), rel(r.h, want.h)};
          // Sums over values in another order; the gradients, through up to ten iterations and the
          // softmax's 1 / tau, to the tolerance the GPU test takes (Cuda.UniqueSpaceKernelsMatchTheHostLoops).
          const bool ok = at::equal(s.iters, host.iters) && e[0] < 1e-12 && e[1] < 1e-12 && e[2] < 1e-12 &&
                          e[3] < 1e-9 && e[4] < 1e-9;
          failed += !ok;
          std::printf("%s bits %d prune %g max_iters %2d eps %g: T_g %s; palettes %.1e sums %.1e out %.1e jac %.1e h %.1e\n",
                      ok ? "ok  " : "FAIL", bits, prune, iters, eps, iters_text(s.iters).c_str(), e[0], e[1], e[2],
                      e[3], e[4]);
        }
  return failed ? 1 : 0;
}
