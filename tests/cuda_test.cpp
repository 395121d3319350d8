// The CUDA paths against the CPU ones, on the same inputs: the pattern index's kernels, the
// unique-value-space kernels, QAT's fake-quantization kernels, DKM's forward and backward
// (unweighted and Fisher-weighted), a training step, perplexity, greedy generation, zero-shot
// eval, and a single-rank NCCL group. Every test is skipped where no GPU is
// visible (the CPU build, CI); scripts/gpu-check.sh runs them on one.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cluster/fake_quantize.h"
#include "cluster/layout.h"
#include "cluster/pattern_index.h"
#include "cluster/uspace.h"
#include "cluster/value_index.h"
#include "dist/dist.h"
#include "test_util.h"

namespace edkm::detail {
namespace {

const std::string kStories = "models/stories260K/stories260K.bin";

#define EDKM_REQUIRE_GPU() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no GPU visible"

TEST(Cuda, PatternIndexKernelsMatchTheHostLoops) {
  EDKM_REQUIRE_GPU();
#ifdef EDKM_CUDA  // a libtorch that sees a GPU; the CUDA backend's own entry point exists in CUDA builds only
  at::manual_seed(3);
  const at::Tensor bell = at::randn({512, 1000}) * 0.02;
  // All-zero rows put every lane of a warp on one key: the warp-aggregated atomics' worst case.
  const at::Tensor pruned = bell * (at::rand({512, 1000}) < 0.3) * (at::arange(512).remainder(7) != 0).unsqueeze(1);
  for (const at::Tensor& base : {bell, pruned}) {
    for (at::ScalarType wdt : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
      for (ClusterDType cd : {ClusterDType::kBFloat16, ClusterDType::kFloat16}) {
        for (auto [scaled, group] : {std::pair{false, 0}, std::pair{true, 128}, std::pair{false, 8}}) {
          SCOPED_TRACE(fmt::format("w={} cd={} scaled={} group={}", c10::toString(wdt), to_string(cd), scaled, group));
          DKMConfig cfg;
          cfg.cluster_dtype = cd;
          cfg.group_size = group;
          cfg.per_row_scale = scaled;
          const at::Tensor w = base.to(wdt);
          const GroupLayout layout = GroupLayout::of(w, cfg);
          const at::Tensor s = scaled ? row_scales(w) : at::Tensor();
          auto host = make_pattern_index(w, layout, cfg, s);
          const at::Tensor table = at::randn(host->values().sizes(), host->values().options());
          const at::Tensor G = at::randn(w.sizes()).to(wdt);
          const at::Tensor jac = at::randn({layout.groups, table.size(1), 1, 1}, table.options());
          const at::Tensor h = at::randn({layout.groups, table.size(1), 1}, table.options());
          // Both ways of summing the scatter-adds on every layout (kAuto takes the tiles for the
          // first two, the warp atomics for the 8-row groups), and the tiles with 64 shared
          // accumulators per group, so that most values' gradient sums take the global atomics.
          for (CudaScatter scatter : {CudaScatter{CudaScatter::kWarpAtomics}, CudaScatter{CudaScatter::kSharedTiles},
                                      CudaScatter{CudaScatter::kSharedTiles, 64}}) {
            SCOPED_TRACE(fmt::format("scatter={} max_hot={}", int(scatter.mode), scatter.max_hot));
            auto gpu = make_cuda_pattern_index(w.cuda(), layout, scaled ? s.cuda() : s, rounding_dtype(w, cd), scatter);
            // The histogram is exact: the same distinct values and counts.
            ASSERT_TRUE(at::equal(gpu->values().cpu(), host->values()));
            ASSERT_TRUE(at::equal(gpu->counts().cpu(), host->counts()));
            EXPECT_TRUE(at::equal(gpu->emit(table.cuda()).cpu(), host->emit(table)));
            // fp64 sums in another order: equal to rounding.
            EXPECT_LE(test::rel_err(gpu->aggregate(G.cuda()).cpu(), host->aggregate(G)), 1e-7);
            // Both sides form j * g + h in the compute dtype and round it to the weight's. The GPU
            // runs found the fp32 results unequal in the last place (cause not established), which a
            // bf16 or fp16 output rounds either way on a few weights: equal to one rounding of the
            // output dtype (norm-wise), not bit for bit.
            const double tol = wdt == at::kBFloat16 ? 0x1p-8 : wdt == at::kHalf ? 0x1p-11 : 1e-6;
            EXPECT_LE(test::rel_err(gpu->input_grad(G.cuda(), jac.cuda(), h.cuda()).cpu(), host->input_grad(G, jac, h)),
                      tol);
          }
        }
      }
    }
  }
#endif
}

TEST(Cuda, PatternIndexKernelsMatchTheGenericAtenCodeOnALayerSizedWeight) {
  EDKM_REQUIRE_GPU();
  at::manual_seed(4);
  DKMConfig cfg;
  cfg.per_row_scale = true;
  cfg.group_size = 256;
  const at::Tensor w = (at::randn({4096, 4096}, at::device(at::kCUDA)) * 0.02).to(at::kBFloat16);
  const GroupLayout layout = GroupLayout::of(w, cfg);
  const at::Tensor s = row_scales(w);
  auto fast = make_pattern_index(w, layout, cfg, s);
  auto generic = make_pattern_index(w, layout, cfg, s, Kernels::kGeneric);
  ASSERT_TRUE(at::equal(fast->values(), generic->values()));
  ASSERT_TRUE(at::equal(fast->counts(), generic->counts()));
  const at::Tensor G = at::randn(w.sizes(), w.options());
  EXPECT_LE(test::rel_err(fast->aggregate(G), generic->aggregate(G)), 1e-9);
}

TEST(Cuda, UniqueSpaceKernelsMatchTheHostLoops) {
  EDKM_REQUIRE_GPU();
#ifdef EDKM_CUDA  // the kernels' own entry points exist in CUDA builds only
  at::manual_seed(6);
  const int64_t G = 3, U = 700;
  const auto f64 = at::TensorOptions(at::kDouble);
  // Bell-shaped values with multiplicities; group 2 ends in 100 padding entries of count 0, as
  // the pattern index pads a group with fewer values.
  at::Tensor v = at::randn({G, U, 1}, f64) * 0.02;
  at::Tensor n = at::randint(1, 50, {G, U}, f64);
  n[2].narrow(0, 600, 100).zero_();
  v[2].narrow(0, 600, 100).zero_();
  for (int bits : {3, 4})
    for (double prune : {0.0, 1e-4}) {
      SCOPED_TRACE(fmt::format("bits={} prune={}", bits, prune));
      DKMConfig cfg;
      cfg.bits = bits;
      cfg.prune_threshold = prune;
      const SoftKMeans p = SoftKMeans::from(cfg);
      const at::Tensor c0 = std::get<0>(at::sort(at::randn({G, cfg.k(), 1}, f64) * 0.02, 1));
      at::Tensor out_host, out_gpu;
      const UniqueSpaceState host = uspace_forward_host(v, n, c0, p, &out_host);
      const UniqueSpaceState gpu = uspace_forward(v.cuda(), n.cuda(), c0.cuda(), p, &out_gpu);
      ASSERT_TRUE(at::equal(gpu.iters.cpu(), host.iters));
      // The kernels lay the state out for max_iters updates; the host loops for the most made.
      const int64_t T = host.sums.size(0);
      EXPECT_LE(test::rel_err(gpu.palettes.narrow(0, 0, T + 1).cpu(), host.palettes), 1e-12);
      EXPECT_LE(test::rel_err(gpu.sums.narrow(0, 0, T).cpu(), host.sums), 1e-12);
      EXPECT_LE(test::rel_err(out_gpu.cpu(), out_host), 1e-12);
      const at::Tensor g = at::randn({G, U, 1}, f64);
      const UniqueSpaceGrad want = uspace_backward_host(v, n, host, g, p);
      const UniqueSpaceGrad got = uspace_backward(v.cuda(), n.cuda(), gpu, g.cuda(), p);
      // Sums over values in another order, through the softmax's 1 / tau: equal to rounding.
      EXPECT_LE(test::rel_err(got.jac.cpu(), want.jac), 1e-9);
      EXPECT_LE(test::rel_err(got.h.cpu(), want.h), 1e-9);
    }
#endif
}

// fp32 arithmetic in the same order on both sides (fake_quantize_element.h): w_q and dL/dw
// bit for bit; the row sums in fp64 in another order, rounded to fp32.
TEST(Cuda, FakeQuantizeKernelsMatchTheHostLoop) {
  EDKM_REQUIRE_GPU();
  at::manual_seed(8);
  const int64_t rows = 300, cols = 4100;
  for (at::ScalarType wdt : {at::kFloat, at::kBFloat16}) {
    for (int bits : {2, 3, 8}) {
      SCOPED_TRACE(fmt::format("w={} bits={}", c10::toString(wdt), bits));
      const test::FakeQuantizeCase c = test::fake_quantize_case(rows, cols, wdt, bits);
      const at::Tensor &w = c.weight, &scale = c.scale, &zero = c.zero, &grad = c.grad;
      const double maxq = c.maxq;
      const FakeQuantizePasses& cpu = fake_quantize_passes(w);
      const FakeQuantizePasses& gpu = fake_quantize_passes(w.cuda());
      ASSERT_NE(&cpu, &gpu);
      EXPECT_TRUE(gpu.forward(w.cuda(), scale.cuda(), zero.cuda(), maxq).cpu().equal(cpu.forward(w, scale, zero, maxq)));
      const FakeQuantizeRowGrads want = cpu.backward(w, scale, zero, maxq, grad, w.sizes());
      const FakeQuantizeRowGrads got = gpu.backward(w.cuda(), scale.cuda(), zero.cuda(), maxq, grad.cuda(), w.sizes());
      EXPECT_TRUE(got.weight.cpu().equal(want.weight));
      EXPECT_LE(test::rel_err(got.scale.cpu(), want.scale), 1e-6);
      EXPECT_LE(test::rel_err(got.zero.cpu(), want.zero), 1e-6);
    }
  }
}

TEST(Cuda, DkmForwardAndBackwardMatchTheCpu) {
  EDKM_REQUIRE_GPU();
  at::manual_seed(5);
  DKMConfig cfg;
  cfg.bits = 3;
  cfg.per_row_scale = true;
  cfg.group_size = 64;
  const at::Tensor w0 = at::randn({256, 384}) * 0.02;
  const at::Tensor s = row_scales(w0);
  const at::Tensor c0 = init_palette(w0, cfg, s);
  const at::Tensor upstream = at::randn(w0.sizes());
  // Fisher-like importances (heavy-tailed, a tenth of them 0) weigh the centroid updates.
  const at::Tensor fisher = at::rand(w0.sizes()).pow(4) * (at::rand(w0.sizes()) > 0.1);
  for (const at::Tensor& importance : {at::Tensor(), fisher}) {
    SCOPED_TRACE(importance.defined() ? "weighted" : "unweighted");
    auto run = [&](const at::Device& device) {
      at::Tensor w = w0.to(device, /*non_blocking=*/false, /*copy=*/true).requires_grad_(true);
      DKMResult r = dkm(w, c0.to(device), cfg, s.to(device),
                        importance.defined() ? Importance(importance.to(device), w, cfg) : Importance());
      (r.weight * upstream.to(device)).sum().backward();
      return std::make_tuple(r.weight.detach().cpu(), w.grad().cpu(), r.palette.cpu(), r.iterations);
    };
    auto [y_cpu, g_cpu, p_cpu, it_cpu] = run(at::kCPU);
    auto [y_gpu, g_gpu, p_gpu, it_gpu] = run(at::Device(at::kCUDA));
    EXPECT_EQ(it_gpu, it_cpu);
    EXPECT_LE(test::rel_err(p_gpu, p_cpu), 1e-6);
    EXPECT_LE(test::rel_err(y_gpu, y_cpu), 1e-6);
    EXPECT_LE(test::rel_err(g_gpu, g_cpu), 1e-5);
  }
}

TEST(Cuda, CompressAndPerplexityOnTheGpuMatchTheCpu) {
  EDKM_REQUIRE_GPU();
  test::TempDir tmp;
  const std::string model = test::asset(kStories);
  const std::string data = test::asset("eval/tinystories/val_a.txt");
  auto compress = [&](const std::string& device, const std::string& autocast) {
    test::CliResult r = test::run_cli("compress -q --json --steps 4 --batch 4 --seq-len 64 --bits 3 --device " + device +
                                          " --autocast " + autocast + " -m " + model + " -d " + data + " -o " +
                                          tmp / (device + autocast + ".edkm"),
                                      tmp);
    EXPECT_EQ(r.code, 0) << r.err;
    return nlohmann::json::parse(r.out);
  };
  const nlohmann::json cpu = compress("cpu", "off"), gpu = compress("cuda", "off");
  // The same steps on the same batches in fp32: the losses agree to the GPU's summation order.
  for (const char* key : {"start", "soft", "exported"})
    EXPECT_NEAR(gpu["val_loss"][key].get<double>(), cpu["val_loss"][key].get<double>(), 2e-3) << key;
  // Mixed precision (the GPU default) trains to about the same loss.
  const nlohmann::json amp = compress("cuda", "auto");
  EXPECT_NEAR(amp["val_loss"]["exported"].get<double>(), cpu["val_loss"]["exported"].get<double>(), 0.05);
  auto perplexity = [&](const std::string& device) {
    test::CliResult r = test::run_cli("perplexity -q --json --device " + device + " -m " + tmp / "cudaoff.edkm" +
                                          " --text " + data + " --context 128",
                                      tmp);
    EXPECT_EQ(r.code, 0) << r.err;
    return nlohmann::json::parse(r.out)["perplexity"].get<double>();
  };
  EXPECT_NEAR(perplexity("cuda"), perplexity("cpu"), 1e-3 * perplexity("cpu"));
}

TEST(Cuda, GenerationAndZeroShotEvalOnTheGpuMatchTheCpu) {
  EDKM_REQUIRE_GPU();
  test::TempDir tmp;
  const std::string model = " -m " + test::asset(kStories) + " --dtype fp32 --device ";
  // Greedy decoding in fp32: the same tokens, unless two logits tie to within the GPU's
  // summation order, which 48 tokens of stories260K do not come near.
  auto generate = [&](const std::string& device) {
    test::CliResult r = test::run_cli("generate -n 48 --temperature 0 --prompt \"Once upon a time\"" + model + device, tmp);
    EXPECT_EQ(r.code, 0) << r.err;
    return r.out;
  };
  EXPECT_EQ(generate("cuda"), generate("cpu"));
  auto eval = [&](const std::string& device) {
    test::CliResult r = test::run_cli("eval -q --json --tasks copa --limit 40 --assets " + test::assets_dir() + model + device, tmp);
    EXPECT_EQ(r.code, 0) << r.err;
    return nlohmann::json::parse(r.out)["tasks"]["copa"];
  };
  const nlohmann::json gpu = eval("cuda"), cpu = eval("cpu");
  EXPECT_EQ(gpu["n"], cpu["n"]);
  EXPECT_EQ(gpu["acc"], cpu["acc"]);
}

TEST(Cuda, SingleRankNcclGroupReducesAndGathers) {
  EDKM_REQUIRE_GPU();
  if (!has_nccl()) GTEST_SKIP() << "built without NCCL (nccl.h not found)";
  test::TempDir tmp;
  auto dist = Dist::with_file_store(tmp / "store", 0, 1, std::chrono::seconds(60), DistBackend::kNCCL);
  ASSERT_EQ(dist->backend(), DistBackend::kNCCL);
  at::Tensor grads = at::randn({1000}, at::device(at::kCUDA));
  const at::Tensor before = grads.clone();
  dist->allreduce_sum({grads});
  EXPECT_TRUE(at::equal(grads, before));
  // A CPU tensor travels through the learner's GPU and comes back to the CPU; int16 as fp16 bits.
  const at::Tensor part = at::randint(-30000, 30000, {17}, at::kShort);
  const at::Tensor all = dist->all_gather(part);
  EXPECT_TRUE(all.device().is_cpu());
  EXPECT_TRUE(at::equal(all, part));
  dist->barrier();
}

}  // namespace
}  // namespace edkm::detail
