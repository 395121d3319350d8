// dist: data-parallel learners on libtorch's c10d process groups: Gloo (CPU tensors, and CUDA
// tensors staged through host buffers) in every build, NCCL (CUDA tensors) in CUDA builds.
// NCCL places learner LOCAL_RANK on GPU LOCAL_RANK.
//
// A learner joins from the usual environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
// LOCAL_RANK: torchrun, Slurm wrappers and mpirun set them), through a TCPStore rendezvous on
// MASTER_ADDR:MASTER_PORT. launch_local() starts N learners of this same program on loopback.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace c10d {
class Store;
}

namespace edkm {

enum class DistBackend {
  kGloo,  // every build; the CPU backend
  kNCCL,  // CUDA builds with NCCL (has_nccl()); tensors on other devices are staged through the learner's GPU
};
DistBackend parse_dist_backend(const std::string& s);  // gloo | nccl
// True in CUDA builds that found NCCL's header (libtorch's ProcessGroupNCCL).
bool has_nccl();

class Dist {
 public:
  // A single learner (no communication).
  Dist() = default;
  // Joins the group described by the environment; a learner that does not answer within
  // `timeout` makes every collective fail with an error instead of hanging.
  static std::shared_ptr<Dist> from_env(std::chrono::seconds timeout = std::chrono::seconds(120),
                                        DistBackend backend = DistBackend::kGloo);
  // Learner `rank` of `world` meeting through a file (several learners in one process, tests);
  // unlike from_env, a group of one is made too (with one GPU, a single-rank NCCL group).
  static std::shared_ptr<Dist> with_file_store(const std::string& path, int rank, int world,
                                               std::chrono::seconds timeout = std::chrono::seconds(60),
                                               DistBackend backend = DistBackend::kGloo);
  // True when WORLD_SIZE is set (and > 1) in the environment.
  static bool env_requests_group();

  int rank() const { return rank_; }
  int world() const { return world_; }
  int local_rank() const { return local_rank_; }
  bool is_main() const { return rank_ == 0; }
  DistBackend backend() const { return backend_; }

  // In-place sum over learners, in buckets of about 25 MB (tensors of one dtype per bucket).
  void allreduce_sum(const std::vector<at::Tensor>& tensors) const;
  // Every learner's `part` (same shape everywhere), concatenated along dim 0 in rank order.
  at::Tensor all_gather(const at::Tensor& part) const;
  void barrier() const;

 private:
  // The process group: c10d's class hierarchy differs between libtorch 1.x (ProcessGroup) and 2.x
  // (Backend), so it stays inside dist.cpp.
  struct Group;
  // Creates the process group on `store`; Gloo on 127.0.0.1 when `loopback`, else on the
  // interface of the host's name.
  void join(const c10::intrusive_ptr<c10d::Store>& store, std::chrono::seconds timeout, bool loopback);

  int rank_ = 0, world_ = 1, local_rank_ = 0;
  DistBackend backend_ = DistBackend::kGloo;
  std::shared_ptr<Group> group_;
};

// The process-wide group used by code that needs one without having it passed (eDKM's
// sharding of saved indices). Null: a single learner.
void set_default_dist(std::shared_ptr<Dist> d);
std::shared_ptr<Dist> default_dist();

// Runs `argv` (this program's own command line) as `nproc` learner processes on loopback, with
// RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set, waits for all, and returns the first
// non-zero exit status (the others are then stopped). Learners' output passes through.
int launch_local(int nproc, const std::vector<std::string>& argv);

}  // namespace edkm
