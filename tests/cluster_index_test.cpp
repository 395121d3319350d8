// The host loops of cluster/ against their device-generic ATen code: the passes of the 16-bit
// pattern index (both also against a direct computation from the prepared weight), the
// unique-value-space iterations (whose ATen code the DKM tests check against dense autograd),
// and QAT's fake quantization (whose gradients QAT.FakeQuantizeGradientsAreLsqPlus checks
// against LSQ+'s, derived by hand).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include <gtest/gtest.h>

#include "cluster/fake_quantize.h"
#include "cluster/layout.h"
#include "cluster/tiles.h"
#include "cluster/uspace.h"
#include "cluster/value_index.h"
#include "test_util.h"

namespace edkm::detail {
namespace {

TEST(PatternIndex, CpuKernelsMatchGenericPathAndDirectComputation) {
  at::manual_seed(7);
  for (at::ScalarType wdt : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (ClusterDType cd : {ClusterDType::kBFloat16, ClusterDType::kFloat16}) {
      for (auto [scaled, group] : {std::pair{false, 3}, std::pair{true, 5}, std::pair{false, 6}}) {
        SCOPED_TRACE(fmt::format("w={} cd={} scaled={} group={}", c10::toString(wdt), to_string(cd), scaled, group));
        DKMConfig cfg;
        cfg.cluster_dtype = cd;
        // The CPU loops take up to four rows of a group at a time: groups of 3, 5 and 6 rows
        // leave sets of 1, 2 and 3; 42 columns leave a tail after the unrolled loops.
        cfg.group_size = group;
        cfg.per_row_scale = scaled;
        at::Tensor w = (at::randn({30, 42}) * 0.02).to(wdt);
        GroupLayout layout = GroupLayout::of(w, cfg);
        at::Tensor s = scaled ? row_scales(w) : at::Tensor();
        auto fast = make_pattern_index(w, layout, cfg, s, Kernels::kAuto);
        auto slow = make_pattern_index(w, layout, cfg, s, Kernels::kGeneric);
        ASSERT_TRUE(at::equal(fast->values(), slow->values()));
        ASSERT_TRUE(at::equal(fast->counts(), slow->counts()));
        EXPECT_EQ(fast->counts().sum().item<double>(), double(w.numel()));

        // Independent reference: x = prepare(w); each weight's value is looked up by equality.
        at::Tensor x = prepare(w, layout, cfg, s).view({layout.groups, -1});
        at::Tensor table = at::randn(fast->values().sizes(), fast->values().options());
        at::Tensor eq = x.unsqueeze(-1) == fast->values().view({layout.groups, 1, -1});  // [G, n, U]
        ASSERT_TRUE((eq.sum(-1) == 1).all().item<bool>());
        at::Tensor u = eq.to(at::kLong).argmax(-1);                                       // [G, n]
        at::Tensor ref = table.view({layout.groups, -1}).gather(1, u).view({layout.rows, layout.cols});
        if (scaled) ref = ref * s.unsqueeze(1);
        ref = ref.to(wdt);
        EXPECT_TRUE(at::equal(fast->emit(table), ref));
        EXPECT_TRUE(at::equal(slow->emit(table), ref));

        at::Tensor G = at::randn(w.sizes()).to(wdt);
        at::Tensor Gs = G.to(x.scalar_type()).view({layout.rows, layout.cols});
        if (scaled) Gs = Gs * s.unsqueeze(1);
        at::Tensor agg_ref = at::zeros({layout.groups, table.size(1)}, at::kDouble)
                                 .scatter_add_(1, u, Gs.view({layout.groups, -1}).to(at::kDouble));
        EXPECT_LE(test::rel_err(fast->aggregate(G).view_as(agg_ref), agg_ref), 1e-6);
        EXPECT_LE(test::rel_err(slow->aggregate(G).view_as(agg_ref), agg_ref), 1e-6);

        at::Tensor jac = at::randn({layout.groups, table.size(1), 1, 1}, table.options());
        at::Tensor h = at::randn({layout.groups, table.size(1), 1}, table.options());
        at::Tensor gref = jac.view({layout.groups, -1}).gather(1, u) * G.to(x.scalar_type()).view({layout.groups, -1});
        at::Tensor hh = h.view({layout.groups, -1}).gather(1, u).view({layout.rows, layout.cols});
        if (scaled) hh = hh / s.unsqueeze(1);
        gref = (gref.view({layout.rows, layout.cols}) + hh).to(wdt);
        EXPECT_TRUE(at::allclose(fast->input_grad(G, jac, h).to(at::kDouble), gref.to(at::kDouble), 1e-6, 1e-7));
        EXPECT_TRUE(at::allclose(slow->input_grad(G, jac, h).to(at::kDouble), gref.to(at::kDouble), 1e-6, 1e-7));
      }
    }
  }
}

TEST(PatternIndex, LargeTensorFewDistinctValues) {
  // A bf16 rounding of N(0, 0.02) has a few thousand distinct values, whatever N is.
  at::manual_seed(8);
  DKMConfig cfg;
  at::Tensor w = at::randn({3072, 1000}) * 0.02;  // fp32: patterns computed 512 columns at a time
  GroupLayout layout = GroupLayout::of(w, cfg);
  auto index = make_pattern_index(w, layout, cfg, {});
  const int64_t U = index->values().size(1);
  EXPECT_GT(U, 1000);
  EXPECT_LT(U, 8000);
  at::Tensor distinct = std::get<0>(at::_unique2(w.to(at::kBFloat16).to(at::kFloat).view({-1})));
  EXPECT_EQ(U, distinct.numel());
  // 3M weights: each thread's fp32 gradient-sum tables are flushed into fp64 mid-way (every
  // 2^20 weights); the sums stay within fp32 rounding of the fp64 ones.
  at::Tensor G = at::randn(w.sizes());
  auto generic = make_pattern_index(w, layout, cfg, {}, Kernels::kGeneric);
  EXPECT_LE(test::rel_err(index->aggregate(G), generic->aggregate(G)), 1e-6);
}

TEST(PatternIndex, GradientSumsOfADominantValueStayExact) {
  // Where one value holds much of the weight (pruned zeros, a constant weight), its gradients
  // go to one table entry: fp32 partial sums of 2^18 equal gradients drifted by 0.3% for the
  // all-zero weight, and by 4e-7 for the half-pruned one. Such weights keep fp64 tables.
  at::manual_seed(11);
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  DKMConfig cfg;
  at::Tensor half_pruned = at::randn({4096, 1024}) * 0.02 * (at::rand({4096, 1024}) < 0.5);
  for (at::Tensor w : {half_pruned.to(at::kBFloat16), at::zeros({4096, 1024}, at::kBFloat16)}) {
    GroupLayout layout = GroupLayout::of(w, cfg);
    auto index = make_pattern_index(w, layout, cfg, {});
    auto generic = make_pattern_index(w, layout, cfg, {}, Kernels::kGeneric);
    for (at::Tensor G : {at::full(w.sizes(), 0.1).to(at::kBFloat16), at::rand(w.sizes()).to(at::kBFloat16)})
      EXPECT_LE(test::rel_err(index->aggregate(G), generic->aggregate(G)), 1e-12);
  }
  at::set_num_threads(threads);
}

TEST(PatternIndex, GradientSumsDoNotDependOnThreadTiming) {
  // Two threads split the rows; a group that straddles the split is summed from both halves in
  // a fixed order, so repeated runs give the same bits (bitwise resume relies on it).
  at::manual_seed(9);
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  for (int64_t group : {0, 256}) {  // 768 rows: 1 group, or 3 with the middle one split
    SCOPED_TRACE(fmt::format("group_size {}", group));
    DKMConfig cfg;
    cfg.group_size = group;
    at::Tensor w = (at::randn({768, 512}) * 0.02).to(at::kBFloat16);
    at::Tensor G = at::randn(w.sizes()).to(at::kBFloat16);
    GroupLayout layout = GroupLayout::of(w, cfg);
    auto index = make_pattern_index(w, layout, cfg, {});
    at::Tensor first = index->aggregate(G);
    for (int rep = 0; rep < 5; ++rep) EXPECT_TRUE(at::equal(index->aggregate(G), first));
    // The CPU loops sum in fp32 tables flushed into fp64, the ATen path in fp64 throughout.
    auto generic = make_pattern_index(w, layout, cfg, {}, Kernels::kGeneric);
    EXPECT_LE(test::rel_err(first, generic->aggregate(G)), 1e-7);
  }
  at::set_num_threads(threads);
}

TEST(PatternIndex, CudaTilesCoverEachGroupOnceWithinTheirBounds) {
  // The tiles of the CUDA backend's shared-memory kernels (tiles.h), checked on the host: a
  // weight counted twice or missed would pass unseen wherever every weight of a tile shares a
  // value. Every weight lies in exactly one tile, no tile crosses a group or is empty, none
  // exceeds max_size, and none is below half of min_size unless its group is.
  for (int64_t groups : {1, 2, 5})
    for (int64_t gw = 1; gw <= 200; ++gw)
      for (auto [lo, hi] : {std::pair<int64_t, int64_t>{1, 1}, {7, 13}, {16, 64}, {50, 300}, {90, 30}})
        for (int64_t target : {1, 3, 8, 64, 1000}) {
          const Tiles t = Tiles::of(groups, gw, lo, hi, target);
          SCOPED_TRACE(fmt::format("groups={} gw={} min={} max={} target={}", groups, gw, lo, hi, target));
          ASSERT_EQ(t.count, groups * t.per_group);
          std::vector<int> covered(groups * gw, 0);
          for (int64_t i = 0; i < t.count; ++i) {
            const int64_t g = t.group(i), b = t.begin(i), e = t.end(i);
            ASSERT_LT(b, e);
            ASSERT_LE(e - b, hi);
            ASSERT_TRUE(2 * (e - b) >= std::min(lo, hi) || e - b == gw || i % t.per_group == t.per_group - 1);
            ASSERT_GE(b, g * gw);
            ASSERT_LE(e, (g + 1) * gw);
            for (int64_t j = b; j < e; ++j) ++covered[j];
          }
          ASSERT_EQ(std::count(covered.begin(), covered.end(), 1), groups * gw);
        }
}

TEST(UniqueSpace, HostLoopsMatchAtenCode) {
  at::manual_seed(10);
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  struct Case {
    const char* what;
    int64_t k, U;
    bool counts;
  };
  // 3 x 6,000 values with k = 256 take more than the 2^22 map entries the host loops keep,
  // so each pass recomputes its maps.
  for (const Case& cs : {Case{"k=8", 8, 1300, true}, Case{"k=8 unit counts", 8, 300, false},
                         Case{"k=256 maps not kept", 256, 6000, true}}) {
    SCOPED_TRACE(cs.what);
    const int64_t G = 3, k = cs.k, U = cs.U;
    at::Tensor c0 = std::get<0>((at::randn({G, k, 1}, at::kDouble) * 0.02).sort(1));
    at::Tensor v = at::randn({G, U, 1}, at::kDouble) * 0.02;
    // Group 0 holds only its palette's own, well separated values: its palette settles at once
    // (but for the clamp's pull) and the group stops early, while the others run all four.
    c0[0].copy_(at::linspace(-10, 10, k, at::kDouble).view({k, 1}));
    v[0].copy_(c0[0].repeat({U / k + 1, 1}).narrow(0, 0, U));
    at::Tensor n;
    if (cs.counts) {
      n = at::randint(1, 50, {G, U}, at::kDouble);
      n[2].narrow(0, U - 7, 7).zero_();  // padding: a group with fewer values
    }
    DKMConfig cfg;
    cfg.max_iters = 4;
    cfg.eps = 1e-12;
    SoftKMeans p = SoftKMeans::from(cfg);
    at::Tensor out_host, out_aten;
    UniqueSpaceState host = uspace_forward(v, n, c0, p, &out_host, Kernels::kAuto);
    UniqueSpaceState aten = uspace_forward(v, n, c0, p, &out_aten, Kernels::kGeneric);
    ASSERT_TRUE(at::equal(host.iters, aten.iters));
    EXPECT_LT(host.iters[0].item<int64_t>(), 4);
    EXPECT_EQ(host.iters[1].item<int64_t>(), 4);
    EXPECT_LE(test::rel_err(out_host, out_aten), 1e-12);
    at::Tensor groups = at::arange(G, host.iters.options());
    EXPECT_LE(test::rel_err(host.palettes.index({host.iters, groups}), aten.palettes.index({aten.iters, groups})), 1e-12);

    at::Tensor g = at::randn({G, U, 1}, at::kDouble);
    UniqueSpaceGrad gh = uspace_backward(v, n, host, g, p, Kernels::kAuto);
    UniqueSpaceGrad ga = uspace_backward(v, n, aten, g, p, Kernels::kGeneric);
    EXPECT_LE(test::rel_err(gh.jac, ga.jac), 1e-10);
    EXPECT_LE(test::rel_err(gh.h, ga.h), 1e-10);

    // The host loops add their per-block sums in block order: one thread gives the same bits.
    at::set_num_threads(1);
    at::Tensor out_one;
    UniqueSpaceState one = uspace_forward(v, n, c0, p, &out_one, Kernels::kAuto);
    UniqueSpaceGrad g_one = uspace_backward(v, n, one, g, p, Kernels::kAuto);
    at::set_num_threads(2);
    EXPECT_TRUE(at::equal(out_one, out_host));
    EXPECT_TRUE(at::equal(g_one.h, gh.h));
  }
  at::set_num_threads(threads);
}

// The backward: rows whose grids put weights inside and beyond both ends of the grid, a scale
// below the floor (its values clamped to it, no gradient), and 301 columns, split unevenly
// between 2 threads; then rounding ties, which at::round breaks to even.
TEST(FakeQuantize, HostLoopsMatchAtenCode) {
  at::manual_seed(11);
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  const int64_t rows = 700, cols = 301;
  for (at::ScalarType wdt : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (int bits : {2, 3, 8}) {
      SCOPED_TRACE(fmt::format("w={} bits={}", c10::toString(wdt), bits));
      const test::FakeQuantizeCase c = test::fake_quantize_case(rows, cols, wdt, bits);
      const at::Tensor &w = c.weight, &scale = c.scale, &zero = c.zero, &grad = c.grad;
      const double maxq = c.maxq;
      scale[5] = 1e-9;  // a second scale below the floor, above 0
      const FakeQuantizePasses& host = fake_quantize_passes(w);
      const FakeQuantizePasses& aten = fake_quantize_passes(w, Kernels::kGeneric);
      ASSERT_NE(&host, &aten);
      // Both clamps are reached.
      const at::Tensor level = at::round(w.to(at::kFloat) / scale.clamp_min(kScaleFloor).unsqueeze(1) + zero.unsqueeze(1));
      EXPECT_TRUE((level < 0).any().item<bool>());
      EXPECT_TRUE((level > maxq).any().item<bool>());

      const FakeQuantizeRowGrads bh = host.backward(w, scale, zero, maxq, grad, w.sizes());
      const FakeQuantizeRowGrads ba = aten.backward(w, scale, zero, maxq, grad, w.sizes());
      EXPECT_TRUE(bh.weight.equal(ba.weight));
      for (auto [h, a] : {std::pair{bh.scale, ba.scale}, std::pair{bh.zero, ba.zero}}) {
        // The sums' order differs: within fp32 rounding of each row's sum of magnitudes.
        const at::Tensor bound = grad.abs().sum(1) * (maxq + 1) * 1e-6;
        EXPECT_TRUE(((h - a).abs() <= bound).all().item<bool>()) << (h - a).abs().max();
      }
      EXPECT_EQ(bh.scale[3].item<float>(), 0.f);
      EXPECT_EQ(bh.scale[5].item<float>(), 0.f);
      EXPECT_NE(bh.zero[3].item<float>(), 0.f);
    }
  }
  // w / s + z = 0.5, 1.5, ..., 6.5 exactly, inside the 3-bit grid: ds sums g (round(v) - v),
  // -0.5 for each tie rounded down (0.5, 2.5, 4.5, 6.5 to even) and +0.5 for each rounded up
  // (1.5, 3.5, 5.5): -0.5 (rounding half away from zero would give +3.5).
  const at::Tensor w = (at::arange(7, at::kFloat) * 0.5 + 0.25).view({1, 7});
  const at::Tensor scale = at::full({1}, 0.5f), zero = at::zeros({1}), grad = at::ones({1, 7});
  for (const FakeQuantizePasses* p : {&fake_quantize_passes(w), &fake_quantize_passes(w, Kernels::kGeneric)})
    EXPECT_EQ(p->backward(w, scale, zero, 7, grad, w.sizes()).scale.item<float>(), -0.5f);
  at::set_num_threads(threads);
}

}  // namespace
}  // namespace edkm::detail
