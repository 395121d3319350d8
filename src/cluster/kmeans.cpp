// Hard k-means: the initial palettes of DKM and the post-training k-means baseline.
//
// Clustering runs over the distinct values of a group with their multiplicities as weights,
// which is exact (k-means' objective sums over points, and equal points contribute equally) and
// turns millions of 16-bit weights into a few thousand weighted points. For scalars, Lloyd's
// assignment step is a binary search of the midpoints between sorted centroids over the sorted
// values, and the update step two prefix-sum differences, so one iteration costs O(k log U).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>

#include "cluster/cluster.h"
#include "cluster/layout.h"
#include "cluster/value_index.h"
#include "common/error.h"

namespace edkm {
namespace {

// Weighted points in fp64 on the CPU: x[u * d + a], w[u].
struct Points {
  int64_t d = 1;
  std::vector<double> x;
  std::vector<double> w;
  int64_t size() const { return static_cast<int64_t>(w.size()); }
  const double* at(int64_t u) const { return x.data() + u * d; }
};

double sq_dist(const double* a, const double* b, int64_t d) {
  double s = 0;
  for (int64_t i = 0; i < d; ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return s;
}

// A uniform draw in [0, total) that is the same on every platform (std's distributions are not).
double draw(std::mt19937_64& rng, double total) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53 * total;
}

int64_t sample(const std::vector<double>& weight, double total, std::mt19937_64& rng) {
  double r = draw(rng, total), acc = 0;
  for (size_t u = 0; u < weight.size(); ++u) {
    acc += weight[u];
    if (r < acc) return static_cast<int64_t>(u);
  }
  return static_cast<int64_t>(weight.size()) - 1;
}

// Weighted k-means++ (Arthur & Vassilvitskii 2007): each next seed is drawn with probability
// proportional to multiplicity times squared distance to the nearest seed so far.
std::vector<double> seed_kmeanspp(const Points& p, int64_t k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t U = p.size(), d = p.d;
  std::vector<double> C;
  int64_t first = sample(p.w, std::accumulate(p.w.begin(), p.w.end(), 0.0), rng);
  C.insert(C.end(), p.at(first), p.at(first) + d);
  std::vector<double> nearest(U), score(U);
  for (int64_t u = 0; u < U; ++u) nearest[u] = sq_dist(p.at(u), p.at(first), d);
  while (static_cast<int64_t>(C.size()) < k * d) {
    double total = 0;
    for (int64_t u = 0; u < U; ++u) total += score[u] = p.w[u] * nearest[u];
    if (!(total > 0)) break;
    int64_t next = sample(score, total, rng);
    C.insert(C.end(), p.at(next), p.at(next) + d);
    for (int64_t u = 0; u < U; ++u) nearest[u] = std::min(nearest[u], sq_dist(p.at(u), p.at(next), d));
  }
  return C;
}

// Centroid j at the weighted (j + 1/2) / k quantile, per coordinate.
std::vector<double> seed_quantile(const Points& p, int64_t k) {
  const int64_t U = p.size(), d = p.d;
  std::vector<double> C(k * d);
  std::vector<int64_t> order(U);
  const double total = std::accumulate(p.w.begin(), p.w.end(), 0.0);
  for (int64_t a = 0; a < d; ++a) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return p.at(i)[a] < p.at(j)[a]; });
    double acc = 0;
    int64_t pos = 0;
    for (int64_t j = 0; j < k; ++j) {
      const double q = (j + 0.5) / k * total;
      while (pos < U - 1 && acc + p.w[order[pos]] <= q) acc += p.w[order[pos++]];
      C[j * d + a] = p.at(order[pos])[a];
    }
  }
  return C;
}

// Seeds may coincide (a heavy value spans several quantiles) or run short (k-means++ with few
// distinct points): each missing or repeated seed becomes the point with the largest weighted
// distance to the seeds so far, deterministically.
std::vector<double> complete_seeds(const Points& p, std::vector<double> C, int64_t k) {
  const int64_t d = p.d;
  std::vector<double> out;
  auto contains = [&](const double* c) {
    for (size_t j = 0; j < out.size(); j += d)
      if (std::equal(c, c + d, out.begin() + j)) return true;
    return false;
  };
  for (size_t j = 0; j < C.size(); j += d)
    if (!contains(&C[j])) out.insert(out.end(), C.begin() + j, C.begin() + j + d);
  while (static_cast<int64_t>(out.size()) < k * d) {
    int64_t best = -1;
    double best_score = 0;
    for (int64_t u = 0; u < p.size(); ++u) {
      double nearest = INFINITY;
      for (size_t j = 0; j < out.size(); j += d) nearest = std::min(nearest, sq_dist(p.at(u), &out[j], d));
      if (p.w[u] * nearest > best_score) best_score = p.w[u] * nearest, best = u;
    }
    if (best < 0) break;
    out.insert(out.end(), p.at(best), p.at(best) + d);
  }
  return out;
}

