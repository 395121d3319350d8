// quantize(): the post-training baselines end to end, written as models the other commands read.
//   kmeans            every selected weight hard-assigned to its initial DKM palette (a real
//                     compressed file: what compress() starts from, without fine-tuning);
//                     --palette-init optimal solves the k-means exactly
//   sensitive-kmeans  the same, the k-means weighted by each weight's diagonal Fisher
//                     information on calibration text (SqueezeLLM; coremltools' SKMPalettizer)
//   rtn               round-to-nearest with a scale and zero point per group of weights along a
//                     row (cluster/cluster.h RTNConfig)
//   gptq              GPTQ on the same grid, layer by layer, each layer's Hessians from the
//                     calibration windows as they come out of the layers already quantized
// RTN and GPTQ are stored de-quantized (dense), with the bits per weight a packed file would
// take in the metadata.
#pragma once

#include <cstdint>
#include <string>

#include "pipeline/load.h"
#include "train/clustering.h"

namespace edkm {

enum class PtqMethod { kKMeans, kSensitiveKMeans, kRTN, kGPTQ };

std::string to_string(PtqMethod m);         // kmeans | sensitive-kmeans | rtn | gptq
PtqMethod parse_ptq_method(const std::string& s);
bool needs_calibration(PtqMethod m);

struct QuantizeOptions {
  QuantizeOptions() { plan.defaults.bits = 3; }  // as compress(): the bit width LLMs ship at
  std::string out;
  PtqMethod method = PtqMethod::kKMeans;
  // Which weights, and their bits; the palette settings apply to the k-means methods.
  ClusteringPlan plan;
  // RTN: weights per scale along a row (0: one per tensor), and the symmetric grid (GPTQ too).
  int64_t rtn_group = 64;
  bool symmetric = false;
  // GPTQ: weights per scale along a row (0: one per row).
  int64_t gptq_group = 128;
  // Calibration text for sensitive-kmeans and GPTQ (any file compress() reads: C4-style
  // {"text"} JSONL, Alpaca, plain text): the first calib_samples windows of calib_seq_len tokens.
  // GPTQ's paper uses 128 windows of 2048 C4 tokens; SqueezeLLM 100 of 2048.
  std::string calib;
  int64_t calib_samples = 128;
  int64_t calib_seq_len = 512;
  bool checkpoint_layers = false;  // sensitive-kmeans: recompute layers in the backward
};

struct QuantizeReport {
  std::string out;
  int64_t quantized = 0;     // weights (tensors) quantized
  int64_t calib_tokens = 0;  // calibration tokens read
  double bits_per_weight = 0;
  double seconds = 0;        // quantization, calibration included (not loading or writing)
  int64_t peak_rss = 0;      // process high-water mark at the end (bytes)
};

// Quantizes m.model in place and writes o.out atomically.
QuantizeReport quantize(LoadedModel& m, const QuantizeOptions& o);

}  // namespace edkm
