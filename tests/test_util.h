// Shared helpers for the test suite.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "common/atomic_file.h"

namespace edkm::test {

// ../shared/assets, or the directory in EDKM_ASSETS.
inline std::string assets_dir() {
  if (const char* env = std::getenv("EDKM_ASSETS")) return env;
  return EDKM_DEFAULT_ASSETS;
}

inline std::string asset(const std::string& rel) {
  std::string p = assets_dir() + "/" + rel;
  if (!std::filesystem::exists(p))
    throw std::runtime_error("missing test asset " + p + " (set EDKM_ASSETS to the assets directory)");
  return p;
}

// A fresh directory under the build tree's temp area, removed when the object dies.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "edkm_test_XXXXXX").string();
    path = ::mkdtemp(tmpl.data());
  }
  ~TempDir() { remove_tree(path.string()); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// Runs the edkm CLI with `args` (shell words); its exit status, stdout and stderr.
struct CliResult {
  int code = -1;
  std::string out, err;
};
inline CliResult run_cli(const std::string& args, const TempDir& tmp) {
  const std::string out = tmp / "cli_stdout.txt", err = tmp / "cli_stderr.txt";
  const int status = std::system((std::string(EDKM_BINARY) + " " + args + " > " + out + " 2> " + err).c_str());
  return {WEXITSTATUS(status), read_file(out), read_file(err)};
}

// Norm-wise relative error |a - b| / |b| (0 when both vanish).
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  double den = y.norm().item<double>();
  double num = (x - y).norm().item<double>();
  return den == 0 ? num : num / den;
}

// Inputs of QAT's fake quantization: a weight [rows, cols] N(0, 0.05) in `dtype`, grids per row
// at `bits` (scales around 0.1 / (2^bits - 1), zero points across the grid) that put weights
// inside and beyond both ends of it, row 3's scale 0 (below the floor: no gradient), and an
// upstream gradient [rows, cols] fp32.
struct FakeQuantizeCase {
  at::Tensor weight, scale, zero, grad;
  double maxq;
};
inline FakeQuantizeCase fake_quantize_case(int64_t rows, int64_t cols, at::ScalarType dtype, int bits) {
  FakeQuantizeCase c;
  c.maxq = double((1 << bits) - 1);
  c.weight = (at::randn({rows, cols}) * 0.05).to(dtype);
  c.scale = at::rand({rows}) * 0.1 / c.maxq + 1e-4;
  c.zero = at::rand({rows}) * c.maxq;
  c.scale[3] = 0;
  c.grad = at::randn({rows, cols});
  return c;
}

}  // namespace edkm::test
