// Google Benchmark view of the DKM kernels: forward + backward of one LLaMA-7B projection
// matrix per method (dense on a 1M-weight slice, as it does not fit otherwise), and the
// element-wise floor. The side-by-side table with ratios is `edkm bench dkm`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/csrc/autograd/autograd.h>

#include "bench/bench.h"
#include "cluster/cluster.h"

namespace {

// Arg 0: matrix index in the layer (0 = q_proj 4096x4096, 4 = gate_proj 11008x4096); arg 1:
// rows kept (0 = all).
at::Tensor matrix(const benchmark::State& st) {
  static std::vector<at::Tensor> layer = edkm::bench::llama7b_layer(at::kBFloat16);
  at::Tensor w = layer.at(st.range(0));
  return st.range(1) > 0 ? w.narrow(0, 0, st.range(1)) : w;
}

void run(benchmark::State& st, edkm::DKMMethod method) {
  edkm::DKMConfig cfg;
  cfg.bits = 3;
  cfg.method = method;
  at::Tensor w0 = matrix(st);
  at::Tensor palette = edkm::init_palette(w0, cfg);
  at::Tensor grad = at::randn_like(w0);
  for (auto _ : st) {
    at::Tensor w = w0.detach().requires_grad_(true);
    at::Tensor out = edkm::dkm(w, palette, cfg).weight;
    torch::autograd::backward({out}, {grad});
    benchmark::DoNotOptimize(w.grad().data_ptr());
  }
  st.SetItemsProcessed(st.iterations() * w0.numel());
}

void BM_DKMUnique(benchmark::State& st) { run(st, edkm::DKMMethod::kUnique); }
void BM_DKMDense(benchmark::State& st) { run(st, edkm::DKMMethod::kDense); }

void BM_ElementwiseFloor(benchmark::State& st) {
  at::Tensor w0 = matrix(st), grad = at::randn_like(w0);
  at::Tensor s = at::full({}, 1.5, at::kBFloat16);
  for (auto _ : st) {
    at::Tensor w = w0.detach().requires_grad_(true);
    torch::autograd::backward({w * s}, {grad});
    benchmark::DoNotOptimize(w.grad().data_ptr());
  }
  st.SetItemsProcessed(st.iterations() * w0.numel());
}

BENCHMARK(BM_ElementwiseFloor)->Args({0, 0})->Args({4, 0})->Args({0, 256})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DKMUnique)->Args({0, 0})->Args({4, 0})->Args({0, 256})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DKMDense)->Args({0, 256})->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(std::max(1u, std::thread::hardware_concurrency()));
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
