// pattern_index_cuda.cu's kernels, emulated on the host (emu.h), against sequential loops over
// the same keys: the histogram and the gradient sum both ways (shared-memory tiles, all values
// or 64 of them shared; warp-aggregated atomics), emit and the input gradient. fp32 and bf16
// weights, bf16 and fp16 rounding, per-row scales, 1 to 16 groups, a bell-shaped and a pruned
// weight (all-zero rows). Exit status 1 on a mismatch.
#include "emu.h"
#include "check.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdio>
#include <type_traits>

#include "cluster/pattern_index.h"
#include "cluster/tiles.h"

namespace edkm::detail::emulated {
#include "pattern_index_kernels.inc"
}  // namespace edkm::detail::emulated

using namespace edkm::detail;
namespace em = edkm::detail::emulated;

// Threads per emulated block: fewer than the kernels launch with on a GPU (their loops stride by
// blockDim, so any multiple of 32 runs the same code), since each is an OS thread.
constexpr unsigned kBlock = 64;

template <typename W, typename R>
bool check(const at::Tensor& w_in, int64_t rows_per_group, bool scaled, unsigned sms) {
  using A = em::acc_t<W>;
  const at::Tensor w = w_in.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1), G = rows / rows_per_group, gw = rows_per_group * cols;
  const int64_t N = rows * cols;
  const at::Tensor s = scaled ? (w.to(at::kFloat).abs().amax(1) + 1e-3).contiguous() : at::Tensor();
  const em::RowMap m{cols, rows_per_group, scaled ? s.data_ptr<float>() : nullptr};
  const W* wp = w.data_ptr<W>();
  auto key = [&](int64_t i, A& sc) { return em::key_of<W, R>(wp[i], i, m, sc); };

  // The references, one weight after another.
  std::vector<int64_t> hist_ref(G * kPatterns, 0);
  for (int64_t i = 0; i < N; ++i) {
    A sc;
    ++hist_ref[key(i, sc)];
  }
  int64_t umax = 0;
  for (int64_t g = 0; g < G; ++g)
    umax = std::max<int64_t>(umax, std::count_if(hist_ref.begin() + g * kPatterns, hist_ref.begin() + (g + 1) * kPatterns,
                                                 [](int64_t c) { return c > 0; }));
  std::vector<int32_t> slot_of(G * kPatterns, -1);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t p = 0, u = 0; p < kPatterns; ++p)
      if (hist_ref[g * kPatterns + p]) slot_of[g * kPatterns + p] = static_cast<int32_t>(g * umax + u++);
  const at::Tensor grad = at::randn(w.sizes()).to(w.scalar_type()).contiguous();
  const W* gp = grad.data_ptr<W>();
  at::Tensor sums_ref = at::zeros({G * umax}, at::kDouble);
  for (int64_t i = 0; i < N; ++i) {
    A sc;
    const int64_t k = key(i, sc);
    A v = static_cast<A>(gp[i]);
    if (m.scale) v = v * sc;
    sums_ref.data_ptr<double>()[slot_of[k]] += static_cast<double>(v);
  }
  const auto acc_dtype = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  const at::Tensor lut = at::randn({G * kPatterns}, acc_dtype), lj = at::randn({G * kPatterns}, acc_dtype);
  const at::Tensor lh = at::randn({G * kPatterns}, acc_dtype);
  at::Tensor emit_ref = at::empty_like(w), grad_ref = at::empty_like(w);
  for (int64_t i = 0; i < N; ++i) {
    A sc;
    const int64_t k = key(i, sc);
    const A y = lut.data_ptr<A>()[k];
    emit_ref.data_ptr<W>()[i] = static_cast<W>(m.scale ? y * sc : y);
    A h = lh.data_ptr<A>()[k];
    if (m.scale) h = h / sc;
    grad_ref.data_ptr<W>()[i] = static_cast<W>(em::mul_add_rn(lj.data_ptr<A>()[k], static_cast<A>(gp[i]), h));
  }

  bool ok = true;
  auto report = [&](const char* what, bool good, double err) {
    ok = ok && good;
    std::printf("%s %-9s %-22s G=%-3ld scaled=%d %s %.1e\n", good ? "ok  " : "FAIL", c10::toString(w.scalar_type()),
                what, long(G), int(scaled), std::is_same_v<R, c10::Half> ? "fp16" : "bf16", err);
  };
  // Histograms.
  {
    at::Tensor tiled = at::zeros({G * kPatterns}, at::kLong), warp = at::zeros({G * kPatterns}, at::kLong);
    const Tiles t = Tiles::of(G, gw, kPatterns / 2, em::kMaxHistogramTile, 2 * sms);
    emu::launch(std::min<int64_t>(t.count, sms), kBlock, [&] {
      em::histogram_tiles_kernel<W, R>(wp, m, t, reinterpret_cast<unsigned long long*>(tiled.data_ptr<int64_t>()));
    });
    emu::launch(sms, kBlock, [&] {
      em::histogram_kernel<W, R>(wp, N, m, reinterpret_cast<unsigned long long*>(warp.data_ptr<int64_t>()));
    });
    const at::Tensor want = at::from_blob(hist_ref.data(), {G * kPatterns}, at::kLong);
    report("histogram, tiles", at::equal(tiled, want), 0);
    report("histogram, warps", at::equal(warp, want), 0);
  }
  // Gradient sums.
  for (int64_t max_hot : {int64_t(0), int64_t(64)}) {
    int64_t per_group = umax;
    at::Tensor hot_of, hot_row;
    if (max_hot > 0 && umax > max_hot) {  // as CudaPatternIndex::choose_hot_values
      per_group = max_hot;
      const at::Tensor hist = at::from_blob(hist_ref.data(), {G, kPatterns}, at::kLong);
      const at::Tensor top = std::get<1>(at::topk(hist, max_hot, 1));
      const at::Tensor keys = top.add(at::arange(G, top.options()).mul_(kPatterns).unsqueeze(1)).view({-1});
      hot_of = at::full({G * kPatterns}, -1, at::kInt).index_put_({keys}, at::arange(max_hot, at::kInt).repeat({G}));
      hot_row = at::from_blob(slot_of.data(), {G * kPatterns}, at::kInt).index_select(0, keys).contiguous();
    }
    const em::HotValues hot{per_group, umax, hot_of.defined() ? hot_of.data_ptr<int32_t>() : nullptr,
                            hot_row.defined() ? hot_row.data_ptr<int32_t>() : nullptr};
    at::Tensor sums = at::zeros({G * umax}, at::kDouble);
    const Tiles t = Tiles::of(G, gw, 4 * per_group, N, 2 * sms);
    emu::launch(std::min<int64_t>(t.count, sms), kBlock, [&] {
      em::gradient_sum_tiles_kernel<W, R>(wp, gp, m, t, slot_of.data(), hot, sums.data_ptr<double>());
    });
    const double e = rel(sums, sums_ref);
    report(max_hot ? "gradient sum, 64 tiles" : "gradient sum, tiles", e < 1e-12, e);
  }
  {
    at::Tensor sums = at::zeros({G * umax}, at::kDouble);
    emu::launch(sms, kBlock, [&] {
      em::gradient_sum_kernel<W, R>(wp, gp, N, m, slot_of.data(), sums.data_ptr<double>());
    });
    const double e = rel(sums, sums_ref);
    report("gradient sum, warps", e < 1e-12, e);
  }
  // Emit and the input gradient.
  {
    at::Tensor out = at::empty_like(w), dw = at::empty_like(w);
    emu::launch(sms, kBlock, [&] {
      em::emit_kernel<W, R>(wp, N, m, lut.data_ptr<A>(), out.data_ptr<W>());
      em::input_grad_kernel<W, R>(wp, gp, N, m, lj.data_ptr<A>(), lh.data_ptr<A>(), dw.data_ptr<W>());
    });
    report("emit", at::equal(out, emit_ref), 0);
    report("input gradient", at::equal(dw, grad_ref), 0);
  }
  return ok;
}

int main() {
  at::manual_seed(3);
  // 128 x 600: several tiles per group at 1 and 2 groups; more tiles than blocks, so that a
  // block takes several, at 16 groups and in the gradient sums.
  const at::Tensor bell = at::randn({128, 600}) * 0.02;
  const at::Tensor pruned = bell * (at::rand({128, 600}) < 0.3) * (at::arange(128).remainder(7) != 0).unsqueeze(1);
  bool ok = true;
  for (const at::Tensor& base : {bell, pruned})
    for (int64_t rows_per_group : {128, 64, 8})
      for (bool scaled : {false, true}) {
        ok = check<float, c10::BFloat16>(base, rows_per_group, scaled, 4) && ok;
        ok = check<c10::BFloat16, c10::BFloat16>(base.to(at::kBFloat16), rows_per_group, scaled, 3) && ok;
      }
  ok = check<float, c10::Half>(bell, 128, true, 5) && ok;
  return ok ? 0 : 1;
}
