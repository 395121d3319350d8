// DKM: the unique-value method against the dense autograd reference, finite differences, and
// the edge cases.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <fstream>
#include <functional>
#include <map>

#include "cluster/cluster.h"
#include "cluster/layout.h"
#include "cluster/straight_through.h"
#include "common/memory.h"
#include "test_util.h"

namespace edkm {
namespace {

using test::rel_err;

struct Grads {
  at::Tensor out, palette, grad;
  std::vector<int> iters;
};

// Forward and backward of sum(w~ * R) for a fixed random R.
Grads run(const at::Tensor& w0, const at::Tensor& palette, const DKMConfig& cfg,
          const at::Tensor& scale, const at::Tensor& R, const at::Tensor& importance = {}) {
  at::Tensor w = w0.detach().clone().requires_grad_(true);
  DKMResult r = dkm(w, palette, cfg, scale, importance.defined() ? Importance(importance, w, cfg) : Importance());
  (r.weight.to(at::kDouble) * R).sum().backward();
  return {r.weight.detach(), r.palette, w.grad(), r.iterations};
}

// The reference is the dense method (autograd through plain ATen ops) run in fp64 on the same
// prepared values: with tau = 1e-4 on raw weights a few weights near the midpoints between
// centroids dominate the gradient, and any fp32 computation of it (dense included) is only
// good to ~1e-3 there.
void expect_methods_agree(const at::Tensor& w, const DKMConfig& base, const std::string& what,
                          double tol = 1e-4, const at::Tensor& importance = {}) {
  at::Tensor scale = base.per_row_scale ? row_scales(w) : at::Tensor();
  at::Tensor palette = init_palette(w, base, scale);
  at::Tensor R = at::randn(w.sizes(), at::kDouble);
  DKMConfig dense = base;
  dense.method = DKMMethod::kDense;
  // fp64 rounds to fp32 where fp32 weights are not rounded at all.
  if (dense.cluster_dtype == ClusterDType::kNative && w.scalar_type() == at::kFloat)
    dense.cluster_dtype = ClusterDType::kFloat32;
  Grads d = run(w.to(at::kDouble), palette, dense, scale, R, importance);
  for (DKMMethod m : {DKMMethod::kUnique, DKMMethod::kAuto}) {
    DKMConfig c = base;
    c.method = m;
    SCOPED_TRACE(what + " method=" + to_string(m));
    Grads u = run(w, palette, c, scale, R, importance);
    EXPECT_EQ(u.iters, d.iters);
    EXPECT_LE(rel_err(u.out, d.out), tol);
    EXPECT_LE(rel_err(u.palette, d.palette), tol);
    EXPECT_LE(rel_err(u.grad, d.grad), tol);
    // The same DKM deferred: w~ made without a graph, dL/dw~ carried back afterwards.
    const DeferredDKM later(w, palette, c, scale, importance.defined() ? Importance(importance, w, c) : Importance());
    EXPECT_LE(rel_err(later.weight(), d.out), tol);
    EXPECT_LE(rel_err(later.palette(), d.palette), tol);
    EXPECT_LE(rel_err(later.backward(R), d.grad), tol);
  }
}

// A heavy-tailed importance with zeros, as a Fisher diagonal is.
at::Tensor fisher_like(at::IntArrayRef shape) {
  at::Tensor f = at::randn(shape).mul(2).exp();
  return at::where(at::rand(shape) < 0.1, at::zeros_like(f), f);
}

// Every combination of bits, cluster dtype, grouping and scaling on a random 32 x 48 weight;
// with `weighted`, each under its own fisher_like() importance.
void agree_on_random_tensors(std::vector<int> bits_list, std::vector<ClusterDType> dtypes, bool weighted) {
  for (int bits : bits_list) {
    for (ClusterDType cd : dtypes) {
      for (int64_t group : {0, 8}) {
        for (bool scaled : {false, true}) {
          DKMConfig cfg;
          cfg.bits = bits;
          cfg.cluster_dtype = cd;
          cfg.group_size = group;
          cfg.per_row_scale = scaled;
          // Per-row scaling brings weights to about [-1, 1], where tau must be larger.
          cfg.tau = scaled ? 1e-2 : 1e-4;
          at::Tensor w = at::randn({32, 48}) * 0.02;
          expect_methods_agree(w, cfg, fmt::format("bits={} cd={} group={} scale={} weighted={}", bits,
                                                   to_string(cd), group, scaled, weighted),
                               1e-4, weighted ? fisher_like(w.sizes()) : at::Tensor());
        }
      }
    }
  }
}

TEST(DKM, UniqueMatchesDenseOnRandomTensors) {
  at::manual_seed(1);
  agree_on_random_tensors({2, 3, 4}, {ClusterDType::kFloat32, ClusterDType::kBFloat16, ClusterDType::kFloat16}, false);
}

TEST(DKM, UniqueMatchesDenseForVectorsAndBf16Weights) {
  at::manual_seed(2);
  DKMConfig cfg;
  cfg.bits = 3;
  cfg.cluster_dim = 2;
  cfg.tau = 2e-4;
  expect_methods_agree(at::randn({16, 24}) * 0.02, cfg, "cluster_dim=2");
  cfg.cluster_dim = 1;
  // A bf16 weight gets a bf16 output and gradient: agreement to bf16's precision.
  expect_methods_agree((at::randn({64, 64}) * 0.02).to(at::kBFloat16), cfg, "bf16 weight", 0x1p-8);
  cfg.cluster_dtype = ClusterDType::kNative;
  expect_methods_agree(at::randn({16, 40}) * 0.02, cfg, "native fp32");
}

// Importance-weighted DKM: the unique-value method's hand-written backward (summed importances
// in place of counts, and f_i times the per-unit palette path) against autograd through the
// weighted dense formulation.
TEST(DKM, ImportanceWeightedUniqueMatchesDense) {
  at::manual_seed(7);
  agree_on_random_tensors({2, 3}, {ClusterDType::kFloat32, ClusterDType::kBFloat16}, true);
  DKMConfig vec;
  vec.bits = 3;
  vec.cluster_dim = 2;
  vec.tau = 2e-4;
  at::Tensor w = at::randn({16, 24}) * 0.02;
  expect_methods_agree(w, vec, "weighted cluster_dim=2", 1e-4, fisher_like(w.sizes()));
}

// The weighted update by hand: with a sharp softmax each weight belongs to its nearest
// centroid, and a centroid becomes the importance-weighted mean of its weights. Uniform
// importance (of any size) is unweighted DKM; a group of zero importance weighs equally.
TEST(DKM, ImportanceWeighsTheCentroidUpdate) {
  DKMConfig cfg;
  cfg.bits = 1;
  cfg.tau = 1e-6;
  cfg.max_iters = 1;
  cfg.cluster_dtype = ClusterDType::kFloat32;
  const at::Tensor w = at::tensor({0.0f, 0.25f, 1.0f, 1.5f}).view({1, 4});
  const at::Tensor p = at::tensor({0.1f, 1.2f}).view({1, 2, 1});
  const at::Tensor f = at::tensor({3.0f, 1.0f, 1.0f, 0.0f}).view({1, 4});
  for (DKMMethod m : {DKMMethod::kDense, DKMMethod::kUnique, DKMMethod::kAuto}) {
    cfg.method = m;
    SCOPED_TRACE(to_string(m));
    at::Tensor c = dkm(w, p, cfg, {}, Importance(f, w, cfg)).palette.view({2});
    EXPECT_NEAR(c[0].item<double>(), (3 * 0.0 + 1 * 0.25) / 4, 1e-6);
    EXPECT_NEAR(c[1].item<double>(), 1.0, 1e-6);
    const at::Tensor plain = dkm(w, p, cfg).palette;
    EXPECT_NEAR(plain.view({2})[0].item<double>(), 0.125, 1e-6);
    EXPECT_LE(rel_err(dkm(w, p, cfg, {}, Importance(at::full({1, 4}, 1e-9), w, cfg)).palette, plain), 1e-6);
    EXPECT_LE(rel_err(dkm(w, p, cfg, {}, Importance(at::zeros({1, 4}), w, cfg)).palette, plain), 1e-6);
  }
  // The hard k-means step of the straight-through baseline weighs the same way.
  at::Tensor c = lloyd_update(w, p, cfg, {}, Importance(f, w, cfg)).view({2});
  EXPECT_NEAR(c[0].item<double>(), 0.0625, 1e-6);
  EXPECT_NEAR(c[1].item<double>(), 1.0, 1e-6);
  EXPECT_NEAR(lloyd_update(w, p, cfg).view({2})[1].item<double>(), 1.25, 1e-6);
}

// The weight matrices of the real stories260K model (llama2.c v0 checkpoint: a 7 x int32
// header, then fp32 tensors in a fixed order).
std::vector<std::pair<std::string, at::Tensor>> stories260k_matrices() {
  std::ifstream in(test::asset("models/stories260K/stories260K.bin"), std::ios::binary);
  int32_t h[7];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const int64_t dim = h[0], hidden = h[1], L = h[2], heads = h[3], kv = h[4], vocab = std::abs(h[5]);
  const int64_t kv_dim = dim / heads * kv;
  auto read = [&](std::vector<int64_t> shape) {
    at::Tensor t = at::empty(shape, at::kFloat);
    in.read(reinterpret_cast<char*>(t.data_ptr<float>()), t.numel() * sizeof(float));
    EXPECT_TRUE(in.good());
    return t;
  };
  read({vocab, dim});
  read({L, dim});
  std::vector<std::pair<std::string, at::Tensor>> out;
  const std::vector<std::pair<std::string, std::vector<int64_t>>> blocks = {
      {"wq", {L, dim, dim}}, {"wk", {L, kv_dim, dim}}, {"wv", {L, kv_dim, dim}},
      {"wo", {L, dim, dim}}, {"rms_ffn", {L, dim}},    {"w1", {L, hidden, dim}},
      {"w2", {L, dim, hidden}}, {"w3", {L, hidden, dim}}};
  for (const auto& [name, shape] : blocks) {
    at::Tensor t = read(shape);
    if (shape.size() != 3) continue;
    for (int64_t l = 0; l < L; ++l) out.emplace_back(fmt::format("{}[{}]", name, l), t[l].clone());
  }
  return out;
}

TEST(DKM, UniqueMatchesDenseOnStories260K) {
  auto mats = stories260k_matrices();
  ASSERT_EQ(mats.size(), 35u);
  at::manual_seed(3);
  for (const auto& [name, w] : mats) {
    for (int bits : {2, 3, 4}) {
      DKMConfig cfg;
      cfg.bits = bits;
      expect_methods_agree(w, cfg, fmt::format("{} bits={}", name, bits));
    }
  }
  DKMConfig grouped;
  grouped.bits = 4;
  grouped.group_size = 16;
  grouped.cluster_dtype = ClusterDType::kFloat16;
  expect_methods_agree(mats[0].second, grouped, mats[0].first + " grouped fp16");
}

// Central differences in fp64 against the hand-written backward, for the unique-value op
// (distinct values by sorting, since fp64 has no 16-bit patterns) and the chunked dense path.
TEST(DKM, GradientMatchesFiniteDifferences) {
  at::manual_seed(4);
  for (DKMMethod m : {DKMMethod::kUnique, DKMMethod::kAuto, DKMMethod::kDense}) {
    for (int dim : {1, 2}) {
      DKMConfig cfg;
      cfg.bits = 2;
      cfg.cluster_dim = dim;
      cfg.cluster_dtype = ClusterDType::kNative;
      cfg.tau = 0.05;
      cfg.eps = 0;  // no early stop: the iteration count must not change under perturbation
      cfg.group_size = 2;
      cfg.zero_threshold = 0;
      cfg.method = m;
      at::Tensor w = at::randn({4, 6}, at::kDouble) * 0.3;
      w[0][0] = w[1][1];  // a repeated value: several weights share one unique entry
      at::Tensor palette = init_palette(w, cfg);
      at::Tensor R = at::randn({4, 6}, at::kDouble);
      auto loss = [&](const at::Tensor& x) { return (dkm(x, palette, cfg).weight * R).sum().item<double>(); };
      Grads g = run(w, palette, cfg, {}, R);
      at::Tensor fd = at::zeros_like(w);
      const double h = 1e-6;
      for (int64_t i = 0; i < w.numel(); ++i) {
        at::Tensor wp = w.clone(), wm = w.clone();
        wp.view({-1})[i] += h;
        wm.view({-1})[i] -= h;
        fd.view({-1})[i] = (loss(wp) - loss(wm)) / (2 * h);
      }
      SCOPED_TRACE(to_string(m) + " dim=" + std::to_string(dim));
      EXPECT_LE(rel_err(g.grad, fd), 1e-6);
    }
  }
}

TEST(DKM, PaletteIsCarriedAndIterationsFollowTheStopRule) {
  at::manual_seed(5);
  DKMConfig cfg;
  cfg.bits = 3;
  cfg.group_size = 32;
  at::Tensor w = at::randn({64, 64}) * 0.02;
  at::Tensor p0 = init_palette(w, cfg);
  for (DKMMethod m : {DKMMethod::kDense, DKMMethod::kUnique}) {
    cfg.method = m;
    // eps = 0: never converged, so every group makes max_iters updates.
    cfg.eps = 0;
    cfg.max_iters = 5;
    DKMResult r = dkm(w, p0, cfg);
    EXPECT_EQ(r.iterations, (std::vector<int>{5, 5}));
    ASSERT_EQ(r.palette.sizes(), p0.sizes());
    EXPECT_FALSE(r.palette.requires_grad());
    // A huge eps: the first comparison (after the second update) stops.
    cfg.eps = 1e9;
    EXPECT_EQ(dkm(w, p0, cfg).iterations, (std::vector<int>{2, 2}));
    // One update: nothing to compare.
    cfg.max_iters = 1;
    EXPECT_EQ(dkm(w, p0, cfg).iterations, (std::vector<int>{1, 1}));
    // Soft-clustered weights lie within the palette's range.
    EXPECT_GE(r.weight.min().item<float>(), r.palette.min().item<float>() - 1e-6);
    EXPECT_LE(r.weight.max().item<float>(), r.palette.max().item<float>() + 1e-6);
  }
}

TEST(DKM, GroupsStopIndependently) {
  // Group 0 sits on its palette (its inertia moves by ~1e-12: stops after two updates); group 1
  // is random and runs to max_iters. Unique and dense must agree on the per-group counts and on
  // the gradients.
  at::manual_seed(6);
  DKMConfig cfg;
  cfg.bits = 2;
  cfg.group_size = 4;
  cfg.eps = 1e-9;
  cfg.max_iters = 4;
  cfg.prune_threshold = 0;
  at::Tensor w = at::randn({8, 16}) * 0.02;
  w.narrow(0, 0, 4).copy_(at::tensor({-0.5f, -0.25f, 0.25f, 0.5f}).repeat({16}).view({4, 16}));
  at::Tensor p0 = init_palette(w, cfg);
  at::Tensor R = at::randn(w.sizes(), at::kDouble);
  cfg.method = DKMMethod::kDense;
  Grads d = run(w, p0, cfg, {}, R);
  cfg.method = DKMMethod::kUnique;
  Grads u = run(w, p0, cfg, {}, R);
  EXPECT_EQ(d.iters, (std::vector<int>{2, 4}));
  EXPECT_EQ(u.iters, d.iters);
  EXPECT_LE(rel_err(u.out, d.out), 1e-4);
  EXPECT_LE(rel_err(u.grad, d.grad), 1e-4);
}

// What the unique method keeps between forward and backward is O(65536 + U k T), not O(N):
// measured with the counting CPU allocator.
TEST(DKM, UniqueMethodSavesNothingWeightSized) {
  TensorMemory::install();
  at::manual_seed(9);
  DKMConfig cfg;
  cfg.bits = 3;
  at::Tensor w = (at::randn({4096, 4096}) * 0.02).to(at::kBFloat16).requires_grad_(true);
  at::Tensor p = init_palette(w, cfg);
  const int64_t weight_bytes = w.numel() * w.element_size();
  for (DKMMethod m : {DKMMethod::kUnique, DKMMethod::kDense}) {
    if (m == DKMMethod::kDense) w = w.detach().narrow(0, 0, 256).clone().requires_grad_(true);
    cfg.method = m;
    const int64_t before = TensorMemory::current();
    at::Tensor out = dkm(w, m == DKMMethod::kDense ? init_palette(w, cfg) : p, cfg).weight;
    const int64_t saved = TensorMemory::current() - before - out.numel() * out.element_size();
    const int64_t n = w.numel();
    if (m == DKMMethod::kUnique) {
      EXPECT_LT(saved, weight_bytes / 20) << saved;
    } else {
      // The dense formulation keeps several N x k fp32 tensors per iteration.
      EXPECT_GT(saved, n * cfg.k() * 4 * cfg.max_iters) << saved;
    }
  }
}

// DeferredDKM for every method against dkm() with autograd, and what it holds: nothing
// weight-sized with the pattern index; no graph for the dense methods without grad mode; a
// weight modified after it ran is refused.
TEST(DKM, DeferredEqualsDkmAndHoldsNothingWeightSized) {
  TensorMemory::install();
  at::manual_seed(10);
  DKMConfig cfg;
  cfg.bits = 3;
  for (DKMMethod m : {DKMMethod::kAuto, DKMMethod::kUnique, DKMMethod::kDense, DKMMethod::kEDKM}) {
    SCOPED_TRACE(to_string(m));
    cfg.method = m;
    at::Tensor w = (at::randn({96, 64}) * 0.02).requires_grad_(true);
    const at::Tensor p = init_palette(w, cfg), R = at::randn(w.sizes());
    DKMResult r = dkm(w, p, cfg);
    r.weight.backward(R);
    const DeferredDKM later(w, p, cfg);
    EXPECT_FALSE(later.weight().requires_grad());
    EXPECT_TRUE(at::equal(later.weight(), r.weight.detach()));
    EXPECT_TRUE(at::equal(later.palette(), r.palette));
    // The backward is linear: two halves of the upstream gradient give the sum's.
    EXPECT_LE(rel_err(later.backward(R), w.grad()), 1e-6);
    EXPECT_LE(rel_err(later.backward(0.5 * R) + later.backward(0.5 * R), w.grad()), 1e-6);
    EXPECT_THROW(later.backward(R.narrow(0, 0, 8)), std::invalid_argument);  // not the weight's shape
    at::NoGradGuard no_grad;
    if (m == DKMMethod::kDense || m == DKMMethod::kEDKM) {  // for evaluation: no graph, no backward
      const DeferredDKM eval(w, p, cfg);
      EXPECT_TRUE(at::equal(eval.weight(), r.weight.detach()));
      EXPECT_THROW(eval.backward(R), std::logic_error);
    }
    w.add_(1e-3);
    EXPECT_THROW(later.weight(), std::logic_error);
    EXPECT_THROW(later.backward(R), std::logic_error);
  }
  at::Tensor big = (at::randn({4096, 4096}) * 0.02).to(at::kBFloat16);
  cfg.method = DKMMethod::kAuto;
  const at::Tensor p = init_palette(big, cfg);
  const int64_t before = TensorMemory::current();
  {
    const DeferredDKM later(big, p, cfg);
    EXPECT_LT(TensorMemory::current() - before, big.numel() * big.element_size() / 20);
    const at::Tensor made = later.weight();  // the caller's, while it keeps it
    EXPECT_LT(TensorMemory::current() - before - made.numel() * made.element_size(), big.numel() * big.element_size() / 20);
  }
}

TEST(DKM, FewerDistinctValuesThanCentroids) {
  DKMConfig cfg;
  cfg.bits = 3;
  at::Tensor w = at::tensor({-0.5f, 0.25f, 1.0f, 0.25f, -0.5f, 1.0f}).view({2, 3});
  at::Tensor p = init_palette(w, cfg);
  // Each distinct value once, then the largest repeated.
  at::Tensor want = at::tensor({-0.5f, 0.25f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f}).view({1, 8, 1});
  EXPECT_TRUE(at::equal(p, want)) << p;
  for (DKMMethod m : {DKMMethod::kDense, DKMMethod::kUnique}) {
    cfg.method = m;
    at::Tensor x = w.clone().requires_grad_(true);
    DKMResult r = dkm(x, p, cfg);
    // Equal up to the attention floor (zero_threshold) that every centroid keeps.
    EXPECT_LE(rel_err(r.weight, w), 1e-5) << to_string(m);
    r.weight.sum().backward();
    EXPECT_TRUE(at::isfinite(x.grad()).all().item<bool>());
  }
}

TEST(DKM, ConstantTensorAndTinyTensor) {
  DKMConfig cfg;
  cfg.bits = 4;
  for (at::Tensor w : {at::full({4, 4}, 0.125f), at::tensor({0.5f, -0.25f})}) {
    at::Tensor p = init_palette(w, cfg);
    for (DKMMethod m : {DKMMethod::kDense, DKMMethod::kUnique, DKMMethod::kAuto}) {
      cfg.method = m;
      at::Tensor x = w.clone().requires_grad_(true);
      DKMResult r = dkm(x, p, cfg);
      EXPECT_LE(rel_err(r.weight, w), 1e-5) << to_string(m);
      r.weight.sum().backward();
      EXPECT_TRUE(at::isfinite(x.grad()).all().item<bool>()) << to_string(m);
    }
  }
}

TEST(DKM, RejectsBadInput) {
  DKMConfig cfg;
  at::Tensor w = at::randn({8, 8}) * 0.02;
  at::Tensor p = init_palette(w, cfg);
  for (int bits : {0, 9}) {
    DKMConfig bad = cfg;
    bad.bits = bits;
    EXPECT_THROW(dkm(w, p, bad), std::invalid_argument) << bits;
    EXPECT_THROW(init_palette(w, bad), std::invalid_argument);
  }
  for (double tau : {0.0, -1.0}) {
    DKMConfig bad = cfg;
    bad.tau = tau;
    EXPECT_THROW(dkm(w, p, bad), std::invalid_argument);
  }
  EXPECT_THROW(dkm(at::empty({0, 8}), p, cfg), std::invalid_argument);
  for (float v : {NAN, INFINITY}) {
    at::Tensor bad = w.clone();
    bad[3][4] = v;
    for (DKMMethod m : {DKMMethod::kDense, DKMMethod::kUnique, DKMMethod::kAuto}) {
      DKMConfig c = cfg;
      c.method = m;
      EXPECT_THROW(dkm(bad, p, c), std::invalid_argument) << v << " " << to_string(m);
    }
    EXPECT_THROW(init_palette(bad, cfg), std::invalid_argument);
    EXPECT_THROW(row_scales(bad), std::invalid_argument);
  }
  // Finite in fp32 but beyond fp16's range once rounded.
  DKMConfig half = cfg;
  half.cluster_dtype = ClusterDType::kFloat16;
  at::Tensor big = w.clone();
  big[0][0] = 1e6;
  try {
    dkm(big, p, half);
    ADD_FAILURE() << "expected an overflow error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("overflow"), std::string::npos) << e.what();
  }
  // Wrong palette shape, group size, cluster_dim.
  EXPECT_THROW(dkm(w, p.narrow(1, 0, 4), cfg), std::invalid_argument);
  DKMConfig grouped = cfg;
  grouped.group_size = 3;
  EXPECT_THROW(dkm(w, p, grouped), std::invalid_argument);
  DKMConfig vec = cfg;
  vec.cluster_dim = 3;
  EXPECT_THROW(init_palette(w, vec), std::invalid_argument);
  // A scale that is missing or not positive.
  DKMConfig scaled = cfg;
  scaled.per_row_scale = true;
  EXPECT_THROW(dkm(w, p, scaled), std::invalid_argument);
  EXPECT_THROW(dkm(w, p, scaled, at::zeros({8})), std::invalid_argument);
  EXPECT_THROW(parse_cluster_dtype("int8"), std::invalid_argument);
  // An importance of the wrong shape, negative, or not finite; and with eDKM's method.
  for (at::Tensor f : {at::ones({8, 4}), -at::ones({8, 8}), at::full({8, 8}, NAN), at::ones({8, 8}, at::kInt)})
    EXPECT_THROW(Importance(f, w, cfg), std::invalid_argument);
  // One prepared for another weight or layout.
  const Importance other(at::ones({8, 4}), w.narrow(1, 0, 4), cfg);
  DKMConfig two_groups = cfg;
  two_groups.group_size = 4;
  const Importance grouped_f(at::ones({8, 8}), w, two_groups);
  for (const Importance* f : {&other, &grouped_f}) {
    EXPECT_THROW(dkm(w, p, cfg, {}, *f), std::invalid_argument);
    EXPECT_THROW(init_palette(w, cfg, {}, {}, *f), std::invalid_argument);
    EXPECT_THROW(lloyd_update(w, p, cfg, {}, *f), std::invalid_argument);
  }
  DKMConfig stored = cfg;
  stored.method = DKMMethod::kEDKM;
  EXPECT_THROW(dkm(w, p, stored, {}, Importance(at::ones({8, 8}), w, stored)), std::invalid_argument);
}

// coremltools' collapse repair (fake_palettize.py, FakePalettize.forward under palett_tau > 0):
// torch.unique over a group's centroids, and for each distinct value j held more than once, the
// first centroid equal to it moves to 0.5 * (uniq[j] + uniq[(j + 1) % n]). The expected palettes
// below follow that rule by hand. DKM starts from the repaired palette, and the collapse is
// found together with the argument checks (one read on a GPU), so the checks' messages are
// tested on every call that makes them that way.
TEST(DKM, CollapsedPalettesAreRepairedAsCoremltoolsRepairsThem) {
  auto palette = [](std::vector<float> v, int64_t groups, int64_t d) {
    return at::tensor(v).view({groups, -1, d});
  };
  // Scalars: group 0 holds 0.1 twice; group 1 its largest value twice (the midpoint wraps
  // around to the smallest); group 2 holds 0 and -0, equal as values. The midpoints in fp32.
  const at::Tensor scalars = palette({0.1f, 0.1f, -0.2f, 0.3f, 0.3f, 0.3f, -0.2f, 0.1f, 0.f, -0.f, 0.5f, -0.5f}, 3, 1);
  const at::Tensor scalars_fixed = palette({0.5f * (0.1f + 0.3f), 0.1f, -0.2f, 0.3f, 0.5f * (0.3f + -0.2f), 0.3f,
                                            -0.2f, 0.1f, 0.5f * (0.f + 0.5f), -0.f, 0.5f, -0.5f}, 3, 1);
  // Pairs: [0.1, 0.2] twice, and [0.1, 0.3], equal to it in the first component only.
  const at::Tensor pairs = palette({0.1f, 0.2f, 0.1f, 0.2f, 0.1f, 0.3f, -0.1f, 0.f}, 1, 2);
  const at::Tensor pairs_fixed =
      palette({0.5f * (0.1f + 0.1f), 0.5f * (0.2f + 0.3f), 0.1f, 0.2f, 0.1f, 0.3f, -0.1f, 0.f}, 1, 2);
  const at::Tensor distinct_pairs = palette({0.1f, 0.2f, 0.1f, 0.3f, 0.2f, 0.2f, -0.1f, 0.f}, 1, 2);

  at::manual_seed(3);
  const at::Tensor w = at::randn({6, 8}) * 0.3;
  DKMConfig scalar_cfg;
  scalar_cfg.bits = 2;
  scalar_cfg.group_size = 2;
  DKMConfig pair_cfg;
  pair_cfg.bits = 2;
  pair_cfg.cluster_dim = 2;
  pair_cfg.method = DKMMethod::kDense;
  for (auto [p, fixed, cfg] : {std::tuple{scalars, scalars_fixed, scalar_cfg}, std::tuple{pairs, pairs_fixed, pair_cfg},
                               std::tuple{distinct_pairs, distinct_pairs, pair_cfg}}) {
    const auto layout = detail::GroupLayout::of(w, cfg);
    const detail::ScaleAndPalette args = detail::checked_scale_and_palette({}, p, layout, cfg, w);
    EXPECT_EQ(args.collapsed, !p.equal(fixed));
    // Compared as values: -0 == 0.
    EXPECT_TRUE(at::eq(detail::repair_collapsed(args.palette), fixed).all().item<bool>()) << p << fixed;
    const DKMResult from_collapsed = dkm(w, p, cfg), from_fixed = dkm(w, fixed, cfg);
    EXPECT_TRUE(from_collapsed.weight.equal(from_fixed.weight));
    EXPECT_TRUE(from_collapsed.palette.equal(from_fixed.palette));
  }

  // The checks made with it, by each call that makes them that way.
  DKMConfig scaled;
  scaled.bits = 2;
  scaled.per_row_scale = true;
  const at::Tensor good_scale = row_scales(w), good = init_palette(w, scaled, good_scale);
  at::Tensor nan_palette = good.clone(), inf_scale = good_scale.clone(), zero_scale = good_scale.clone();
  nan_palette[0][1][0] = NAN;
  inf_scale[2] = INFINITY;
  zero_scale[4] = 0.f;
  for (auto [scale, p, message] : {std::tuple{good_scale, nan_palette, "palette contains NaN or Inf values"},
                                   std::tuple{inf_scale, good, "scale contains NaN or Inf values"},
                                   std::tuple{zero_scale, good, "scale entries must be positive"}}) {
    const std::vector<std::pair<const char*, std::function<void()>>> calls{
        {"dkm", [&] { dkm(w, p, scaled, scale); }},
        {"DeferredDKM", [&] { DeferredDKM(w, p, scaled, scale); }},
        {"DeferredHardAssign", [&] { DeferredHardAssign(w, p, scaled, scale, {}, true); }},
        {"hard_assign", [&] { hard_assign(w, p, scaled, scale); }}};
    for (const auto& [name, call] : calls) {
      try {
        call();
        ADD_FAILURE() << name << ": expected \"" << message << "\"";
      } catch (const std::invalid_argument& e) {
        EXPECT_STREQ(e.what(), message) << name;
      }
    }
  }
}

// `edkm bench dkm --json` end to end on a shrunken layer: every method's row, in both weight
// dtypes, and a clear refusal of a dtype it does not run.
TEST(Cli, BenchDkmReportsEveryMethodAsJson) {
  test::TempDir tmp;
  for (const std::string dtype : {"bf16", "fp32"}) {
    test::CliResult r = test::run_cli("bench dkm --layer-scale 0.002 --reps 1 --dense-slice 4096 --json --weights " + dtype, tmp);
    ASSERT_EQ(r.code, 0) << r.err;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["weights"], dtype);
    std::map<std::string, int64_t> weights;
    for (const auto& row : j["rows"]) weights[row["method"].get<std::string>() + "/" + row["scope"].get<std::string>()] = row["weights"];
    // The layer: 4 x 8x4096, 2 x 22x4096 and 8x11008 at scale 0.002.
    const int64_t layer = 4 * 8 * 4096 + 2 * 22 * 4096 + 8 * 11008;
    EXPECT_EQ(weights["floor (w*s)/layer"], layer);
    EXPECT_EQ(weights["unique/layer"], layer);
    EXPECT_EQ(weights["auto/layer"], layer);
    EXPECT_EQ(weights["dense/layer"], layer);
    EXPECT_EQ(weights["dense/slice"], 4096);
    EXPECT_EQ(weights["unique/slice"], 4096);
    // Ratios of times: present and positive (their values are the benchmark's business).
    EXPECT_GT(j["unique_over_floor_time"].get<double>(), 0);
    EXPECT_GT(j["speedup_unique_vs_dense"].get<double>(), 0);
    EXPECT_GT(j["unique_over_dense_memory"].get<double>(), 0);
    // Six passes of the unique method on each of the two shapes.
    ASSERT_EQ(j["passes"].size(), 12u);
    for (const auto& p : j["passes"]) EXPECT_GT(p["seconds"].get<double>(), 0) << p.dump();
    EXPECT_EQ(j["passes"][0]["matrix"], "q_proj");
    EXPECT_EQ(j["passes"][6]["matrix"], "gate_proj");
  }
  test::CliResult bad = test::run_cli("bench dkm --weights fp16", tmp);
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("fp16"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace edkm