// Lloyd for scalars over values sorted ascending: cluster j holds the values in
// (m_{j-1}, m_j], m_j the midpoint of sorted centroids j and j+1 (ties go to the lower index,
// as argmin does).
void lloyd_1d(const Points& p, std::vector<double>& C, int max_iters) {
  const int64_t U = p.size(), k = static_cast<int64_t>(C.size());
  std::vector<double> W(U + 1, 0), X(U + 1, 0);
  for (int64_t u = 0; u < U; ++u) {
    W[u + 1] = W[u] + p.w[u];
    X[u + 1] = X[u] + p.w[u] * p.x[u];
  }
  std::sort(C.begin(), C.end());
  for (int it = 0; it < max_iters; ++it) {
    std::vector<double> next(C);
    int64_t lo = 0;
    for (int64_t j = 0; j < k; ++j) {
      int64_t hi = U;
      if (j + 1 < k) {
        const double m = 0.5 * (C[j] + C[j + 1]);
        hi = std::upper_bound(p.x.begin(), p.x.end(), m) - p.x.begin();
      }
      hi = std::max(hi, lo);
      if (W[hi] - W[lo] > 0) next[j] = (X[hi] - X[lo]) / (W[hi] - W[lo]);
      lo = hi;
    }
    std::sort(next.begin(), next.end());
    if (next == C) break;
    C.swap(next);
  }
}

// Lloyd for vectors: nearest centroid by brute force, weighted means, empty clusters kept.
void lloyd_nd(const Points& p, std::vector<double>& C, int max_iters) {
  const int64_t U = p.size(), d = p.d, k = static_cast<int64_t>(C.size()) / d;
  std::vector<int64_t> label(U, -1);
  for (int it = 0; it < max_iters; ++it) {
    bool changed = false;
    for (int64_t u = 0; u < U; ++u) {
      int64_t best = 0;
      double bd = sq_dist(p.at(u), &C[0], d);
      for (int64_t j = 1; j < k; ++j) {
        double dj = sq_dist(p.at(u), &C[j * d], d);
        if (dj < bd) bd = dj, best = j;
      }
      changed |= label[u] != best;
      label[u] = best;
    }
    if (!changed) break;
    std::vector<double> sum(k * d, 0), wsum(k, 0);
    for (int64_t u = 0; u < U; ++u) {
      wsum[label[u]] += p.w[u];
      for (int64_t a = 0; a < d; ++a) sum[label[u] * d + a] += p.w[u] * p.at(u)[a];
    }
    for (int64_t j = 0; j < k; ++j)
      if (wsum[j] > 0)
        for (int64_t a = 0; a < d; ++a) C[j * d + a] = sum[j * d + a] / wsum[j];
  }
}

// The weighted k-means optimum of sorted scalars x_0 <= ... <= x_{U-1} with weights w_u: the
// clusters of an optimal solution are runs of consecutive values, so with
//   cost(j, i) = sum_{j <= u < i} w_u (x_u - mean_{j..i})^2 = Q(j, i) - S(j, i)^2 / W(j, i)
// (prefix sums of w, w x, w x^2) the optimum of m + 1 clusters over the first i values is
//   D_m(i) = min_{m <= j < i} D_{m-1}(j) + cost(j, i),   D_0(i) = cost(0, i).
// The minimising j is non-decreasing in i (cost satisfies the quadrangle inequality), so each
// row is computed by divide and conquer: O(k U log U) time, O(k U) memory for the argmins
// (Wang & Song 2011, Ckmeans.1d.dp; Gronlund et al. 2017).
std::vector<double> optimal_1d(const Points& p, int64_t k) {
  const int64_t U = p.size(), K = std::min(k, U);
  // Centred values keep Q - S^2 / W from cancelling for weights far from zero.
  double mean = 0, total = 0;
  for (int64_t u = 0; u < U; ++u) mean += p.w[u] * p.x[u], total += p.w[u];
  mean /= total;
  std::vector<double> W(U + 1, 0), S(U + 1, 0), Q(U + 1, 0);
  for (int64_t u = 0; u < U; ++u) {
    const double x = p.x[u] - mean;
    W[u + 1] = W[u] + p.w[u];
    S[u + 1] = S[u] + p.w[u] * x;
    Q[u + 1] = Q[u] + p.w[u] * x * x;
  }
  auto cost = [&](int64_t j, int64_t i) {
    const double w = W[i] - W[j], s = S[i] - S[j];
    return std::max(0.0, Q[i] - Q[j] - s * s / w);
  };
  std::vector<double> prev(U + 1), cur(U + 1);
  std::vector<std::vector<int32_t>> arg(K, std::vector<int32_t>(U + 1, 0));
  for (int64_t i = 1; i <= U; ++i) prev[i] = cost(0, i);
  for (int64_t m = 1; m < K; ++m) {
    // Rows i in [ilo, ihi] with their argmins known to lie in [jlo, jhi].
    std::function<void(int64_t, int64_t, int64_t, int64_t)> solve = [&](int64_t ilo, int64_t ihi, int64_t jlo,
                                                                        int64_t jhi) {
      if (ilo > ihi) return;
      const int64_t i = (ilo + ihi) / 2;
      int64_t best = std::max(jlo, m);
      double best_value = std::numeric_limits<double>::infinity();
      for (int64_t j = std::max(jlo, m); j <= std::min(jhi, i - 1); ++j) {
        const double v = prev[j] + cost(j, i);
        if (v < best_value) best_value = v, best = j;
      }
      cur[i] = best_value;
      arg[m][i] = static_cast<int32_t>(best);
      solve(ilo, i - 1, jlo, best);
      solve(i + 1, ihi, best, jhi);
    };
    solve(m + 1, U, m, U - 1);
    std::swap(prev, cur);
  }
  std::vector<double> C(K);
  for (int64_t m = K - 1, i = U; m >= 0; --m) {
    const int64_t j = m == 0 ? 0 : arg[m][i];
    C[m] = (S[i] - S[j]) / (W[i] - W[j]) + mean;
    i = j;
  }
  return C;
}

}  // namespace

