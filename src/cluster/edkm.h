// eDKM's memory techniques (Cho et al. 2023, "eDKM: An Efficient and Accurate Train-time Weight
// Clustering for Large Language Models"), applied to the dense N x k DKM (method kEDKM):
//
//   marshaling    every tensor the dense DKM saves for backward moves to a host store (pinned host
//                 memory on CUDA; on CPU builds a separately accounted store) and comes back for
//                 backward; a tensor already there (same storage, offset, shape and version) is
//                 not copied again.
//   uniquification  an N x k attention map has one row per weight, and rows of equal weights are
//                 equal: it is stored as a U x k table plus an N-long index into it (int16 when U
//                 allows), shared by every map of the weight, and rebuilt exactly for backward.
//   sharding      with L learners holding the same weights, each keeps 1/L of that index; the
//                 pieces are all-gathered over c10d for backward.
//
// Each technique is independent; every combination gives bitwise the same results and gradients,
// because only where saved tensors live changes, never their values.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/core/StorageImpl.h>

#include <memory>
#include <string>
#include <vector>

#include "cluster/cluster.h"

namespace edkm {

class Dist;

struct SaveStats {
  int64_t device_bytes = 0;  // saved tensors left where they were computed
  int64_t host_bytes = 0;    // marshaled copies
  int64_t saves = 0;         // save requests
  int64_t duplicates = 0;    // requests answered by an earlier copy
};

class SaveStore {
 public:
  struct Options {
    bool marshal = false, uniquify = false, shard = false;
  };
  SaveStore(Options o, std::shared_ptr<Dist> dist);

  // Saves a tensor for backward. rows (optional): for an attention map [n, k], the index of each
  // row's distinct value (equal index => bitwise equal rows), which enables uniquification.
  size_t save(const at::Tensor& t, const at::Tensor& rows = {});
  at::Tensor load(size_t handle) const;
  const SaveStats& stats() const { return stats_; }

 private:
  struct Entry;
  size_t keep(const at::Tensor& t);  // plain or marshaled, with the duplicate check
  struct Seen {
    std::string view;  // offset / sizes / strides / version
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    size_t handle;
  };
  static Seen identity(const at::Tensor& t, size_t handle);
  static bool find(const std::vector<Seen>& list, const at::Tensor& t, size_t* handle);
  Options opts_;
  std::shared_ptr<Dist> dist_;
  std::vector<std::shared_ptr<Entry>> entries_;
  std::vector<Seen> seen_;
  std::vector<Seen> shards_;       // index -> the entry of this learner's slice
  std::vector<Seen> unique_seen_;  // tensors saved uniquified -> their entry
  SaveStats stats_;
};

namespace detail {
struct GroupLayout;
// The dense formulation through custom ops whose saved tensors go through a SaveStore
// (cfg.marshal / uniquify / shard). stats (optional) receives the store's accounting after the
// forward pass; dist is the group the index is sharded over.
DKMResult dkm_stored(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                     const at::Tensor& scale, const GroupLayout& layout, SaveStats* stats,
                     std::shared_ptr<Dist> dist);
}  // namespace detail

// dkm() with method kEDKM, also returning what its forward pass saved; sharding uses `dist`
// (default: the process's default group).
DKMResult dkm_with_stats(const at::Tensor& weight, const at::Tensor& palette, const DKMConfig& cfg,
                         SaveStats* stats, const at::Tensor& scale = {}, std::shared_ptr<Dist> dist = nullptr);

}  // namespace edkm
