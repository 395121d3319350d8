// The straight-through training baselines (cluster/straight_through.h): the Lloyd step and the
// LSQ+ gradients against values derived by hand from their definitions, the export matching
// what was trained, and each method fine-tuning stories260K from its starting point.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "cluster/straight_through.h"
#include "common/memory.h"
#include "format/format.h"
#include "pipeline/compress.h"
#include "pipeline/load.h"
#include "test_util.h"

namespace edkm {
namespace {

const std::string kStories = "models/stories260K/stories260K.bin";

TEST(HardKMeans, LloydStepMovesEachCentroidToItsMembersMean) {
  DKMConfig cfg;
  cfg.bits = 2;
  cfg.cluster_dtype = ClusterDType::kFloat32;
  cfg.prune_threshold = 0;
  // Row 0 is group 0, row 1 group 1 (group_size 1).
  cfg.group_size = 1;
  const at::Tensor w = at::tensor({0.0f, 0.1f, 0.9f, 1.2f, 3.0f, 3.1f, -1.0f, -1.1f}).view({2, 4});
  const at::Tensor palette = at::tensor({0.0f, 1.0f, 2.0f, 3.0f, -1.0f, 0.0f, 3.0f, 9.0f}).view({2, 4, 1});
  const at::Tensor got = lloyd_update(w, palette, cfg);
  // Group 0: {0, 0.1} -> 0.05, {0.9, 1.2} -> 1.05, nobody at 2 (kept), none at 3 (kept).
  // Group 1: {-1, -1.1} -> -1.05, nobody at 0, {3, 3.1} -> 3.05, nobody at 9.
  const at::Tensor want = at::tensor({0.05f, 1.05f, 2.0f, 3.0f, -1.05f, 0.0f, 3.05f, 9.0f}).view({2, 4, 1});
  EXPECT_TRUE(at::allclose(got, want, 1e-6, 1e-6)) << got;
}

// With a 16-bit cluster dtype the assignment runs over the distinct values; it equals the
// export's per-weight assignment (palettize), with groups, per-row scales and a palette away
// from its k-means start.
TEST(HardKMeans, AssignmentIsNearestCentroidWithAStraightThroughGradient) {
  at::manual_seed(1);
  for (int64_t group_size : {0, 4}) {
    for (bool per_row_scale : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "group_size " << group_size << ", per_row_scale " << per_row_scale);
      DKMConfig cfg;
      cfg.bits = 2;
      cfg.group_size = group_size;
      cfg.per_row_scale = per_row_scale;
      const at::Tensor w = (at::randn({8, 40}) * 0.1).requires_grad_(true);
      const at::Tensor s = per_row_scale ? row_scales(w.detach()) : at::Tensor();
      const at::Tensor palette = init_palette(w.detach(), cfg, s) * 1.1 + 0.01;
      at::Tensor q = hard_assign(w, palette, cfg, s);
      EXPECT_TRUE(at::equal(q.detach(), depalettize(palettize(w.detach(), palette, cfg, s))));
      const at::Tensor up = at::randn(w.sizes());
      (q * up).sum().backward();
      EXPECT_TRUE(at::equal(w.grad(), up));
    }
  }
}

// The Lloyd step over the distinct values (16-bit cluster dtypes) equals the step over every
// weight: the same bf16-exact weights clustered in fp32, where no rounding changes them, with
// and without importances.
TEST(HardKMeans, LloydStepOverDistinctValuesEqualsTheStepOverWeights) {
  at::manual_seed(4);
  const at::Tensor w = (at::randn({16, 64}) * 0.05).to(at::kBFloat16).to(at::kFloat);
  const at::Tensor f = at::rand(w.sizes()).pow(4) * (at::rand(w.sizes()) > 0.1);
  DKMConfig by_value;
  by_value.bits = 3;
  by_value.group_size = 4;
  DKMConfig by_weight = by_value;
  by_weight.cluster_dtype = ClusterDType::kFloat32;
  const at::Tensor palette = init_palette(w, by_value) + 0.003;
  const at::Tensor want = lloyd_update(w, palette, by_weight);
  EXPECT_LE(test::rel_err(lloyd_update(w, palette, by_value), want), 1e-6);
  EXPECT_FALSE(at::allclose(want, palette.to(at::kFloat)));
  const at::Tensor weighted = lloyd_update(w, palette, by_weight, {}, Importance(f, w, by_weight));
  EXPECT_LE(test::rel_err(lloyd_update(w, palette, by_value, {}, Importance(f, w, by_value)), weighted), 1e-6);
  EXPECT_FALSE(at::allclose(weighted, want));
}

// Hard k-means' step as the trainer runs it: the Lloyd step and the per-value table once, then
// the hard-assigned weight at every use. It equals the Lloyd step followed by the export's
// per-weight assignment (palettize), over the distinct values (bf16 cluster dtype; groups,
// scales, importances) and per weight (fp32 cluster dtype), with and without the update; it
// holds nothing of the weight's size with the pattern index, and refuses a modified weight.
TEST(HardKMeans, DeferredStepEqualsTheLloydStepThenTheAssignment) {
  at::manual_seed(6);
  const at::Tensor w = at::randn({16, 96}) * 0.05;
  const at::Tensor f = at::rand(w.sizes()).pow(4) * (at::rand(w.sizes()) > 0.1);
  for (ClusterDType cd : {ClusterDType::kBFloat16, ClusterDType::kFloat32})
    for (auto [group_size, per_row_scale, weighted] : {std::tuple{0, false, false}, std::tuple{4, true, false},
                                                       std::tuple{8, false, true}})
      for (bool update : {true, false}) {
        SCOPED_TRACE(fmt::format("cd={} group={} scaled={} weighted={} update={}", to_string(cd), group_size,
                                 per_row_scale, weighted, update));
        DKMConfig cfg;
        cfg.bits = 3;
        cfg.cluster_dtype = cd;
        cfg.group_size = group_size;
        cfg.per_row_scale = per_row_scale;
        const at::Tensor s = per_row_scale ? row_scales(w) : at::Tensor();
        const Importance imp = weighted ? Importance(f, w, cfg) : Importance();
        const at::Tensor palette = init_palette(w, cfg, s) * 1.05 + 0.002;
        const DeferredHardAssign step(w, palette, cfg, s, imp, update);
        const at::Tensor want_palette = update ? lloyd_update(w, palette, cfg, s, imp) : palette;
        EXPECT_TRUE(at::equal(step.palette(), want_palette));
        const at::Tensor want = depalettize(palettize(w, want_palette, cfg, s));
        EXPECT_TRUE(at::equal(step.weight(), want));
        EXPECT_TRUE(at::equal(step.weight(), want));  // every use alike
      }
  DKMConfig cfg;
  at::Tensor modified = w.clone();
  const DeferredHardAssign later(modified, init_palette(modified, cfg), cfg);
  modified.add_(1e-3);
  EXPECT_THROW(later.weight(), std::logic_error);

  TensorMemory::install();
  const at::Tensor big = (at::randn({4096, 4096}) * 0.02).to(at::kBFloat16);
  const at::Tensor p = init_palette(big, cfg);
  const int64_t before = TensorMemory::current();
  const DeferredHardAssign held(big, p, cfg);
  EXPECT_LT(TensorMemory::current() - before, big.numel() * big.element_size() / 20);
}

// LSQ+ under the straight-through rounding, per element with upstream gradient G, c the
// rounding residual round(w/s + z) - (w/s + z), Q the clamped integer:
//   inside the grid:  w_q = w + s c        dw = G, ds = G c,        dz = 0
//   clamped:          w_q = s (Q - z)      dw = 0, ds = G (Q - z),  dz = -G s
// with ds and dz then multiplied by LSQ's gradient scale 1 / sqrt(cols (2^b - 1)).
TEST(QAT, FakeQuantizeGradientsAreLsqPlus) {
  const int bits = 2;
  const double maxq = 3;
  const at::Tensor w0 = at::tensor({0.31f, -0.2f, 5.0f, -4.0f, 0.07f, 0.5f}).view({2, 3});
  LearnedGrid grid{at::tensor({0.25f, 0.4f}).requires_grad_(true), at::tensor({1.3f, 0.8f}).requires_grad_(true)};
  at::Tensor w = w0.clone().requires_grad_(true);
  const at::Tensor G = at::tensor({1.0f, -2.0f, 0.5f, 1.5f, 3.0f, -1.0f}).view({2, 3});
  at::Tensor q = fake_quantize(w, grid, bits);
  (q * G).sum().backward();
  const double gs = 1.0 / std::sqrt(3.0 * maxq);
  for (int r = 0; r < 2; ++r) {
    const double s = grid.scale[r].item<double>(), z = grid.zero[r].item<double>();
    double ds = 0, dz = 0;
    for (int c = 0; c < 3; ++c) {
      const double x = w0[r][c].item<double>() / s + z, g = G[r][c].item<double>();
      const double Q = std::min(maxq, std::max(0.0, std::nearbyint(x)));
      const bool inside = std::nearbyint(x) >= 0 && std::nearbyint(x) <= maxq;
      EXPECT_NEAR(q[r][c].item<double>(), s * (Q - z), 1e-6);
      EXPECT_NEAR(w.grad()[r][c].item<double>(), inside ? g : 0.0, 1e-6) << r << "," << c;
      ds += inside ? g * (std::nearbyint(x) - x) : g * (Q - z);
      dz += inside ? 0.0 : -g * s;
    }
    EXPECT_NEAR(grid.scale.grad()[r].item<double>(), ds * gs, 1e-5) << r;
    EXPECT_NEAR(grid.zero.grad()[r].item<double>(), dz * gs, 1e-5) << r;
  }
}

// The grid starts as RTN's per-row min-max grid, and its palettes reproduce the fake-quantized
// weight exactly: the file holds what was trained.
TEST(QAT, StartsAtRtnAndExportsWhatItTrained) {
  at::manual_seed(2);
  const at::Tensor w = at::randn({6, 40}) * 0.05;
  for (int bits : {2, 3, 4}) {
    LearnedGrid grid = init_learned_grid(w, bits);
    const at::Tensor q = fake_quantize(w, grid, bits).detach();
    EXPECT_TRUE(at::allclose(q, rtn_quantize(w, {bits, 40, false}), 1e-6, 1e-7)) << bits;
    DKMConfig cfg;
    cfg.bits = bits;
    cfg.group_size = 1;
    cfg.cluster_dtype = ClusterDType::kFloat32;
    cfg.prune_threshold = 0;
    {
      at::NoGradGuard ng;
      grid.scale.mul_(1.1);  // a grid away from its start
      grid.zero.add_(0.3);
    }
    const at::Tensor moved = fake_quantize(w, grid, bits).detach();
    EXPECT_TRUE(at::allclose(depalettize(palettize(w, grid_palette(grid, bits), cfg)), moved, 1e-6, 1e-7)) << bits;
  }
}

// The trainer's layer-by-layer soft weights (Clustering::step) against autograd through dkm()
// and the straight-through functions applied to every clustered weight at once: the same
// weights (rounded to bf16 when asked), and, with each weight used twice and its two upstream
// gradients summed in its .grad, the same gradient w.r.t. the weights after backward(). In bf16
// (as the trainer asks under bf16 autocast) the embedding table stays fp32, and a bf16 upstream
// gradient reaches the weights exactly, since a cast's backward is exact.
TEST(TrainBaselines, StepWeightsMatchAutogradThroughTheSoftWeights) {
  for (TrainMethod method : {TrainMethod::kDKM, TrainMethod::kHardKMeans, TrainMethod::kQAT}) {
    for (at::ScalarType dtype : {at::ScalarType::Undefined, at::kBFloat16}) {
      SCOPED_TRACE(to_string(method) + (dtype == at::kBFloat16 ? " bf16" : " fp32"));
      LoadedModel m = load_model(test::asset(kStories));
      ClusteringPlan plan;
      plan.defaults.bits = 3;
      plan.include_embeddings = true;
      Clustering c(m.model, plan.resolve(m.model), method);
      for (auto& [name, w] : m.model.weights()) w.requires_grad_(true);
      at::manual_seed(3);
      // Two upstream gradients per weight, bf16-representable so that a bf16 backward is exact.
      std::map<std::string, std::pair<at::Tensor, at::Tensor>> upstream;
      auto draw = [](const at::Tensor& w) { return at::randn(w.sizes()).to(at::kBFloat16).to(at::kFloat); };
      for (const auto& cw : c.weights()) {
        const at::Tensor& w = m.model.weight(cw.name);
        upstream[cw.name] = {draw(w), draw(w)};
      }
      auto grads = [&] {
        std::map<std::string, at::Tensor> g;
        for (const auto& cw : c.weights()) g[cw.name] = m.model.weight(cw.name).grad().clone();
        for (auto& [name, w] : m.model.weights()) w.mutable_grad() = at::Tensor();
        int i = 0;  // QAT's scales and zero points
        for (at::Tensor t : c.trainable()) {
          g["trainable " + std::to_string(i++)] = t.grad().clone();
          t.mutable_grad() = at::Tensor();
        }
        return g;
      };
      WeightOverrides full;
      for (const auto& cw : c.weights()) {
        const at::Tensor& w = m.model.weight(cw.name);
        switch (method) {
          case TrainMethod::kDKM: full[cw.name] = dkm(w, cw.palette, cw.cfg, cw.scale).weight; break;
          case TrainMethod::kHardKMeans: full[cw.name] = hard_assign(w, cw.palette, cw.cfg, cw.scale); break;
          case TrainMethod::kQAT:
            full[cw.name] = fake_quantize(w.reshape({w.size(0), -1}), cw.grid, cw.cfg.bits).view(w.sizes());
            break;
        }
      }
      for (const auto& [name, y] : full) y.backward(upstream.at(name).first + upstream.at(name).second);
      const auto want = grads();

      const StepWeights made = c.step(m.model, /*advance=*/false, dtype);
      for (const auto& [name, y] : full) {
        const bool cast = dtype != at::ScalarType::Undefined && name != tensor_name::kEmbed;
        const at::Tensor& w = m.model.weight(name);
        ASSERT_TRUE(made.provides(name)) << name;
        for (bool first : {true, false}) {
          at::Tensor z = made.weight(name, w);
          EXPECT_EQ(z.scalar_type(), cast ? dtype : y.scalar_type()) << name;
          EXPECT_TRUE(at::equal(z.detach(), cast ? y.detach().to(dtype) : y.detach())) << name;
          const auto& [a, b] = upstream.at(name);
          z.backward((first ? a : b).to(z.scalar_type()));
        }
      }
      EXPECT_FALSE(made.provides("model.norm.weight"));
      EXPECT_THROW(made.weight("model.norm.weight", m.model.weight("model.norm.weight")), std::invalid_argument);
      made.backward(m.model);
      const auto got = grads();
      for (const auto& [name, g] : want) EXPECT_LE(test::rel_err(got.at(name), g), 1e-6) << name;
    }
  }
}

CompressOptions baseline_run(const test::TempDir& tmp, const std::string& out, TrainMethod method) {
  CompressOptions o;
  o.data_paths = {test::asset("eval/tinystories/val_a.txt")};
  o.out = tmp / out;
  o.method = method;
  o.plan.defaults.bits = 3;
  o.data.seq_len = 64;
  o.data.val_fraction = 0.02;
  o.train.steps = 12;
  o.train.batch = 8;
  o.train.lr = 1e-3;
  o.train.quiet = true;
  o.train.checkpoint_path = tmp / (out + ".ckpt");
  return o;
}

// Each baseline fine-tunes: the file it writes scores better on held-out text than its own
// starting point (k-means palettes; RTN's grid), and says how it was made.
TEST(TrainBaselines, EachImprovesOnItsStartingPoint) {
  test::TempDir tmp;
  for (TrainMethod method : {TrainMethod::kHardKMeans, TrainMethod::kQAT}) {
    LoadedModel m = load_model(test::asset(kStories));
    const CompressOptions o = baseline_run(tmp, to_string(method) + ".edkm", method);
    CompressReport r = compress(m, o);
    EXPECT_LT(r.val_exported, r.val_start - 0.05) << to_string(method);
    EXPECT_NEAR(r.val_soft, r.val_exported, 0.02) << to_string(method);  // trained hard: the file is the model
    const CompressedModel back = read_compressed(o.out);
    EXPECT_EQ(back.metadata.at("method"), to_string(method));
    EXPECT_EQ(back.packed.size(), 35u);
  }
}

// QAT's learned grids travel in the checkpoint: a run stopped and resumed equals one that was not.
TEST(TrainBaselines, QatResumesExactly) {
  test::TempDir tmp;
  CompressOptions o = baseline_run(tmp, "full.edkm", TrainMethod::kQAT);
  o.train.steps = 4;
  LoadedModel a = load_model(test::asset(kStories));
  CompressReport full = compress(a, o);
  o = baseline_run(tmp, "split.edkm", TrainMethod::kQAT);
  o.train.steps = 4;
  int calls = 0;
  o.train.should_stop = [&] { return ++calls == 2; };
  LoadedModel b = load_model(test::asset(kStories));
  ASSERT_TRUE(compress(b, o).train.interrupted);
  o.train.should_stop = nullptr;
  o.train.resume = true;
  LoadedModel c = load_model(test::asset(kStories));
  CompressReport second = compress(c, o);
  ASSERT_EQ(second.train.losses.size(), 2u);
  EXPECT_EQ(second.train.losses[1], full.train.losses[3]);
  const CompressedModel x = read_compressed(tmp / "full.edkm"), y = read_compressed(tmp / "split.edkm");
  for (const auto& [name, p] : x.packed) {
    EXPECT_TRUE(at::equal(p.indices, y.packed.at(name).indices)) << name;
    EXPECT_TRUE(at::equal(p.palette, y.packed.at(name).palette)) << name;
  }
}

}  // namespace
}  // namespace edkm
