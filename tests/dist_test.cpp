// Data-parallel learners over c10d (Gloo on loopback), run as real processes through the CLI.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>

#include "common/atomic_file.h"
#include "dist/dist.h"
#include "format/format.h"
#include "test_util.h"

namespace edkm {
namespace {

std::string base_args(const test::TempDir& tmp) {
  const std::string text = read_file(test::asset("eval/tinystories/val_a.txt")).substr(0, 60000);
  write_file_atomic(tmp / "data.txt", text);
  return " compress -q -m " + test::asset("models/stories260K/stories260K.bin") + " -d " + tmp / "data.txt" +
         " --steps 4 --seq-len 64 --val-fraction 0.1";
}

int shell(const std::string& cmd) {
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(DataParallel, TwoLearnersWriteTheSameModelAsOneLearner) {
  test::TempDir tmp;
  const std::string bin = EDKM_BINARY, args = base_args(tmp);
  // One learner accumulating two micro-batches of 4, and two learners with 4 each: the same
  // examples per step, the same two partial gradients summed (a + b = b + a), one thread each.
  ASSERT_EQ(shell(bin + " -t 1" + args + " --batch 4 --grad-accum 2 -o " + tmp / "one.edkm > /dev/null 2>&1"), 0);
  ASSERT_EQ(shell(bin + args + " --batch 4 --nproc 2 -o " + tmp / "two.edkm > /dev/null 2>&1"), 0);
  EXPECT_EQ(read_file(tmp / "one.edkm"), read_file(tmp / "two.edkm"));
  EXPECT_FALSE(std::filesystem::exists(tmp / "two.edkm.tmp"));
  CompressedModel m = read_compressed(tmp / "two.edkm");
  EXPECT_EQ(m.packed.size(), 35u);
}

TEST(DataParallel, ASingleRankGlooGroupKeepsTensorsAsTheyAre) {
  test::TempDir tmp;
  auto dist = Dist::with_file_store(tmp / "store", 0, 1);
  at::Tensor g = at::randn({300});
  const at::Tensor before = g.clone();
  dist->allreduce_sum({g});
  EXPECT_TRUE(at::equal(g, before));
  const at::Tensor part = at::randint(-30000, 30000, {9}, at::kShort);
  EXPECT_TRUE(at::equal(dist->all_gather(part), part));
  dist->barrier();
}

TEST(DataParallel, NcclIsRefusedWithoutACudaBuild) {
  if (has_nccl()) GTEST_SKIP() << "a CUDA build: the Cuda tests run NCCL";
  test::TempDir tmp;
  try {
    Dist::with_file_store(tmp / "store", 0, 1, std::chrono::seconds(10), DistBackend::kNCCL);
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("needs a CUDA build"), std::string::npos) << e.what();
  }
  EXPECT_EQ(parse_dist_backend("nccl"), DistBackend::kNCCL);
  EXPECT_THROW(parse_dist_backend("mpi"), std::invalid_argument);
}

TEST(DataParallel, ALearnerThatDiesStopsTheOthers) {
  test::TempDir tmp;
  const std::string bin = EDKM_BINARY, args = base_args(tmp);
  // Learner 1 fails while loading its data; learner 0 must stop with an error at its first
  // collective instead of waiting for it forever.
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=29617 WORLD_SIZE=2 ";
  const std::string cmd = "(" + env + "RANK=0 timeout 120 " + bin + args + " -o " + tmp / "out.edkm" + " 2> " +
                          tmp / "err0.txt" + "; echo $? > " + tmp / "rc0.txt) & " + env + "RANK=1 " + bin +
                          " compress -q -m " + test::asset("models/stories260K/stories260K.bin") + " -d " +
                          tmp / "missing.txt -o " + tmp / "out1.edkm 2> /dev/null; wait";
  auto t0 = std::chrono::steady_clock::now();
  shell(cmd);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int rc = std::stoi(read_file(tmp / "rc0.txt"));
  EXPECT_NE(rc, 0);
  EXPECT_NE(rc, 124) << "learner 0 hung until timeout";
  EXPECT_LT(seconds, 110);
  const std::string err = read_file(tmp / "err0.txt");
  EXPECT_NE(err.find("learner 0"), std::string::npos) << err;
  EXPECT_FALSE(std::filesystem::exists(tmp / "out.edkm"));
}

}  // namespace
}  // namespace edkm
