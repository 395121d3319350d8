// Hard k-means, hard assignment and round-to-nearest: against known answers.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "cluster/cluster.h"
#include "test_util.h"

namespace edkm {
namespace {

TEST(KMeans, RecoversWellSeparatedCentres) {
  at::manual_seed(11);
  const std::vector<double> centres{-3.0, -1.0, 0.5, 4.0};
  std::vector<at::Tensor> parts;
  for (double c : centres) parts.push_back(c + 0.05 * at::randn({200}, at::kDouble));
  at::Tensor x = at::cat(parts).unsqueeze(1);
  for (PaletteInit init : {PaletteInit::kKMeansPP, PaletteInit::kQuantile}) {
    at::Tensor C = weighted_kmeans(x, at::ones({x.size(0)}, at::kDouble), 4, init, 0, 100);
    for (int j = 0; j < 4; ++j) EXPECT_NEAR(C[j][0].item<double>(), centres[j], 0.02) << to_string(init);
  }
}

TEST(KMeans, MultiplicitiesActAsRepeatedPoints) {
  // Values 0, 1, 10 with counts 5, 1, 1 and k = 2: {0, 1} | {10} gives centroid 1/6.
  at::Tensor v = at::tensor({0.0, 1.0, 10.0}, at::kDouble).unsqueeze(1);
  at::Tensor n = at::tensor({5.0, 1.0, 1.0}, at::kDouble);
  at::Tensor C = weighted_kmeans(v, n, 2, PaletteInit::kQuantile, 0, 50);
  EXPECT_NEAR(C[0][0].item<double>(), 1.0 / 6.0, 1e-12);
  EXPECT_NEAR(C[1][0].item<double>(), 10.0, 1e-12);
}

TEST(KMeans, VectorCentres) {
  at::manual_seed(12);
  at::Tensor a = at::randn({100, 2}, at::kDouble) * 0.05 + at::tensor({1.0, -1.0}, at::kDouble);
  at::Tensor b = at::randn({100, 2}, at::kDouble) * 0.05 + at::tensor({-2.0, 3.0}, at::kDouble);
  at::Tensor C = weighted_kmeans(at::cat({a, b}), at::ones({200}, at::kDouble), 2, PaletteInit::kKMeansPP, 3, 100);
  at::Tensor sorted = std::get<0>(C.select(1, 0).sort());
  EXPECT_NEAR(sorted[0].item<double>(), -2.0, 0.03);
  EXPECT_NEAR(sorted[1].item<double>(), 1.0, 0.03);
}

// Weighted squared error of sorted scalars v (weights w) against centroids c, each point at its
// nearest centroid.
double sse(const std::vector<double>& v, const std::vector<double>& w, const at::Tensor& c) {
  double total = 0;
  for (size_t u = 0; u < v.size(); ++u) {
    double best = INFINITY;
    for (int64_t j = 0; j < c.size(0); ++j) best = std::min(best, std::pow(v[u] - c[j][0].item<double>(), 2));
    total += w[u] * best;
  }
  return total;
}

// The exact optimum against exhaustive search over every split of the sorted values into k runs
// (an optimal 1-D clustering is such a split), and never worse than Lloyd from any seed.
TEST(KMeans, OptimalIsTheExhaustiveOptimum) {
  at::manual_seed(3);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t U = 9 + trial % 4, k = 2 + trial % 3;
    at::Tensor v = std::get<0>(at::sort(at::randn({U}, at::kDouble) * (1 + trial)));
    at::Tensor w = at::randint(1, 50, {U}, at::kDouble);
    std::vector<double> x(v.data_ptr<double>(), v.data_ptr<double>() + U), m(w.data_ptr<double>(), w.data_ptr<double>() + U);
    auto run_cost = [&](int64_t a, int64_t b) {  // weighted SSE of x[a, b) about its weighted mean
      double W = 0, S = 0, c = 0;
      for (int64_t u = a; u < b; ++u) W += m[u], S += m[u] * x[u];
      for (int64_t u = a; u < b; ++u) c += m[u] * std::pow(x[u] - S / W, 2);
      return c;
    };
    double best = INFINITY;
    std::vector<int64_t> cut(k + 1);
    std::function<void(int64_t, int64_t, double)> search = [&](int64_t run, int64_t start, double acc) {
      if (run == k - 1) return void(best = std::min(best, acc + run_cost(start, U)));
      for (int64_t end = start + 1; end <= U - (k - 1 - run); ++end) search(run + 1, end, acc + run_cost(start, end));
    };
    search(0, 0, 0);
    at::Tensor c = weighted_kmeans(v.view({-1, 1}), w, k, PaletteInit::kOptimal, 0, 0);
    EXPECT_NEAR(sse(x, m, c), best, 1e-9 * std::max(1.0, best)) << trial;
    for (uint64_t seed = 0; seed < 5; ++seed)
      EXPECT_LE(sse(x, m, c), sse(x, m, weighted_kmeans(v.view({-1, 1}), w, k, PaletteInit::kKMeansPP, seed, 100)) + 1e-9);
  }
  // Fewer distinct values than k: each value is a centroid, the last repeated.
  at::Tensor c = weighted_kmeans(at::tensor({1.0, 2.0}).view({-1, 1}), at::tensor({3.0, 1.0}), 4, PaletteInit::kOptimal, 0, 0);
  EXPECT_TRUE(at::equal(c.view({-1}), at::tensor({1.0, 2.0, 2.0, 2.0}, at::kDouble)));
}

TEST(Palettize, RoundTripEqualsNearestCentroid) {
  at::manual_seed(13);
  for (int bits : {1, 2, 3, 4, 8}) {
    for (int64_t group : {0, 4}) {
      for (bool scaled : {false, true}) {
        DKMConfig cfg;
        cfg.bits = bits;
        cfg.group_size = group;
        cfg.per_row_scale = scaled;
        at::Tensor w = at::randn({8, 32}) * 0.02;
        at::Tensor s = scaled ? row_scales(w) : at::Tensor();
        at::Tensor C = init_palette(w, cfg, s);
        Palettized p = palettize(w, C, cfg, s);
        ASSERT_EQ(p.indices.scalar_type(), at::kByte);
        at::Tensor back = depalettize(p);
        // Brute force: each weight to its group's nearest centroid (ties to the lower index;
        // centroid 0 gets coremltools' prune bias).
        at::Tensor x = w / (scaled ? s.unsqueeze(1) : at::ones({8, 1}));
        x = x.to(at::kBFloat16).to(at::kFloat);
        const int64_t G = C.size(0), rpg = 8 / G;
        for (int64_t r = 0; r < 8; ++r) {
          for (int64_t c = 0; c < 32; ++c) {
            const float xv = x[r][c].item<float>();
            int64_t best = 0;
            float bd = 0;
            for (int64_t j = 0; j < C.size(1); ++j) {
              const float cj = C[r / rpg][j][0].item<float>();
              float dj = (xv - cj) * (xv - cj);
              if (j == 0) dj -= 1e-7f;
              if (j == 0 || dj < bd) bd = dj, best = j;
            }
            ASSERT_EQ(p.indices[r][c].item<int64_t>(), best) << bits << " " << r << "," << c;
            float want = C[r / rpg][best][0].item<float>() * (scaled ? s[r].item<float>() : 1.0f);
            ASSERT_EQ(back[r][c].item<float>(), want);
          }
        }
      }
    }
  }
}

TEST(RTN, HandComputedTwoBit) {
  at::Tensor w = at::tensor({-1.0f, -0.2f, 0.3f, 0.9f});
  // Asymmetric: scale = 1.9 / 3, zero = round(1 / scale) = 2, q = [0, 2, 2, 3].
  const float s = 1.9f / 3.0f;
  at::Tensor asym = rtn_quantize(w, {2, 0, false});
  EXPECT_TRUE(at::allclose(asym, at::tensor({-2 * s, 0.0f, 0.0f, s}), 1e-6, 1e-7)) << asym;
  // Symmetric: max = 1, scale = 2 / 3, zero = 2; -1.5 rounds half to even (-2).
  at::Tensor sym = rtn_quantize(w, {2, 0, true});
  EXPECT_TRUE(at::allclose(sym, at::tensor({-4.0f / 3, 0.0f, 0.0f, 2.0f / 3}), 1e-6, 1e-7)) << sym;
  // Groups of 2 along the row: [-1, -0.2] and [0.3, 0.9], each widened to contain 0.
  at::Tensor grouped = rtn_quantize(w.view({1, 4}), {2, 2, false});
  at::Tensor g0 = at::tensor({-1.0f, -1.0f / 3}), g1 = at::tensor({0.3f, 0.9f});
  EXPECT_TRUE(at::allclose(grouped.view({-1}).narrow(0, 0, 2), g0, 1e-6, 1e-7)) << grouped;
  EXPECT_TRUE(at::allclose(grouped.view({-1}).narrow(0, 2, 2), g1, 1e-6, 1e-7)) << grouped;
  EXPECT_THROW(rtn_quantize(w, {0, 0, false}), std::invalid_argument);
  // A ragged last group: [-1, -0.2, 0.3] and [0.9].
  at::Tensor ragged = rtn_quantize(w.view({1, 4}), {2, 3, false});
  EXPECT_TRUE(at::allclose(ragged.view({-1}).narrow(0, 3, 1), at::tensor({0.9f}), 1e-6, 1e-7)) << ragged;
}

}  // namespace
}  // namespace edkm