at::Tensor weighted_kmeans(const at::Tensor& values, const at::Tensor& counts, int64_t k,
                           PaletteInit init, uint64_t seed, int max_iters) {
  if (k < 1) throw_invalid("weighted_kmeans: k must be >= 1, got {}", k);
  if (values.dim() != 2 || counts.dim() != 1 || values.size(0) != counts.size(0))
    throw_invalid("weighted_kmeans: expected values [U, d] and counts [U], got {} and {}",
                  c10::str(values.sizes()), c10::str(counts.sizes()));
  if (init == PaletteInit::kGiven) throw_invalid("weighted_kmeans: 'given' is not a seeding");
  at::Tensor keep = counts > 0;
  at::Tensor v = values.index({keep}).to(at::kCPU, at::kDouble).contiguous();
  at::Tensor n = counts.index({keep}).to(at::kCPU, at::kDouble).contiguous();
  if (v.size(0) == 0) throw_invalid("weighted_kmeans: no points with positive count");
  if (!at::isfinite(v).all().item<bool>()) throw_invalid("weighted_kmeans: values contain NaN or Inf");

  Points p;
  p.d = v.size(1);
  if (p.d == 1) {  // sorted scalars for lloyd_1d
    at::Tensor order = v.view({-1}).argsort();
    v = v.index_select(0, order).contiguous();
    n = n.index_select(0, order).contiguous();
  }
  p.x.assign(v.data_ptr<double>(), v.data_ptr<double>() + v.numel());
  p.w.assign(n.data_ptr<double>(), n.data_ptr<double>() + n.numel());

  std::vector<double> C;
  if (init == PaletteInit::kOptimal) {
    if (p.d != 1) throw_invalid("weighted_kmeans: 'optimal' clusters scalars, got points of {} dimensions", p.d);
    C = optimal_1d(p, k);
  } else {
    C = init == PaletteInit::kQuantile ? seed_quantile(p, k) : seed_kmeanspp(p, k, seed);
    C = complete_seeds(p, C, k);
    if (p.d == 1) lloyd_1d(p, C, max_iters); else lloyd_nd(p, C, max_iters);
  }
  // Fewer distinct points than k: repeat the last centroid.
  while (static_cast<int64_t>(C.size()) < k * p.d) C.insert(C.end(), C.end() - p.d, C.end());
  return at::from_blob(C.data(), {k, p.d}, at::kDouble).clone();
}

at::Tensor init_palette(const at::Tensor& weight, const DKMConfig& cfg, const at::Tensor& scale,
                        const at::Tensor& given, const Importance& importance) {
  using namespace detail;
  const GroupLayout layout = GroupLayout::of(weight, cfg);
  at::Tensor s = checked_scale(scale, layout, cfg, weight);
  const auto opts = weight.options().dtype(compute_dtype(weight));
  if (cfg.init == PaletteInit::kGiven) {
    if (!given.defined()) throw_invalid("init 'given' needs a palette");
    at::Tensor c = given.detach();
    if (c.dim() == 1 && layout.dim == 1) c = c.unsqueeze(1);
    if (c.dim() == 2) c = c.unsqueeze(0).expand({layout.groups, c.size(0), c.size(1)});
    return checked_palette(c.contiguous(), layout, cfg, weight).to(opts).clone();
  }
  if (given.defined()) throw_invalid("a palette was given but init is '{}'", to_string(cfg.init));
  at::NoGradGuard no_grad;
  const bool pattern = is_16bit(rounding_dtype(weight, cfg.cluster_dtype)) && layout.dim == 1;
  auto index = pattern ? make_pattern_index(weight, layout, cfg, s) : make_sorted_index(weight, layout, cfg, s);
  at::Tensor counts = index->counts();
  if (importance.defined())
    counts = value_weights(*index, checked_importance(importance, layout, weight), layout, s, weight);
  std::vector<at::Tensor> palettes;
  for (int64_t g = 0; g < layout.groups; ++g) {
    palettes.push_back(weighted_kmeans(index->values()[g], counts[g], cfg.k(), cfg.init,
                                       cfg.seed + static_cast<uint64_t>(g), cfg.kmeans_max_iters));
  }
  return at::stack(palettes).to(opts);
}

}  // namespace edkm
