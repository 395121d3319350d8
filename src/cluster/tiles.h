// Internal to cluster/: the tiles of the CUDA backend's shared-memory scatter-adds
// (pattern_index_cuda.cu). A tile is a run of consecutive weights inside one group, so that the
// table a block accumulates in shared memory belongs to one group and is flushed into that
// group's entries. Header-only and host-testable: the same index arithmetic runs on the host
// (tests) and in the kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cluster/host_device.h"

namespace edkm::detail {

struct Tiles {
  int64_t group_weights = 0;  // weights per group (its rows times cols), consecutive in memory
  int64_t per_group = 0;      // tiles per group
  int64_t size = 0;           // weights per tile; a group's last tile may hold fewer
  int64_t count = 0;          // groups * per_group

  // About `target` tiles in all (the blocks that fill the GPU), each of min_size to max_size
  // weights: max_size bounds what a tile may hold (a 16-bit counter's 65,535), min_size keeps a
  // tile's fixed cost (zeroing and flushing its table) small beside its weights. A group smaller
  // than min_size is one tile; the sizes within a group are balanced.
  static Tiles of(int64_t groups, int64_t group_weights, int64_t min_size, int64_t max_size, int64_t target) {
    Tiles t;
    t.group_weights = group_weights;
    const int64_t wanted = (groups * group_weights + target - 1) / std::max<int64_t>(1, target);
    const int64_t bound = std::clamp(wanted, std::min(min_size, max_size), max_size);
    t.per_group = std::max<int64_t>(1, (group_weights + bound - 1) / bound);
    t.size = (group_weights + t.per_group - 1) / t.per_group;
    t.count = groups * t.per_group;
    return t;
  }

  EDKM_HOST_DEVICE int64_t group(int64_t tile) const { return tile / per_group; }
  EDKM_HOST_DEVICE int64_t begin(int64_t tile) const {
    return group(tile) * group_weights + (tile % per_group) * size;
  }
  EDKM_HOST_DEVICE int64_t end(int64_t tile) const {
    const int64_t group_end = (group(tile) + 1) * group_weights, b = begin(tile);
    return b + size < group_end ? b + size : group_end;
  }
};

}  // namespace edkm::detail
