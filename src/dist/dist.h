// dist: data-parallel learners on libtorch's c10d Gloo backend. Gloo also reduces CUDA tensors
// in CUDA builds (staging through its own buffers); an NCCL process group is not wired in: it
// could not be built or tested without a GPU here.
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
class ProcessGroup;
}

namespace edkm {

class Dist {
 public:
  // A single learner (no communication).
  Dist() = default;
  // Joins the group described by the environment; a learner that does not answer within
  // `timeout` makes every collective fail with an error instead of hanging.
  static std::shared_ptr<Dist> from_env(std::chrono::seconds timeout = std::chrono::seconds(120));
  // Learner `rank` of `world` meeting through a file (several learners in one process, tests).
  static std::shared_ptr<Dist> with_file_store(const std::string& path, int rank, int world,
                                               std::chrono::seconds timeout = std::chrono::seconds(60));
  // True when WORLD_SIZE is set (and > 1) in the environment.
  static bool env_requests_group();

  int rank() const { return rank_; }
  int world() const { return world_; }
  int local_rank() const { return local_rank_; }
  bool is_main() const { return rank_ == 0; }

  // In-place sum over learners, in buckets of about 25 MB (tensors of one dtype per bucket).
  void allreduce_sum(const std::vector<at::Tensor>& tensors) const;
  // Every learner's `part` (same shape everywhere), concatenated along dim 0 in rank order.
  at::Tensor all_gather(const at::Tensor& part) const;
  void barrier() const;

 private:
  int rank_ = 0, world_ = 1, local_rank_ = 0;
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
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
