// quantize(): the post-training baselines end to end, written as models the other commands read.
//   k-means  every selected weight hard-assigned to its initial DKM palette (a real compressed
//            file: what compress() starts from, without fine-tuning)
//   RTN      round-to-nearest with a scale and zero point per group of weights along a row
//            (cluster/cluster.h RTNConfig), stored de-quantized (dense), recording in the
//            metadata the bits per weight a packed RTN file would take
#pragma once

#include <cstdint>
#include <string>

#include "pipeline/load.h"
#include "train/clustering.h"

namespace edkm {

enum class PtqMethod { kKMeans, kRTN };

std::string to_string(PtqMethod m);         // kmeans | rtn
PtqMethod parse_ptq_method(const std::string& s);

struct QuantizeOptions {
  QuantizeOptions() { plan.defaults.bits = 3; }  // as compress(): the bit width LLMs ship at
  std::string out;
  PtqMethod method = PtqMethod::kKMeans;
  // Which weights, and their bits; the palette settings apply to k-means.
  ClusteringPlan plan;
  // RTN: weights per scale along a row (0: one per tensor), and the symmetric grid.
  int64_t rtn_group = 64;
  bool symmetric = false;
};

struct QuantizeReport {
  std::string out;
  int64_t quantized = 0;  // weights (tensors) quantized
};

// Quantizes m.model in place and writes o.out atomically.
QuantizeReport quantize(LoadedModel& m, const QuantizeOptions& o);

}  // namespace edkm
