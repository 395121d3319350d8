// compress(): the whole main job. Load data, initialise palettes, fine-tune with DKM (or a
// straight-through baseline: hard k-means, QAT), assign each clustered weight to its nearest
// centroid, write the compressed model, and report.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <string>
#include <vector>

#include "format/size.h"
#include "pipeline/load.h"
#include "train/clustering.h"
#include "train/data.h"
#include "train/trainer.h"

namespace edkm {

struct CompressOptions {
  // The main job's settings where they differ from the building blocks' own defaults
  // (DKMConfig: 4 bits, coremltools' default for one layer; TrainOptions: lr 3e-4): 3 bits, the
  // width that takes LLaMA-7B from 12.6 GB to about 2.5 GB, and a peak learning rate of 1e-3,
  // since the weights must move to their palette within one short epoch.
  CompressOptions() {
    plan.defaults.bits = 3;
    train.lr = 1e-3;
  }
  std::vector<std::string> data_paths;  // one file, or a mixture (load_datasets)
  std::string out;
  ClusteringPlan plan;
  DataOptions data;
  TrainOptions train;
  bool cluster = true;  // false: plain fine-tuning (the memory baseline), written unclustered
  TrainMethod method = TrainMethod::kDKM;
  at::ScalarType dense_dtype = at::ScalarType::Undefined;  // storage of unclustered tensors
  // Distil from the model as loaded, frozen in teacher_dtype (train.distill_temperature and
  // train.distill_alpha set the loss). Undefined: bf16 on a GPU; fp32 on a CPU, where Debian's
  // libtorch runs a bf16 forward pass 5-20 times slower than fp32 (BENCHMARKS.md).
  bool distill = false;
  at::ScalarType teacher_dtype = at::ScalarType::Undefined;
  // With a calibration text, the first palettes are sensitivity-weighted k-means (each weight
  // weighed by its Fisher information on the text's first calib_samples windows of
  // calib_seq_len tokens, as quantize --method sensitive-kmeans) instead of plain k-means.
  std::string sensitive_init;
  // With sensitive_init, DKM's (and hard k-means') centroid updates keep weighing each weight
  // by its Fisher information (dkm()'s importance); false: unweighted updates, as coremltools.
  bool sensitive_updates = true;
  int64_t calib_samples = 128, calib_seq_len = 512;
};

struct CompressReport {
  TrainReport train;
  std::string out;
  int64_t train_examples = 0, val_examples = 0, train_tokens = 0;
  int64_t truncated = 0, dropped = 0;  // Alpaca examples cut at, or wholly beyond, seq_len
  int64_t clustered = 0;
  // Validation loss (nats/token) of the pretrained model, of the starting point hard-assigned
  // (post-training k-means for DKM and hard k-means; QAT: the min-max grid per row, i.e. RTN),
  // of the trained model as trained (soft weights under DKM), and of the file written.
  std::string method;
  double val_pretrained = 0, val_start = 0, val_soft = 0, val_exported = 0;
  SizeReport size;
  nlohmann::json to_json() const;
  std::string text() const;
};

CompressReport compress(LoadedModel& m, const CompressOptions& opts);

}  // namespace edkm
