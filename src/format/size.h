// Exact size accounting of a compressed model: per tensor, the bytes on disk (indices,
// palettes, scales; or the dense tensor), the effective bits per weight, and the ratio against
// the same tensor in bf16. Computed from a compressed file or from a config alone.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "format/format.h"
#include "model/config.h"

namespace edkm {

struct TensorSize {
  std::string name;
  std::vector<int64_t> shape;
  int bits = 0;             // 0: stored dense
  int cluster_dim = 1;
  int64_t palettes = 0;     // groups
  bool scaled = false;
  std::string dtype;        // dense storage dtype, or "palettized"
  int64_t bytes = 0;        // on disk
  int64_t numel() const;
  int64_t bf16_bytes() const { return 2 * numel(); }
  double bits_per_weight() const { return 8.0 * bytes / numel(); }
};

struct SizeReport {
  std::vector<TensorSize> tensors;
  int64_t bytes() const;
  int64_t bf16_bytes() const;
  int64_t clustered_weights() const;
  double bits_per_weight() const;            // all tensors
  double clustered_bits_per_weight() const;  // clustered tensors only
  double ratio() const { return double(bf16_bytes()) / bytes(); }
  std::string table(bool per_tensor = true) const;
  nlohmann::json to_json() const;
};

// Bytes of a palettized tensor: ceil(n b / 8) indices + G 2^b d fp16 palette entries
// (+ 4 bytes per row of scale).
int64_t palettized_bytes(int64_t rows, int64_t cols, int bits, int cluster_dim, int64_t group_size, bool scaled);

SizeReport size_of(const CompressedModel& m);

// What a model with this config becomes: every projection (and, with include_embeddings, the
// embeddings and classifier) palettized with these settings, the rest in bf16.
struct SizePlan {
  int bits = 3;
  int64_t group_size = 0;
  int cluster_dim = 1;
  bool per_row_scale = false;
  bool include_embeddings = false;
};
SizeReport size_from_config(const LlamaConfig& c, const SizePlan& plan);

}  // namespace edkm
