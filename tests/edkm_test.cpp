// eDKM's techniques: every combination gives bitwise the same results and gradients as the
// plain dense formulation, while what it keeps for backward shrinks as the paper describes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

#include "cluster/edkm.h"
#include "dist/dist.h"
#include "test_util.h"

namespace edkm {
namespace {

struct Outcome {
  at::Tensor out, grad, palette;
  SaveStats stats;
};

Outcome run(const at::Tensor& w0, const at::Tensor& p, DKMConfig cfg, bool m, bool u, bool s, const at::Tensor& R,
        std::shared_ptr<Dist> dist = nullptr) {
  cfg.method = DKMMethod::kEDKM;
  cfg.marshal = m, cfg.uniquify = u, cfg.shard = s;
  at::Tensor w = w0.clone().requires_grad_(true);
  Outcome r;
  DKMResult d = dkm_with_stats(w, p, cfg, &r.stats, {}, dist);
  (d.weight.to(at::kDouble) * R).sum().backward();
  r.out = d.weight.detach();
  r.grad = w.grad();
  r.palette = d.palette;
  return r;
}

TEST(EDKM, EveryCombinationIsBitwiseTheSameAndStoresLess) {
  at::manual_seed(31);
  DKMConfig cfg;
  cfg.bits = 3;
  cfg.group_size = 16;
  at::Tensor w = at::randn({32, 256}) * 0.02;
  at::Tensor p = init_palette(w, cfg), R = at::randn({32, 256}, at::kDouble);
  Outcome plain = run(w, p, cfg, false, false, false, R);
  // The same DKM as the autograd reference (to float rounding; the backward is hand-written).
  {
    DKMConfig d = cfg;
    d.method = DKMMethod::kDense;
    at::Tensor x = w.clone().requires_grad_(true);
    DKMResult r = dkm(x, p, d);
    (r.weight.to(at::kDouble) * R).sum().backward();
    EXPECT_LE(test::rel_err(plain.out, r.weight.detach()), 1e-5);
    EXPECT_LE(test::rel_err(plain.grad, x.grad()), 1e-3);
  }
  const int64_t N = w.numel(), k = 8;
  EXPECT_EQ(plain.stats.host_bytes, 0);
  EXPECT_GE(plain.stats.device_bytes, 2 * N * k * 4);  // at least P and A of one iteration
  for (int mask = 1; mask < 8; ++mask) {
    const bool m = mask & 1, u = mask & 2, s = mask & 4;
    SCOPED_TRACE(fmt::format("M={} U={} S={}", m, u, s));
    Outcome r = run(w, p, cfg, m, u, s, R);
    EXPECT_TRUE(at::equal(r.out, plain.out));
    EXPECT_TRUE(at::equal(r.grad, plain.grad));
    EXPECT_TRUE(at::equal(r.palette, plain.palette));
    if (m) {
      EXPECT_EQ(r.stats.device_bytes, 0);  // everything marshaled
      EXPECT_GT(r.stats.duplicates, 0);    // x is saved by every op: copied once
    }
  }
  // Uniquification pays where a palette covers many weights (few distinct values per weight):
  // one palette over 32K bf16-rounded weights.
  DKMConfig one = cfg;
  one.group_size = 0;
  at::Tensor big = at::randn({64, 512}) * 0.02;
  at::Tensor pb = init_palette(big, one), Rb = at::randn({64, 512}, at::kDouble);
  Outcome dense = run(big, pb, one, false, false, false, Rb), unique = run(big, pb, one, true, true, false, Rb);
  EXPECT_TRUE(at::equal(unique.grad, dense.grad));
  EXPECT_LT(unique.stats.host_bytes, dense.stats.device_bytes / 4);
}

TEST(EDKM, ShardingOverTwoLearnersKeepsHalfTheIndexAndTheSameGradients) {
  at::manual_seed(32);
  DKMConfig cfg;
  cfg.bits = 3;
  at::Tensor w = at::randn({64, 128}) * 0.02;
  at::Tensor p = init_palette(w, cfg), R = at::randn({64, 128}, at::kDouble);
  Outcome ref = run(w, p, cfg, true, true, false, R);
  test::TempDir tmp;
  std::vector<Outcome> learners(2);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank)
    threads.emplace_back([&, rank] {
      auto dist = Dist::with_file_store(tmp / "store", rank, 2);
      learners[rank] = run(w, p, cfg, true, true, true, R, dist);
    });
  for (auto& t : threads) t.join();
  for (const Outcome& r : learners) {
    EXPECT_TRUE(at::equal(r.out, ref.out));
    EXPECT_TRUE(at::equal(r.grad, ref.grad));
    // The index (int16, one entry per weight) is kept half by each learner.
    EXPECT_EQ(ref.stats.host_bytes - r.stats.host_bytes, w.numel() * 2 / 2);
  }
}

}  // namespace
}  // namespace edkm
